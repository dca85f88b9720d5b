#!/usr/bin/env python
"""GPU speed-ups for the latent UNet: fp32 vs TF32 vs bf16, SDPA vs classic attention, channels_last, torch.compile.

    python bench/bench_gpu.py                   # seed UNet (258M), training batch 32, sampling batch 64
    python bench/bench_gpu.py --quick           # tiny UNet, a few steps
    python bench/bench_gpu.py --device cpu ...  # the same code on the CPU (to check it; figures not meaningful)

Without a CUDA device (and without --device cpu) nothing is measured: the result says it was skipped.
For each variant a fresh model is timed for a training step (forward, backward, clipping, AdamW) and
for a sampling forward pass (no gradients); on a GPU the peak memory of the training step is recorded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench import models, report  # noqa: E402

NAME = "gpu"
# name: (autocast dtype, SDPA attention, channels_last, torch.compile, TF32 matmuls)
VARIANTS = {
    "fp32": (None, True, False, False, False),
    "fp32, classic attention": (None, False, False, False, False),
    "tf32": (None, True, False, False, True),
    "bf16": (torch.bfloat16, True, False, False, False),
    "bf16, channels_last": (torch.bfloat16, True, True, False, False),
    "bf16, compile": (torch.bfloat16, True, False, True, False),
    "bf16, channels_last, compile": (torch.bfloat16, True, True, True, False),
}
# name: (full, quick)
DEFAULTS = {
    "unet": ("seed-ffhq256-sdvae", "tiny"),
    "train_batch_size": (32, 2),
    "sample_batch_size": (64, 2),
    "warmup_steps": (3, 1),
    "steps": (10, 2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: the GPU if there is one, else skip.")
    parser.add_argument("--unet", type=str, default=None, help="Default seed-ffhq256-sdvae (--quick: tiny).")
    parser.add_argument("--train_batch_size", type=int, default=None)
    parser.add_argument("--sample_batch_size", type=int, default=None)
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="Untimed steps per variant (torch.compile compiles during them).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per variant.")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = report.parse_benchmark_args(parser, argv, DEFAULTS)
    for name in ("train_batch_size", "sample_batch_size", "warmup_steps", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    return args


def set_attention(model, sdpa: bool) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def build_variant(unet_name: str, device: torch.device, sdpa: bool, channels_last: bool):
    model = models.build_unet(unet_name).to(device)
    set_attention(model, sdpa)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def seconds_per_call(function, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        function()
    report.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    report.synchronize()
    return (time.perf_counter() - start) / repeats


def measure_variant(args, device: torch.device, name: str) -> tuple[dict, int]:
    dtype, sdpa, channels_last, compiled, tf32 = VARIANTS[name]
    # "fp32" means true fp32: TF32 off for matmuls and convolutions (cuDNN allows it by default).
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        return time_variant(args, device, name)  # (measurements, UNet parameter count)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous_tf32
        if compiled:
            torch._dynamo.reset()  # drop the compiled graphs, which hold on to the model


def time_variant(args, device: torch.device, name: str) -> tuple[dict, int]:
    from uldm.models import count_parameters

    dtype, sdpa, channels_last, compiled, _ = VARIANTS[name]
    model = build_variant(args.unet, device, sdpa, channels_last).train()
    num_parameters = count_parameters(model)
    shape = models.sample_shape(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-6)
    runnable = torch.compile(model) if compiled else model
    step = models.make_training_step(runnable, optimizer, shape, device, autocast_dtype=dtype,
                                     channels_last=channels_last)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train_s = seconds_per_call(lambda: step(args.train_batch_size), args.warmup_steps, args.steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None

    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    latents = torch.randn((args.sample_batch_size, *shape), device=device).contiguous(memory_format=memory_format)
    timestep = torch.full((args.sample_batch_size,), 500, device=device)
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    @torch.no_grad()
    def forward():
        with autocast:
            runnable(latents, timestep)

    sample_s = seconds_per_call(forward, args.warmup_steps, args.steps)
    measured = {"variant": name, "train_images_per_sec": args.train_batch_size / train_s,
                "train_peak_memory_bytes": peak, "sampling_unet_images_per_sec": args.sample_batch_size / sample_s}
    return measured, num_parameters


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with report.quick_mode_threads(args):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    device_name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    skip = device_name in ("auto", "cuda") and not torch.cuda.is_available()
    result = report.start_result(NAME, "GPU: precision, attention, memory format, torch.compile", args, wait=not skip)
    if skip:
        message = ("No CUDA device: the GPU benchmark (fp32 vs bf16, SDPA, channels_last, torch.compile) is "
                   "skipped. Run `python bench/bench_gpu.py` on a machine with a GPU.")
        print(message, flush=True)
        result["results"] = {"skipped": True, "reason": message}
        result["notes"].append(message)
        report.finish_result(result, args)
        return result

    device = torch.device(device_name)
    variants = []
    for name in args.variants:
        print(f"Measuring {name}...", flush=True)
        measured, num_parameters = measure_variant(args, device, name)
        variants.append(measured)
    baseline = variants[0]
    for variant in variants:
        variant["train_speedup"] = variant["train_images_per_sec"] / baseline["train_images_per_sec"]
        variant["sampling_speedup"] = variant["sampling_unet_images_per_sec"] / baseline["sampling_unet_images_per_sec"]
    result["settings"] = {"unet": args.unet, "unet_parameters": num_parameters,
                          "train_batch_size": args.train_batch_size, "sample_batch_size": args.sample_batch_size,
                          "warmup_steps": args.warmup_steps, "timed_steps": args.steps, "device": str(device)}
    result["results"] = {"skipped": False, "variants": variants}
    report.add_table(result, f"{args.unet}: training step at batch {args.train_batch_size}, sampling forward pass "
                             f"at batch {args.sample_batch_size} (speed-ups against {baseline['variant']})",
                     ["variant", "train images/s", "speed-up", "train peak memory (GiB)", "sampling images/s per UNet pass",
                      "speed-up"],
                     [[v["variant"], v["train_images_per_sec"], v["train_speedup"],
                       None if v["train_peak_memory_bytes"] is None else v["train_peak_memory_bytes"] / 2**30,
                       v["sampling_unet_images_per_sec"], v["sampling_speedup"]] for v in variants])
    if device.type == "cpu":
        result["notes"].append("Run on the CPU to check the code: these figures say nothing about a GPU.")
    report.finish_result(result, args)
    return result


if __name__ == "__main__":
    main()
