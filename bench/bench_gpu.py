#!/usr/bin/env python
"""The seed recipe's training step on one GPU: img/s, MFU and peak memory for fp32, bf16 and
bf16 + torch.compile, each with the latent cache (UNet only) and without it (the VAE encodes every step).

    python bench/bench_gpu.py                          # seed UNet (258M), batch 84, 4x32x32, SD-VAE layout
    python bench/bench_gpu.py --device cpu --quick     # the same code on the CPU, tiny models (a check)

Without a CUDA device (and without --device cpu) nothing is measured: the result says it was skipped.
docs/scaling.md ("What to run when a GPU is lent") has the prepared command for a device session.

What a row measures: a fresh UNet per model variant (bench/harness.py's VARIANTS; fp32 runs with PyTorch's
default flags, i.e. cuDNN convolutions in TF32 and matmuls in full fp32, as the training script runs without
--allow_tf32; bf16 is autocast with fp32 weights, and the VAE's weights in bf16, as train_unconditional_latent.py
loads it), then per data path --warmup_steps untimed and --steps timed training steps of bench/harness.py
(latents: random ones for the cache path, the VAE's encoding of a batch of images for the other). "loop" rows do
what uldm/training.py did before issue 13 (foreach AdamW, diffusers' EMAModel one tensor at a time, the loss read
back every step); "tuned" rows what it does now (its AdamW and EMA, the losses read back once per logging
interval, here after the timed steps). MFU = the UNet's training FLOPs per image (forward + backward, counted
with torch.utils.flop_counter.FlopCounterMode through the math attention kernel) x img/s over the dense peak of
the GPU's datasheet for the precision (bf16 for bf16 rows, TF32 for fp32 rows); "with VAE" adds the encoder's
FLOPs. Peak memory is torch.cuda.max_memory_allocated over each row's timed steps. The VAE check encodes and
decodes a batch in fp32, bf16 and fp16 and counts non-finite values (random weights: it checks the code path,
not the real SD-VAE's fp16 overflow).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import harness, models, report  # noqa: E402
from bench.harness import VARIANTS, Variant  # noqa: E402

NAME = "gpu"
DEFAULT_VARIANTS = ["fp32", "bf16", "bf16 + channels_last", "bf16 + compile"]
DATA_PATHS = {"encode": "VAE encodes every step", "cache": "latent cache (UNet only)"}
BASELINE = ("fp32", "encode", "loop")  # the origin report's recipe
# Dense (no sparsity) datasheet peaks in TFLOP/s: (bf16, TF32, fp32 without tensor cores). The H200 SXM
# has the H100 SXM's arithmetic; the NVL parts run at lower clocks and power.
PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100 NVL": (835.0, 418.0, 60.0),
    "H100": (989.4, 494.7, 66.9),  # SXM
    "H200 NVL": (835.0, 418.0, 60.0),
    "H200": (989.4, 494.7, 66.9),  # SXM
    "A100": (312.0, 156.0, 19.5),
}
# name: (full, quick)
DEFAULTS = {
    "unet": ("seed-ffhq256-sdvae", "tiny"),
    "vae": ("sd", "tiny-kl-f4"),
    "train_batch_size": (84, 2),
    "warmup_steps": (3, 1),
    "steps": (10, 2),
    "vae_check_batch_size": (8, 2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: the GPU if there is one, else skip.")
    parser.add_argument("--unet", type=str, default=None, help="Default seed-ffhq256-sdvae (--quick: tiny).")
    parser.add_argument("--vae", type=str, default=None,
                        help="'sd' (Stable Diffusion's VAE layout, random weights) or a configs/vae preset "
                             "(default sd; --quick: tiny-kl-f4).")
    parser.add_argument("--train_batch_size", type=int, default=None, help="Default 84 (the seed recipe).")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="Untimed steps per row (torch.compile compiles during the first). Default 3.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per row. Default 10.")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help=f"Model variants (default: {', '.join(DEFAULT_VARIANTS)}).")
    parser.add_argument("--data_paths", nargs="+", choices=list(DATA_PATHS), default=list(DATA_PATHS))
    parser.add_argument("--tuned_variants", nargs="*", choices=list(VARIANTS), default=None,
                        help="Variants also measured with the tuned step (fused AdamW, foreach EMA, no per-step "
                             "readback) on the cache path (default: bf16 and bf16 + compile where measured).")
    parser.add_argument("--vae_check_batch_size", type=int, default=None)
    parser.add_argument("--skip_parts", action="store_true",
                        help="Leave out the AdamW/EMA implementation timings and the VAE precision check.")
    parser.add_argument("--peak_tflops", type=float, nargs=2, default=None, metavar=("BF16", "TF32"),
                        help="Dense peaks for the MFU when the GPU's name is not in the table.")
    parser.add_argument("--max_minutes", type=float, default=None,
                        help="Skip the rows that would start after this many minutes (the device lease is short).")
    args = report.parse_benchmark_args(parser, argv, DEFAULTS)
    if args.variants is None:
        args.variants = list(DEFAULT_VARIANTS)
    if args.tuned_variants is None:
        args.tuned_variants = [v for v in ("bf16", "bf16 + compile") if v in args.variants]
    for name in ("train_batch_size", "warmup_steps", "steps", "vae_check_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    return args


# ------------------------------------------------------------------------------------- counting


def peak_tflops(device: torch.device, override: list[float] | None) -> dict | None:
    """{"bf16": ..., "fp32": ..., "source": ...} for the MFU; None on the CPU or an unknown GPU."""
    if override:
        return {"bf16": override[0], "fp32": override[1], "source": "--peak_tflops"}
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32, fp32) in PEAK_TFLOPS.items():  # the more specific names come first
        if key in name:
            return {"bf16": bf16, "fp32": tf32, "fp32_without_tensor_cores": fp32,
                    "source": f"datasheet, dense, {key}"}
    return None


def training_flops_per_image(unet, device: torch.device, batch_size: int = 2) -> float:
    """FLOPs of one image's forward and backward pass through the UNet (fp32, math attention, so that
    attention counts the same on every device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    latents = torch.randn((batch_size, *models.sample_shape(unet)), device=device)
    timesteps = torch.full((batch_size,), 500, device=device)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        unet(latents, timesteps).sample.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def encode_flops_per_image(vae, images: torch.Tensor) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        vae.encode(images[:1].float() if vae.dtype == torch.float32 else images[:1])
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """The rate of a large matrix product on random data: the ceiling that this card reaches in practice."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    elapsed = harness.seconds(lambda: [a @ b for _ in range(repeats)])
    return 2 * size**3 * repeats / elapsed / 1e12


# ------------------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def precision_flags(variant: Variant):
    """PyTorch's default TF32 flags (cuDNN convolutions in TF32, matmuls in fp32), or TF32 matmuls too."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = variant.tf32_matmul, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def in_dtype(vae, dtype: torch.dtype):
    """A copy of the VAE with its weights in `dtype`, as uldm.vae loads it for --mixed_precision bf16
    (diffusers' warning about modules to keep in fp32 concerns pretrained weights: none here)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return copy.deepcopy(vae).to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


class Encoders:
    """make_latents for the encode path, per dtype: the VAE encodes a fixed batch of images every step and a
    latent is drawn from the posterior, scaled, in fp32 (the weights do not matter, so they are built once)."""

    def __init__(self, args, device: torch.device, unet_shape: tuple[int, int, int]):
        channels, height, width = unet_shape
        self.vae = models.build_vae(args.vae).to(device)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.vae.config.latent_channels != channels:
            raise SystemExit(f"The VAE {args.vae!r} has {self.vae.config.latent_channels} latent channels, "
                             f"the UNet {args.unet!r} {channels}.")
        shape = (args.train_batch_size, 3, height * factor, width * factor)
        self.images = torch.rand(shape, generator=torch.Generator().manual_seed(3)).to(device) * 2 - 1

    def make_latents(self, dtype: torch.dtype):
        vae = self.vae if dtype == torch.float32 else in_dtype(self.vae, dtype)
        images, scale = self.images.to(dtype), vae.config.scaling_factor

        @torch.no_grad()
        def make_latents(batch_size: int, generator: torch.Generator) -> torch.Tensor:
            return (vae.encode(images[:batch_size]).latent_dist.sample(generator) * scale).float()

        return make_latents


def time_row(step: harness.TrainingStep, args, device: torch.device) -> dict:
    """First step (it compiles, where compiled), the other warm-up steps, then the timed steps (one logging
    interval: the losses are read back as the step's kind says)."""
    first = harness.seconds(lambda: step.run(args.train_batch_size, 1))
    step.run(args.train_batch_size, args.warmup_steps - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = harness.seconds(lambda: step.run(args.train_batch_size, args.steps))
    return {"first_step_s": first, "ms_per_step": 1000 * elapsed / args.steps,
            "images_per_sec": args.train_batch_size * args.steps / elapsed,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def measure_rows(args, device: torch.device, deadline: float, skipped: list[str]) -> list[dict]:
    """Every (variant, data path, step kind) row; one fresh UNet per variant, shared by its rows (compiled once)."""
    shape = models.sample_shape(models.build_unet(args.unet))
    encoders = Encoders(args, device, shape) if "encode" in args.data_paths else None
    rows = []
    for name in args.variants:
        variant = VARIANTS[name]
        plan = [(path, "loop") for path in sorted(args.data_paths, key=lambda p: p != "cache")]
        if name in args.tuned_variants and "cache" in args.data_paths:
            plan.append(("cache", "tuned"))
        with precision_flags(variant):
            unet, forward = harness.prepare_model(args.unet, variant, device)
            for path, step_kind in plan:
                label = f"{name}, {DATA_PATHS[path]}, {step_kind} step"
                if time.monotonic() > deadline:
                    skipped.append(label)
                    print(f"Skipped (out of time): {label}", flush=True)
                    continue
                print(f"Measuring {label}...", flush=True)
                make_latents = None
                if path == "encode":
                    make_latents = encoders.make_latents(torch.bfloat16 if variant.precision == "bf16" else torch.float32)
                step = harness.TrainingStep(unet, forward, dataclasses.replace(variant, **harness.STEP_KINDS[step_kind]),
                                            device, make_latents)
                row = {"variant": name, "precision": variant.precision, "compile": variant.compile,
                       "channels_last": variant.channels_last, "data_path": path, "step": step_kind,
                       **time_row(step, args, device)}
                memory = "" if row["peak_memory_bytes"] is None else f", peak memory {row['peak_memory_bytes'] / 2**30:.1f} GiB"
                print(f"  {row['images_per_sec']:.1f} img/s, {row['ms_per_step']:.1f} ms/step, first step "
                      f"{row['first_step_s']:.1f} s{memory}", flush=True)
                rows.append(row)
                del step
                free_memory()
        del unet, forward
        if variant.compile:
            torch._dynamo.reset()  # drop the compiled graphs, which hold on to the model
        free_memory()
    return rows


def vae_precision_check(args, device: torch.device) -> list[dict]:
    """Encode and decode one batch in fp32, bf16 and fp16: non-finite values and the difference from fp32."""
    vae = models.build_vae(args.vae).to(device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = models.sample_shape(models.build_unet(args.unet))[1] * factor
    images = torch.rand((args.vae_check_batch_size, 3, size, size), generator=torch.Generator().manual_seed(4)) * 2 - 1
    images = images.to(device)
    with torch.no_grad():
        reference_latents = vae.encode(images).latent_dist.mean
        reference_images = vae.decode(reference_latents).sample
    checks = [{"dtype": "fp32", "nonfinite_latents": 0, "nonfinite_images": 0,
               "latents_relative_difference": 0.0, "images_relative_difference": 0.0}]
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        try:
            half = in_dtype(vae, dtype)
            with torch.no_grad():
                latents = half.encode(images.to(dtype)).latent_dist.mean
                decoded = half.decode(latents).sample
        except Exception as error:  # e.g. an operator without a half-precision kernel on the CPU
            checks.append({"dtype": label, "error": f"{type(error).__name__}: {error}"[:500]})
            continue
        checks.append({
            "dtype": label,
            "nonfinite_latents": int((~torch.isfinite(latents)).sum()),
            "nonfinite_images": int((~torch.isfinite(decoded)).sum()),
            "latents_relative_difference": harness.relative_difference([latents.float()], [reference_latents]),
            "images_relative_difference": harness.relative_difference([decoded.float()], [reference_images]),
        })
        del half
    del vae
    free_memory()
    return checks


def measure_parts(args, device: torch.device) -> dict:
    """AdamW fused / foreach / for-loop and EMA foreach / default over the UNet's parameters on the device."""
    spec = {"unet": args.unet, "warmup_steps": 1, "optimizer_steps": args.steps, "device": device.type}
    parts = {"optimizer": harness.measure_optimizer(spec)}
    free_memory()
    parts["ema"] = harness.measure_ema(spec)
    free_memory()
    return parts


# ------------------------------------------------------------------------------------------ run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with report.quick_mode_threads(args):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    device_name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    skip = device_name in ("auto", "cuda") and not torch.cuda.is_available()
    result = report.start_result(NAME, "GPU: the seed recipe's training step (fp32, bf16, torch.compile; "
                                       "latent cache or VAE every step)", args, wait=not skip)
    if skip:
        message = ("No CUDA device: the GPU benchmark (img/s, MFU and peak memory of the seed recipe in fp32, bf16 "
                   "and bf16 + torch.compile, with and without the latent cache) is skipped. Run "
                   "`python bench/bench_gpu.py` on a machine with a GPU (its docstring has the device command).")
        print(message, flush=True)
        result["results"] = {"skipped": True, "reason": message}
        result["notes"].append(message)
        report.finish_result(result, args)
        return result

    device = torch.device(device_name)
    started = time.monotonic()
    deadline = started + 60 * args.max_minutes if args.max_minutes else float("inf")
    unet = models.build_unet(args.unet).to(device)
    unet_flops = training_flops_per_image(unet, device)
    del unet
    vae = models.build_vae(args.vae).to(device)
    size = models.sample_shape(models.build_unet(args.unet))[1] * 2 ** (len(vae.config.block_out_channels) - 1)
    vae_flops = encode_flops_per_image(vae, torch.zeros((1, 3, size, size), device=device))
    del vae
    free_memory()
    peaks = peak_tflops(device, args.peak_tflops)
    matmul_size = 8192 if device.type == "cuda" else 256
    with precision_flags(VARIANTS["tf32"]):
        ceilings = {"bf16": matmul_tflops(device, torch.bfloat16, matmul_size),
                    "tf32": matmul_tflops(device, torch.float32, matmul_size)}
    free_memory()

    skipped: list[str] = []
    rows = measure_rows(args, device, deadline, skipped)
    parts, vae_checks = None, None
    if not args.skip_parts:
        if time.monotonic() < deadline:
            print("Checking the VAE in fp32, bf16 and fp16...", flush=True)
            vae_checks = vae_precision_check(args, device)
        else:
            skipped.append("VAE precision check")
        if time.monotonic() < deadline:
            print("Timing AdamW and EMA implementations...", flush=True)
            parts = measure_parts(args, device)
        else:
            skipped.append("AdamW and EMA implementations")

    add_figures(rows, unet_flops, vae_flops, peaks)
    result["settings"] = {
        "unet": args.unet, "vae": models.vae_label(args.vae), "train_batch_size": args.train_batch_size,
        "latent_shape": list(models.sample_shape(models.build_unet(args.unet))), "image_size": size,
        "warmup_steps": args.warmup_steps, "timed_steps": args.steps, "device": device_description(device),
        "unet_training_gflops_per_image": unet_flops / 1e9, "vae_encode_gflops_per_image": vae_flops / 1e9,
        "peak_tflops": peaks, "measured_matmul_tflops": ceilings, "matmul_size": matmul_size,
        "compile": "torch.compile(unet), inductor, default mode; the VAE stays eager",
        "fp32_flags": "torch.backends.cudnn.allow_tf32=True, torch.backends.cuda.matmul.allow_tf32=False (defaults)",
    }
    result["results"] = {"skipped": False, "rows": rows, "vae_precision_check": vae_checks, "parts": parts,
                         "rows_skipped_for_time": skipped}
    describe(result, args, rows, parts, vae_checks, skipped, device)
    report.finish_result(result, args)
    return result


def device_description(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": "cpu", "name": report.cpu_model()}
    properties = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
            "multiprocessors": properties.multi_processor_count,
            "capability": f"{properties.major}.{properties.minor}", "cuda": torch.version.cuda}


def add_figures(rows: list[dict], unet_flops: float, vae_flops: float, peaks: dict | None) -> None:
    """TFLOP/s, MFU and the ratio to the origin recipe's img/s, per row."""
    baseline = next((r for r in rows if (r["variant"], r["data_path"], r["step"]) == BASELINE), None)
    for row in rows:
        row["unet_tflops"] = unet_flops * row["images_per_sec"] / 1e12
        peak = peaks[row["precision"]] if peaks else None
        row["mfu"] = row["unet_tflops"] / peak if peak else None
        with_vae = unet_flops + (vae_flops if row["data_path"] == "encode" else 0.0)
        row["mfu_with_vae"] = with_vae * row["images_per_sec"] / 1e12 / peak if peak else None
        row["ratio_to_baseline"] = row["images_per_sec"] / baseline["images_per_sec"] if baseline else None


def describe(result: dict, args, rows, parts, vae_checks, skipped, device: torch.device) -> None:
    settings = result["settings"]
    report.add_table(
        result, f"{args.unet}: training step at batch {args.train_batch_size} on {settings['device']['name']} "
                f"(x baseline: img/s over fp32 with the VAE every step and the loop before issue 13)",
        ["variant", "data", "step", "img/s", "ms/step", "first step (s)", "UNet TFLOP/s", "MFU", "MFU with VAE",
         "peak memory (GiB)", "x baseline"],
        [[r["variant"], r["data_path"], r["step"], r["images_per_sec"], r["ms_per_step"], r["first_step_s"],
          r["unet_tflops"], r["mfu"], r["mfu_with_vae"],
          None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**30, r["ratio_to_baseline"]]
         for r in rows])
    peaks = settings["peak_tflops"]
    result["notes"].append(
        f"UNet training FLOPs per image {settings['unet_training_gflops_per_image']:.4g} GFLOP (forward + backward), "
        f"VAE encode {settings['vae_encode_gflops_per_image']:.4g} GFLOP per {settings['image_size']} px image. "
        + (f"MFU against {peaks['source']} peaks: {peaks['bf16']} TFLOP/s bf16 for bf16 rows, {peaks['fp32']} "
           "TFLOP/s TF32 for fp32 rows (their convolutions run in TF32 by PyTorch's default). " if peaks else
           "No peak known for this device: no MFU. ")
        + f"Measured {settings['matmul_size']}^3 matrix products on random data: "
        f"{settings['measured_matmul_tflops']['bf16']:.3g} TFLOP/s bf16, "
        f"{settings['measured_matmul_tflops']['tf32']:.3g} TFLOP/s TF32.")
    result["notes"].append(
        "Rows: 'encode' = the VAE encodes the batch of images every step (they are already on the device: data "
        "loading is not measured); 'cache' = latents ready on the device, UNet only. 'loop' step = "
        "uldm/training.py before issue 13 (foreach AdamW, EMAModel one tensor at a time, a device-to-host "
        "readback every step); 'tuned' = uldm/training/ now (fused AdamW, EMAModel(foreach=True), losses read "
        "back every --logging_steps: here once after the timed steps). "
        "The first step of the first row of a compiled variant includes torch.compile's compilation.")
    if vae_checks:
        report.add_table(result, "VAE in half precision: non-finite values and difference from fp32 "
                                 f"(batch {args.vae_check_batch_size}, random weights)",
                         ["dtype", "non-finite latents", "non-finite decoded", "latents rel. diff.",
                          "decoded rel. diff.", "error"],
                         [[c["dtype"], c.get("nonfinite_latents"), c.get("nonfinite_images"),
                           c.get("latents_relative_difference"), c.get("images_relative_difference"), c.get("error")]
                          for c in vae_checks])
        result["notes"].append(
            "The VAE check has random weights: the real SD-VAE's NaNs in fp16 come from its trained activations "
            "overflowing fp16's range (65504) in the decoder, which random weights do not reproduce; this checks "
            "that the code runs in each dtype and how far the rounding moves the result. bf16 has fp32's range, so "
            "it cannot overflow where fp32 does not; with --vae_precision auto train_unconditional_latent.py runs the "
            "VAE in bf16 under --mixed_precision bf16 when it encodes every step, in fp32 otherwise (with "
            "--cache_latents, fp16, fp32; uldm.vae.vae_dtype_for).")
    if parts:
        optimizer, ema = parts["optimizer"], parts["ema"]
        part_rows = [["AdamW", name, 1000 * seconds, optimizer["step_s"]["for-loop"] / seconds]
                     for name, seconds in optimizer["step_s"].items()]
        part_rows += [["EMAModel", name, 1000 * seconds, ema["step_s"]["default (for-loop)"] / seconds]
                      for name, seconds in ema["step_s"].items()]
        report.add_table(result, f"AdamW and EMA step over the UNet's {optimizer['parameters'] / 1e6:.0f}M "
                                 "parameters on the device", ["what", "implementation", "ms/step", "speed-up"],
                         part_rows)
    if skipped:
        result["notes"].append("Skipped to stay within --max_minutes: " + "; ".join(skipped) + ".")
    cached = [r for r in rows if r["data_path"] == "cache"]
    if device.type == "cuda" and cached and args.unet == "seed-ffhq256-sdvae":
        best = max(cached, key=lambda r: r["images_per_sec"])
        report.add_target(result, "seed UNet on one GPU with the latent cache: about 1,500 img/s (the data-path goal "
                                  "of issue 13 assumes it)",
                          f"{best['images_per_sec']:.0f} img/s ({best['variant']}, {best['step']} step)",
                          best["images_per_sec"] >= 1500)
    if device.type == "cpu":
        result["notes"].append("Run on the CPU to check the code: these figures say nothing about a GPU.")


if __name__ == "__main__":
    main()
