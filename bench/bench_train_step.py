#!/usr/bin/env python
"""Time and memory per image of one training step: the latent UNet against diffusers' pixel-space UNet.

    python bench/bench_train_step.py          # seed latent UNet (4x32x32), pixel UNet (3x256x256), ...
    python bench/bench_train_step.py --quick  # tiny models, seconds

A step is the training loop's (bench/harness.py: the trainer's loss, backward, clipping, its AdamW,
the losses read back once per logging interval). Each configuration runs in a fresh subprocess at two batch sizes (smaller
first). Memory on the CPU is the subprocess's peak resident set size during that batch size's steps
(VmHWM, reset before each batch size through /proc/self/clear_refs) minus its resident size after
the imports; on a GPU it is torch.cuda.max_memory_allocated. The per-image cost is the slope
between the two batch sizes, which separates it from the fixed cost (weights, gradients, AdamW's
two moments: 16 bytes per parameter in fp32). From these figures the GPU memory that the ready
scripts' batch sizes need is estimated.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402

NAME = "train_step"
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
    # Batches far apart, so the activations of tiny models stand out from the allocator's noise.
    "tiny_latent": ("tiny latent UNet, 4x8x8", "tiny", "latent", "fp32", (2, 16)),
    "tiny_pixel": ("tiny pixel UNet, 3x32x32", "tiny-pixel", "pixel", "fp32", (2, 16)),
}
DEFAULT_CONFIGS = ("seed_latent", "pixel_default", "ldm_vqf4", "small_fp32", "small_bf16")

# What the ready scripts run and what their comments assume:
# (script, config key, batch size, card the comment names, its memory in GB).
SCRIPT_ESTIMATES = (
    ("scripts/train_ffhq256_seed.sh", "seed_latent", 84, "a 32-40 GB card", 32),
    ("scripts/train_ffhq256_seed.sh", "seed_latent", 21, "12-24 GB cards (4 x 21 accumulation)", 12),
    ("scripts/train_ffhq256_ldm_paper.sh", "ldm_vqf4", 42, "a 40-48 GB card", 40),
    ("scripts/train_ffhq256_ldm_paper.sh", "ldm_vqf4", 21, "24-32 GB cards (21 x 2 accumulation)", 24),
    ("scripts/train_small_dataset.sh", "small_bf16", 64, "an 8-12 GB card", 8),
    ("scripts/train_small_dataset.sh", "small_bf16", 32, "cards under 8 GB (BATCH_SIZE=32)", 6),
)
# Room left on a card for the CUDA context, cuDNN workspaces and allocator fragmentation.
CARD_HEADROOM = 0.9
# Below this share of the named card, the script's comment asks for a much larger card than needed.
OVERSTATED_BELOW = 0.5
CARD_SIZES_GB = (8, 12, 16, 24, 32, 40, 48, 80, 141)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS) + sorted(QUICK_CONFIGS),
                        help=f"Configurations to measure (default: {' '.join(DEFAULT_CONFIGS)}; --quick: tiny ones).")
    parser.add_argument("--batch_sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="Two batch sizes for every configuration (default: each configuration's own: 1 and 2; "
                             "--quick 2 and 16).")
    parser.add_argument("--warmup_steps", type=int, default=1,
                        help="Untimed steps at each batch size (at least 1, so AdamW's moments exist at the peak).")
    parser.add_argument("--steps", type=int, default=1, help="Timed steps at each batch size.")
    parser.add_argument("--rereport", action="store_true",
                        help="Measure nothing: rebuild the tables and the ready scripts' memory verdicts from the "
                             "saved results (e.g. after a script's comment changed).")
    args = report.parse_benchmark_args(parser, argv)
    if args.configs is None:
        args.configs = list(QUICK_CONFIGS) if args.quick else list(DEFAULT_CONFIGS)
    if args.batch_sizes and not 0 < args.batch_sizes[0] < args.batch_sizes[1]:
        parser.error("--batch_sizes needs two sizes, the first smaller, both at least 1.")
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup_steps and --steps must be at least 1.")
    return args


# ------------------------------------------------------------------------------ in the subprocess


def process_status_bytes(field: str) -> int | None:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in bytes."""
    kib = report.proc_kib("/proc/self/status", field)
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Set the peak resident size back to the current one (Linux >= 4.0); False where that is impossible.

    Without it the peak would still hold transient memory of the imports, which tiny models never exceed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size since the last reset (getrusage's ru_maxrss, in KiB, never resets)."""
    return process_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(spec: dict) -> dict:
    """Train a fresh model for a few steps at each batch size; time and peak memory per batch size."""
    import torch
    from diffusers import UNet2DModel  # noqa: F401  (imported before the baseline is taken)

    from bench import harness
    from uldm.models import count_parameters

    baseline = process_status_bytes("VmRSS") or peak_rss()  # python, torch and diffusers loaded, no model yet
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variant = harness.Variant(precision=spec["precision"])
    model, forward = harness.prepare_model(spec["unet"], variant, device)
    step = harness.TrainingStep(model, forward, variant, device)
    measurements = []
    peak_resets = True
    for batch_size in spec["batch_sizes"]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            peak_resets = reset_peak_rss() and peak_resets
        step.run(batch_size, spec["warmup_steps"])
        seconds = harness.seconds(lambda: step.run(batch_size, spec["steps"])) / spec["steps"]
        # Where the peak cannot be reset it only grows; the larger batch, measured second, then sets it.
        memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss() - baseline
        measurements.append({"batch_size": batch_size, "seconds_per_step": seconds, "memory_bytes": memory})
    return {"parameters": count_parameters(model), "measurements": measurements,
            "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS minus baseline",
            "peak_reset_per_batch_size": device.type == "cuda" or peak_resets,
            "baseline_rss_bytes": baseline, "device": device.type}


# ---------------------------------------------------------------------------------- in the parent


def measure_in_fresh_processes(specs: list[dict], side_by_side: bool) -> list[dict]:
    """One fresh process per configuration, one after the other (side by side only for --quick smoke runs,
    where the figures do not matter and the start-up of python, torch and diffusers dominates)."""
    from bench import harness

    if side_by_side:
        processes = [harness.start_worker("bench_train_step:measure", spec) for spec in specs]
        return [harness.worker_result(process, spec["label"]) for process, spec in zip(processes, specs)]
    measured = []
    for spec in specs:
        print(f"Measuring {spec['label']} at batch sizes {spec['batch_sizes']} in a fresh process...", flush=True)
        measured.append(harness.in_fresh_process("bench_train_step:measure", spec, spec["label"]))
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
        share = needed / (card_gb * 1e9)
        smallest = next((size for size in CARD_SIZES_GB if needed <= CARD_HEADROOM * size * 1e9), None)
        # Naming the smallest common card that fits is never an overstatement, however little it uses.
        overstated = share < OVERSTATED_BELOW and (smallest is None or card_gb > smallest)
        verdict = ("more than that card" if share > CARD_HEADROOM else
                   "far less than that card" if overstated else "fits that card")
        estimates.append({
            "script": script, "config": key, "batch_size": batch_size, "precision": config["precision"],
            "estimated_gb": needed / 1e9, "assumed_card": card, "card_gb": card_gb, "verdict": verdict,
            "consistent": verdict == "fits that card", "smallest_card_gb": smallest,
        })
    return estimates


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with report.quick_mode_threads(args):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    if args.rereport:
        return rereport(args)

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
    result["settings"] = {"warmup_steps": args.warmup_steps, "timed_steps": args.steps,
                          "optimizer": "AdamW", "gradient_clipping": 1.0}
    describe(result, configs)
    report.finish_result(result, args)
    return result


def rereport(args: argparse.Namespace) -> dict:
    """Tables, notes and script estimates rebuilt from the saved measurements (after a script's comment changed)."""
    path = Path(args.results_dir) / f"{NAME}.json"
    if not path.is_file():
        raise SystemExit(f"--rereport needs earlier results in {path}: run this benchmark without it first.")
    result = json.loads(path.read_text())
    result.update(tables=[], notes=[], targets=[])
    describe(result, result["results"]["configs"])
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Rebuilt {path} from its measurements; report: {report.write_report(args.results_dir, args.report)}")
    return result


def describe(result: dict, configs: dict) -> None:
    """The tables, comparisons and memory estimates of `configs` (measured), added to `result`."""
    estimates = script_estimates(configs)
    result["results"] = {"configs": configs, "script_estimates": estimates}
    report.add_table(result, "One training step (forward, backward, clipping, AdamW)",
                     ["configuration", "params (M)", "batch sizes", "s/image", "memory/image (GiB)",
                      "fixed memory (GiB)", "16 B/param (GiB)"],
                     [[c["label"], c["parameters"] / 1e6, " & ".join(str(m["batch_size"]) for m in c["measurements"]),
                       c["seconds_per_image"], c["memory_per_image_bytes"] / GIB, c["memory_fixed_bytes"] / GIB,
                       c["expected_fixed_bytes"] / GIB] for c in configs.values()])
    latent = next((c for c in configs.values() if c["space"] == "latent" and c["precision"] == "fp32"), None)
    pixel = next((c for c in configs.values() if c["space"] == "pixel"), None)
    if latent and pixel and latent["memory_per_image_bytes"] > 0:
        comparison = {"time_ratio": pixel["seconds_per_image"] / latent["seconds_per_image"],
                      "memory_per_image_ratio": pixel["memory_per_image_bytes"] / latent["memory_per_image_bytes"]}
        result["results"]["pixel_over_latent"] = comparison
        result["notes"].append(
            f"Per image, the pixel-space UNet's step takes {comparison['time_ratio']:.1f}x the time and "
            f"{comparison['memory_per_image_ratio']:.1f}x the activation memory of the latent UNet's "
            f"({pixel['label']} vs {latent['label']}).")
    if estimates:
        report.add_table(result, "Estimated GPU memory for the ready scripts (CPU-measured estimates)",
                         ["script", "batch", "precision", "estimate (GB)", "the script's comment names", "verdict",
                          "smallest card that fits (GB)"],
                         [[e["script"], e["batch_size"], e["precision"], e["estimated_gb"], e["assumed_card"],
                           e["verdict"], e["smallest_card_gb"]] for e in estimates])
        result["notes"].append(
            "The GPU figures are estimates from CPU measurements: fixed memory (the larger of the measured one and "
            "16 B/parameter) + batch x measured memory per image + the EMA copy (4 B/parameter). They assume the "
            "GPU saves the same activations as the CPU (PyTorch's SDPA picks a memory-efficient attention kernel on "
            "both); the CPU figure is a peak RSS, which also counts memory freed but kept by the allocator, so a GPU "
            "usually needs somewhat less. Not included: the CUDA context (~0.5-1 GB) and cuDNN workspaces. "
            f"'fits that card' means within {CARD_HEADROOM:.0%} of the card the script's comment names; 'far less' "
            f"means under {OVERSTATED_BELOW:.0%} of it.")
        for estimate in estimates:
            if not estimate["consistent"]:
                message = (f"{estimate['script']}: batch {estimate['batch_size']} ({estimate['precision']}) is "
                           f"estimated to need {estimate['estimated_gb']:.0f} GB, {estimate['verdict']} its comment "
                           f"names ({estimate['assumed_card']}); a {estimate['smallest_card_gb']} GB card should do. "
                           "The comment should be revised.")
                result["notes"].append(message)
                print("NOTE: " + message, flush=True)
    on_cpu = all(c["memory_kind"] == "peak RSS minus baseline" for c in configs.values())
    if on_cpu and any(c["precision"] == "bf16" for c in configs.values()):
        result["notes"].append("bf16 on this CPU runs without bf16 hardware: its time is not meaningful, its memory is.")


if __name__ == "__main__":
    main()
