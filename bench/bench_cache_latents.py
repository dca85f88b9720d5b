#!/usr/bin/env python
"""Training images/s of train_unconditional_latent.py with and without --cache_latents.

    python bench/bench_cache_latents.py            # 256 px, Stable Diffusion's VAE layout (random weights)
    python bench/bench_cache_latents.py --quick    # tiny sizes, seconds

For each UNet (--unets) the real training script runs twice in this process (`main(argv)`)
on a folder of generated images, once encoding every batch and once with --cache_latents; images/s
come from its metrics.jsonl, the first --warmup_steps steps left out. The time spent building the
cache (encoding every image, and its mirror image with --random_flip) is measured separately (the
first cached run builds it, later ones reuse it) and reported both apart ("steady state") and
spread over N epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench import harness, models, report  # noqa: E402

NAME = "cache_latents"
TARGET_SPEEDUP = 1.5
# name: (full, quick)
DEFAULTS = {
    "resolution": (256, 32),
    "num_images": (4, 4),
    "train_batch_size": (2, 2),
    "warmup_steps": (1, 1),
    "steps": (3, 2),
    "unets": (["small-sdvae256", "seed-ffhq256-sdvae"], ["tiny"]),
    "vae": ("sd", "tiny-kl-f4"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=None, help="Image size (default 256; --quick 32).")
    parser.add_argument("--num_images", type=int, default=None, help="Images in the generated data set (default 4).")
    parser.add_argument("--train_batch_size", type=int, default=None, help="Default 2.")
    parser.add_argument("--steps", type=int, default=None, help="Timed training steps per run (default 3; --quick 2).")
    parser.add_argument("--warmup_steps", type=int, default=None, help="Steps before the timed ones, left out (default 1).")
    parser.add_argument("--unets", nargs="+", default=None,
                        help="UNets: presets (default small-sdvae256 seed-ffhq256-sdvae, the recipes' UNets; --quick: "
                             "tiny), 'cpu-latent' (a reduced one) or JSON files. Their sample_size must match the latents.")
    parser.add_argument("--vae", type=str, default=None,
                        help="'sd' (Stable Diffusion's VAE layout, default) or a configs/vae preset (--quick: tiny-kl-f4).")
    parser.add_argument("--no_random_flip", action="store_true",
                        help="Train without --random_flip (the cache then stores one encoding per image, not two).")
    parser.add_argument("--amortise_epochs", type=int, nargs="+", default=[1, 10, 100],
                        help="Epoch counts over which the one-off encoding is spread.")
    args = report.parse_benchmark_args(parser, argv, DEFAULTS)
    for name in ("resolution", "num_images", "train_batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.warmup_steps < 0:
        parser.error("--warmup_steps must be 0 or more.")
    return args


def make_images(folder: Path, count: int, resolution: int) -> None:
    """Smooth random colour images (PNG decoding and resizing cost what real photos cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        coarse = np.random.default_rng(index).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((resolution, resolution), Image.BICUBIC)
        image.save(folder / f"{index:04d}.png")


def train_images_per_sec(argv: list[str], warmup_steps: int) -> tuple[float, float]:
    """Run the training script in this process: (images/s of the steps after the warm-up, seconds spent
    building or loading a latent cache)."""
    from uldm.testing import run_script_in_this_process

    with harness.timing_cache_builds() as cache_timer:
        run_script_in_this_process("train_unconditional_latent", argv)
    output_dir = argv[argv.index("--output_dir") + 1]
    seconds, steps = harness.loop_seconds(output_dir, skip=warmup_steps)
    if not steps:
        raise RuntimeError(f"No training steps after the {warmup_steps} warm-up steps were logged.")
    batch_size = int(argv[argv.index("--train_batch_size") + 1])
    return batch_size * steps / seconds, cache_timer.seconds


def training_argv(args, images: Path, vae_dir: Path, unet_config: Path, output_dir: Path) -> list[str]:
    argv = [
        "--train_data_dir", images, "--vae_name_or_path", vae_dir, "--model_config_name_or_path", unet_config,
        "--resolution", args.resolution, "--center_crop", "--train_batch_size", args.train_batch_size,
        "--max_train_steps", args.warmup_steps + args.steps, "--lr_warmup_steps", 0, "--mixed_precision", "no",
        "--validation_steps", 0, "--num_validation_images", 0, "--checkpointing_steps", 0,
        "--report_to", "none", "--output_dir", output_dir,
    ]
    if not args.no_random_flip:
        argv.append("--random_flip")
    return [str(value) for value in argv]


def speeds_for_unet(args, work: Path, unet: str) -> dict:
    """Steady images/s without and with the cache for one UNet, and the seconds spent building the cache."""
    config = work / f"unet-{Path(unet).stem}.json"
    config.write_text(json.dumps(models.unet_config(unet)))
    plain, _ = train_images_per_sec(training_argv(args, work / "images", work / "vae", config, work / "plain"),
                                     args.warmup_steps)
    cached_argv = training_argv(args, work / "images", work / "vae", config, work / "cached")
    cached, cache_build_or_load_s = train_images_per_sec(
        cached_argv + ["--cache_latents", "--latent_cache_dir", str(work / "latent_cache")], args.warmup_steps)
    for output in ("plain", "cached"):  # the next UNet starts a fresh run, not a resumed one
        shutil.rmtree(work / output)
    return {"images_per_sec_without_cache": plain, "images_per_sec_with_cache": cached,
            "speedup_steady_state": cached / plain, "cache_build_or_load_s": cache_build_or_load_s}


def amortised_speeds(cached: float, plain: float, cache_s_per_image: float, epochs: list[int]) -> list[dict]:
    """Images/s with the cache when the one-off encoding is spread over N epochs (per image: its share + a step)."""
    amortised = []
    for n in epochs:
        images_per_sec = 1.0 / (cache_s_per_image / n + 1.0 / cached)
        amortised.append({"epochs": n, "images_per_sec": images_per_sec, "speedup": images_per_sec / plain})
    return amortised


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with report.quick_mode_threads(args):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    from uldm.models import count_parameters

    result = report.start_result(NAME, "Training with and without --cache_latents", args)
    unets = {}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as temporary:
        work = Path(temporary)
        make_images(work / "images", args.num_images, args.resolution)
        vae = models.build_vae(args.vae)
        vae.save_pretrained(work / "vae")
        for unet in args.unets:
            print(f"Training {unet} without and with --cache_latents...", flush=True)
            unets[unet] = speeds_for_unet(args, work, unet)
            unets[unet]["parameters"] = count_parameters(models.build_unet(unet))
    # The first cached run built the cache; the later ones only loaded it.
    cache_build_s = unets[args.unets[0]]["cache_build_or_load_s"]
    cache_s_per_image = cache_build_s / args.num_images
    for speeds in unets.values():
        speeds["amortised"] = amortised_speeds(speeds["images_per_sec_with_cache"],
                                               speeds["images_per_sec_without_cache"], cache_s_per_image,
                                               args.amortise_epochs)
    encodes_per_image = 1 if args.no_random_flip else 2

    result["settings"] = {
        "resolution": args.resolution, "num_images": args.num_images, "train_batch_size": args.train_batch_size,
        "warmup_steps": args.warmup_steps, "timed_steps": args.steps, "random_flip": not args.no_random_flip,
        "unets": {unet: models.unet_label(unet) for unet in args.unets}, "vae": models.vae_label(args.vae),
        "vae_parameters": count_parameters(vae), "dataloader_num_workers": 0,
    }
    result["results"] = {
        "unets": unets,
        "cache_build_s": cache_build_s,
        "cache_build_s_per_image": cache_s_per_image,
        "encodes_per_image": encodes_per_image,
    }
    rows = []
    for unet, speeds in unets.items():
        plain, cached = speeds["images_per_sec_without_cache"], speeds["images_per_sec_with_cache"]
        rows += [[unet, "encode every step (no cache)", plain, 1 / plain, 1.0],
                 [unet, "--cache_latents, steady state", cached, 1 / cached, speeds["speedup_steady_state"]]]
        rows += [[unet, f"--cache_latents incl. the one-off encoding over {e['epochs']} epoch(s)",
                  e["images_per_sec"], 1 / e["images_per_sec"], e["speedup"]] for e in speeds["amortised"]]
    report.add_table(result, f"Training images/s at {args.resolution} px, batch {args.train_batch_size}",
                     ["UNet", "run", "images/s", "s/image", "speed-up"], rows)
    report.add_table(result, "Building the cache (one-off)",
                     ["images", "encodes per image", "seconds", "s per image"],
                     [[args.num_images, encodes_per_image, cache_build_s, cache_s_per_image]])
    for unet, speeds in unets.items():
        speedup = speeds["speedup_steady_state"]
        if args.resolution == 256:
            report.add_target(result, f"{unet}: cached latents ≥ {TARGET_SPEEDUP}x the images/s of encoding every "
                                      "step at 256 px",
                              f"{speedup:.2f}x ({speeds['images_per_sec_with_cache']:.3g} vs "
                              f"{speeds['images_per_sec_without_cache']:.3g} images/s)", speedup >= TARGET_SPEEDUP)
        else:
            report.add_target(result, f"{unet}: cached latents ≥ {TARGET_SPEEDUP}x at 256 px",
                              f"not judged at {args.resolution} px ({speedup:.2f}x here)", None)
    result["notes"] += [
        "UNets: " + ", ".join(f"{models.unet_label(unet)} ({speeds['parameters'] / 1e6:.1f}M parameters)"
                              for unet, speeds in unets.items())
        + f"; VAE: {result['settings']['vae']}, {count_parameters(vae) / 1e6:.1f}M parameters; fp32; data loading "
        "in the training process (0 workers).",
        "The gain depends on how the encoder's cost compares with the UNet's training step: the smaller the UNet, "
        "the larger the gain. Without the cache each image is encoded once per step (the mirror image is "
        "encoded instead when flipped); the cache stores the encoding of the image and of its mirror image.",
    ]
    report.finish_result(result, args)
    return result


if __name__ == "__main__":
    main()
