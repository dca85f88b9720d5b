#!/usr/bin/env python
"""Time and memory per image of one training step: the latent UNet against diffusers' pixel-space UNet.

    python bench/bench_train_step.py          # seed latent UNet (4x32x32), pixel UNet (3x256x256), ...
    python bench/bench_train_step.py --quick  # tiny models, seconds

A step is what the training scripts do: noise and timesteps, forward, MSE, backward, gradient
clipping, AdamW step. Each configuration runs in a fresh subprocess at two batch sizes (smaller
first). Memory on the CPU is the subprocess's peak resident set size (getrusage) minus its size
after the imports; on a GPU it is torch.cuda.max_memory_allocated. The per-image cost is the slope
between the two batch sizes, which separates it from the fixed cost (weights, gradients, AdamW's
two moments: 16 bytes per parameter in fp32). From these figures the GPU memory that the ready
scripts' batch sizes need is estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import report  # noqa: E402

NAME = "train_step"
RESULT_PREFIX = "BENCH_RESULT "
GIB = 2**30

# key: (label, UNet (bench.models name or preset), space, precision, batch sizes)
CONFIGS = {
    "seed_latent": ("seed UNet (seed-ffhq256-sdvae), 4x32x32 latents", "seed-ffhq256-sdvae", "latent", "fp32", (1, 2)),
    "pixel_default": ("diffusers' default pixel UNet, 3x256x256", "pixel-default", "pixel", "fp32", (1, 2)),
    "ldm_vqf4": ("LDM paper UNet (ldm-ffhq256-vqf4), 3x64x64 latents", "ldm-ffhq256-vqf4", "latent", "fp32", (1, 2)),
    "small_bf16": ("small UNet (small-sdvae256), 4x32x32, bf16 autocast", "small-sdvae256", "latent", "bf16", (1, 2)),
    "small_fp32": ("small UNet (small-sdvae256), 4x32x32", "small-sdvae256", "latent", "fp32", (1, 2)),
}
QUICK_CONFIGS = {
    "tiny_latent": ("tiny latent UNet, 4x8x8", "tiny", "latent", "fp32", (1, 2)),
    "tiny_pixel": ("tiny pixel UNet, 3x32x32", "tiny-pixel", "pixel", "fp32", (1, 2)),
}
DEFAULT_CONFIGS = ("seed_latent", "pixel_default", "ldm_vqf4", "small_fp32", "small_bf16")

# What the ready scripts run and what their comments assume:
# (script, config key, batch size, card the comment names, its memory in GB).
SCRIPT_ESTIMATES = (
    ("scripts/train_ffhq256_seed.sh", "seed_latent", 84, "an 80 GB card", 80),
    ("scripts/train_ffhq256_seed.sh", "seed_latent", 21, "a 24-40 GB card (4 x 21 accumulation)", 24),
    ("scripts/train_ffhq256_ldm_paper.sh", "ldm_vqf4", 42, "an 80 GB card", 80),
    ("scripts/train_ffhq256_ldm_paper.sh", "ldm_vqf4", 21, "40-48 GB cards (21 x 2 accumulation)", 40),
    ("scripts/train_small_dataset.sh", "small_bf16", 64, "a 24 GB card", 24),
    ("scripts/train_small_dataset.sh", "small_bf16", 32, "12-16 GB cards (BATCH_SIZE=32)", 12),
)
# Room left on a card for the CUDA context, cuDNN workspaces and allocator fragmentation.
CARD_HEADROOM = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS) + sorted(QUICK_CONFIGS),
                        help=f"Configurations to measure (default: {' '.join(DEFAULT_CONFIGS)}; --quick: tiny ones).")
    parser.add_argument("--batch_sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="Two batch sizes for every configuration (default: each configuration's own, 1 and 2).")
    parser.add_argument("--warmup_steps", type=int, default=1,
                        help="Untimed steps at each batch size (at least 1, so AdamW's moments exist at the peak).")
    parser.add_argument("--steps", type=int, default=1, help="Timed steps at each batch size.")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    report.add_common_args(parser)
    args = parser.parse_args(argv)
    report.resolve_output_paths(args)
    if args.configs is None:
        args.configs = list(QUICK_CONFIGS) if args.quick else list(DEFAULT_CONFIGS)
    if args.batch_sizes and not 0 < args.batch_sizes[0] < args.batch_sizes[1]:
        parser.error("--batch_sizes needs two sizes, the first smaller, both at least 1.")
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup_steps and --steps must be at least 1.")
    return args


# ------------------------------------------------------------------------------ in the subprocess


def peak_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_in_this_process(spec: dict) -> dict:
    """Train a fresh model for a few steps at each batch size; time and peak memory per batch size."""
    import torch
    from diffusers import UNet2DModel  # noqa: F401  (imported before the baseline is taken)

    from bench import models
    from uldm.models import count_parameters

    baseline = peak_bytes()  # python, torch and diffusers loaded, no model yet
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.build_unet(spec["unet"]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-6)
    step = models.make_training_step(model, optimizer, models.sample_shape(model), device,
                                     autocast_dtype=torch.bfloat16 if spec["precision"] == "bf16" else None)

    measurements = []
    for batch_size in spec["batch_sizes"]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(spec["warmup_steps"]):
            step(batch_size)
        report.synchronize()
        start = time.perf_counter()
        for _ in range(spec["steps"]):
            step(batch_size)
        report.synchronize()
        seconds = (time.perf_counter() - start) / spec["steps"]
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated()
        else:
            # The peak only grows, so the larger batch (measured second) sets it: it includes the freed
            # and reused memory of the smaller batch.
            memory = peak_bytes() - baseline
        measurements.append({"batch_size": batch_size, "seconds_per_step": seconds, "memory_bytes": memory})
    return {"parameters": count_parameters(model), "measurements": measurements,
            "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS minus baseline",
            "baseline_rss_bytes": baseline, "device": device.type}


# ---------------------------------------------------------------------------------- in the parent


def start_worker(spec: dict) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_result(process: subprocess.Popen, spec: dict) -> dict:
    stdout, stderr = process.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"Measuring {spec['label']} failed (exit {process.returncode}):\n{stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def measure_in_fresh_processes(specs: list[dict], side_by_side: bool) -> list[dict]:
    """One fresh process per configuration, one after the other (side by side only for --quick smoke runs,
    where the figures do not matter and the start-up of python, torch and diffusers dominates)."""
    if side_by_side:
        processes = [start_worker(spec) for spec in specs]
        return [worker_result(process, spec) for process, spec in zip(processes, specs)]
    measured = []
    for spec in specs:
        print(f"Measuring {spec['label']} at batch sizes {spec['batch_sizes']} in a fresh process...", flush=True)
        measured.append(worker_result(start_worker(spec), spec))
    return measured


def summarise(spec: dict, measured: dict) -> dict:
    (small, large) = measured["measurements"]
    images = large["batch_size"] - small["batch_size"]
    memory_per_image = (large["memory_bytes"] - small["memory_bytes"]) / images
    seconds_per_image_slope = (large["seconds_per_step"] - small["seconds_per_step"]) / images
    return {
        "label": spec["label"], "unet": spec["unet"], "space": spec["space"], "precision": spec["precision"],
        "parameters": measured["parameters"], "memory_kind": measured["memory_kind"],
        "measurements": measured["measurements"],
        # Per-image time at the larger batch (the slope is noisier with one timed step).
        "seconds_per_image": large["seconds_per_step"] / large["batch_size"],
        "seconds_per_image_slope": seconds_per_image_slope,
        "memory_per_image_bytes": memory_per_image,
        "memory_fixed_bytes": small["memory_bytes"] - memory_per_image * small["batch_size"],
        "expected_fixed_bytes": 16 * measured["parameters"],
    }


def script_estimates(configs: dict) -> list[dict]:
    """GPU memory that the ready scripts' batch sizes need, from the CPU-measured fixed + per-image cost.

    The EMA copy of the weights (all scripts use --use_ema) is added: 4 bytes per parameter.
    """
    estimates = []
    for script, key, batch_size, card, card_gb in SCRIPT_ESTIMATES:
        if key not in configs:
            continue
        config = configs[key]
        needed = (max(config["memory_fixed_bytes"], config["expected_fixed_bytes"])
                  + batch_size * config["memory_per_image_bytes"] + 4 * config["parameters"])
        estimates.append({
            "script": script, "config": key, "batch_size": batch_size, "precision": config["precision"],
            "estimated_gb": needed / 1e9, "assumed_card": card, "card_gb": card_gb,
            "fits": needed <= CARD_HEADROOM * card_gb * 1e9,
        })
    return estimates


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    with report.quick_mode_threads(args):
        return run(args)


def run(args: argparse.Namespace) -> dict | None:
    if args.worker:
        print(RESULT_PREFIX + json.dumps(measure_in_this_process(json.loads(args.worker))), flush=True)
        return None

    result = report.start_result(NAME, "Training step: time and memory per image", args)
    table = {**CONFIGS, **QUICK_CONFIGS}
    specs = []
    for key in args.configs:
        label, unet, space, precision, batch_sizes = table[key]
        specs.append({"key": key, "label": label, "unet": unet, "space": space, "precision": precision,
                      "batch_sizes": list(args.batch_sizes or batch_sizes), "warmup_steps": args.warmup_steps,
                      "steps": args.steps, "threads": 1 if args.quick else None})
    measured = measure_in_fresh_processes(specs, side_by_side=args.quick)
    configs = {spec["key"]: summarise(spec, result) for spec, result in zip(specs, measured)}
    estimates = script_estimates(configs)

    result["settings"] = {"warmup_steps": args.warmup_steps, "timed_steps": args.steps,
                          "optimizer": "AdamW", "gradient_clipping": 1.0}
    result["results"] = {"configs": configs, "script_estimates": estimates}
    report.add_table(result, "One training step (forward, backward, clipping, AdamW)",
                     ["configuration", "params (M)", "batch sizes", "s/image", "memory/image (GiB)",
                      "fixed memory (GiB)", "16 B/param (GiB)"],
                     [[c["label"], c["parameters"] / 1e6, " & ".join(str(m["batch_size"]) for m in c["measurements"]),
                       c["seconds_per_image"], c["memory_per_image_bytes"] / GIB, c["memory_fixed_bytes"] / GIB,
                       c["expected_fixed_bytes"] / GIB] for c in configs.values()])
    latent = next((c for c in configs.values() if c["space"] == "latent" and c["precision"] == "fp32"), None)
    pixel = next((c for c in configs.values() if c["space"] == "pixel"), None)
    if latent and pixel:
        comparison = {"time_ratio": pixel["seconds_per_image"] / latent["seconds_per_image"],
                      "memory_per_image_ratio": pixel["memory_per_image_bytes"] / latent["memory_per_image_bytes"]}
        result["results"]["pixel_over_latent"] = comparison
        result["notes"].append(
            f"Per image, the pixel-space UNet's step takes {comparison['time_ratio']:.1f}x the time and "
            f"{comparison['memory_per_image_ratio']:.1f}x the activation memory of the latent UNet's "
            f"({pixel['label']} vs {latent['label']}).")
    if estimates:
        report.add_table(result, "Estimated GPU memory for the ready scripts (CPU-measured estimates)",
                         ["script", "batch", "precision", "estimate (GB)", "script assumes", "consistent"],
                         [[e["script"], e["batch_size"], e["precision"], e["estimated_gb"], e["assumed_card"],
                           e["fits"]] for e in estimates])
        result["notes"].append(
            "The GPU figures are estimates from CPU measurements: fixed memory (the larger of the measured one and "
            "16 B/parameter) + batch x measured memory per image + the EMA copy (4 B/parameter). The CPU runs "
            "attention without memory-efficient SDPA and keeps freed memory in its allocator, so a GPU usually "
            "needs less; the CUDA context (~0.5-1 GB) is not included. 'consistent' means the estimate is within "
            f"{CARD_HEADROOM:.0%} of the card the script's comment names.")
        for estimate in estimates:
            if not estimate["fits"]:
                message = (f"{estimate['script']}: batch {estimate['batch_size']} ({estimate['precision']}) is "
                           f"estimated to need {estimate['estimated_gb']:.0f} GB, more than {estimate['assumed_card']} "
                           "that its comment names: the script's comment should be revised.")
                result["notes"].append(message)
                print("WARNING: " + message, flush=True)
    if any(c["precision"] == "bf16" for c in configs.values()) and not configs[next(iter(configs))]["memory_kind"].startswith("cuda"):
        result["notes"].append("bf16 on this CPU runs without bf16 hardware: its time is not meaningful, its memory is.")
    report.finish_result(result, args)
    return result


if __name__ == "__main__":
    main()
