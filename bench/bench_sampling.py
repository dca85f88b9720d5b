#!/usr/bin/env python
"""Sampling images/s per scheduler and step count, and the VAE decode's share, through UnconditionalLatentPipeline.

    python bench/bench_sampling.py            # 1000-step DDPM, 50 DDIM, 25 DPM-Solver++, 25 UniPC, 50 Euler
    python bench/bench_sampling.py --quick    # tiny models, few steps, seconds

The pipeline holds a random-weight UNet and a VAE with Stable Diffusion's layout (256 px images).
The decode time is taken inside each call (`decode_latents`), so its share is that of the same run.
To see what the schedulers' speed-up becomes with the full-size UNets, their forward pass is timed
too (--projection_unets) and the DDPM/DPM-Solver++ ratio is projected with the measured decode.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import models, report  # noqa: E402

NAME = "sampling"
TARGET_RATIO = 30.0
FULL_SCHEDULERS = ("ddpm:1000", "ddim:50", "dpmsolver++:25", "unipc:25", "euler:50")
QUICK_SCHEDULERS = ("ddpm:20", "ddim:5", "dpmsolver++:4", "unipc:4", "euler:5")
# name: (full, quick)
DEFAULTS = {
    "unet": ("cpu-latent", "tiny"),
    "vae": ("sd", "tiny-kl-f4"),
    "num_images": (1, 2),
    "schedulers": (list(FULL_SCHEDULERS), list(QUICK_SCHEDULERS)),
    "projection_unets": (["small-sdvae256", "seed-ffhq256-sdvae"], []),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", type=str, default=None,
                        help="Sampling UNet: 'cpu-latent' (default), a preset (small-sdvae256, seed-ffhq256-sdvae) or JSON.")
    parser.add_argument("--vae", type=str, default=None, help="'sd' (default) or a configs/vae preset.")
    parser.add_argument("--num_images", type=int, default=None, help="Images per pipeline call (default 1; --quick 2).")
    parser.add_argument("--schedulers", nargs="+", default=None, metavar="NAME:STEPS",
                        help=f"Schedulers and step counts (default: {' '.join(FULL_SCHEDULERS)}).")
    parser.add_argument("--projection_unets", nargs="*", default=None,
                        help="UNets whose forward pass is timed to project the scheduler ratio (default: "
                             "small-sdvae256 seed-ffhq256-sdvae; none with --quick).")
    args = report.parse_benchmark_args(parser, argv, DEFAULTS)
    args.schedulers = [parse_scheduler(parser, text) for text in args.schedulers]
    if args.num_images < 1:
        parser.error("--num_images must be at least 1.")
    return args


def parse_scheduler(parser: argparse.ArgumentParser, text: str) -> tuple[str, int]:
    from uldm.sampling import SCHEDULER_NAMES

    name, _, steps = text.partition(":")
    if name not in SCHEDULER_NAMES or not steps.isdigit() or int(steps) < 1:
        parser.error(f"--schedulers takes NAME:STEPS with NAME in {', '.join(SCHEDULER_NAMES)}, got {text!r}.")
    return name, int(steps)


def build_pipeline(unet_name: str, vae_name: str, device: torch.device):
    from pipeline_latent_uncond import UnconditionalLatentPipeline
    from uldm.diffusion import build_noise_scheduler

    pipeline = UnconditionalLatentPipeline(unet=models.build_unet(unet_name).eval(), vae=models.build_vae(vae_name),
                                           scheduler=build_noise_scheduler(), latent_scaling_factor=0.18215)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def time_sampling(pipeline, base_config, scheduler: str, steps: int, num_images: int) -> dict:
    """One pipeline call (noise to decoded images); the decode is timed inside the same call."""
    from uldm.sampling import make_scheduler

    pipeline.scheduler = make_scheduler(scheduler, base_config)
    generator = torch.Generator().manual_seed(0)
    with report.timing_calls(pipeline, "decode_latents") as decode:
        report.synchronize()
        start = time.perf_counter()
        pipeline(batch_size=num_images, num_inference_steps=steps, generator=generator, output_type="np")
        report.synchronize()
        seconds = time.perf_counter() - start
    denoise = seconds - decode.seconds
    return {"scheduler": scheduler, "steps": steps, "seconds": seconds, "images_per_sec": num_images / seconds,
            "decode_seconds": decode.seconds, "decode_share": decode.seconds / seconds,
            "denoise_seconds": denoise, "unet_seconds_per_step": denoise / steps}


@torch.no_grad()
def unet_forward_seconds(unet_name: str, num_images: int, device: torch.device, repeats: int = 3) -> tuple[float, int]:
    """Median seconds of one forward pass at this batch size (after one untimed pass), and the parameter count."""
    from uldm.models import count_parameters

    unet = models.build_unet(unet_name).eval().to(device)
    latents = torch.randn((num_images, *models.sample_shape(unet)), device=device)
    timestep = torch.tensor([500], device=device)
    unet(latents, timestep)
    times = []
    for _ in range(repeats):
        report.synchronize()
        start = time.perf_counter()
        unet(latents, timestep)
        report.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], count_parameters(unet)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with report.quick_mode_threads(args):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    from uldm.models import count_parameters

    result = report.start_result(NAME, "Sampling speed per scheduler", args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = build_pipeline(args.unet, args.vae, device)
    base_config = pipeline.scheduler.config
    # One short call first: the first call of a process pays one-off costs (allocations, kernel choice).
    time_sampling(pipeline, base_config, "dpmsolver++", 2, args.num_images)
    runs = []
    for scheduler, steps in args.schedulers:
        print(f"Sampling {args.num_images} image(s) with {scheduler}, {steps} steps...", flush=True)
        runs.append(time_sampling(pipeline, base_config, scheduler, steps, args.num_images))
    decode_seconds = sum(run["decode_seconds"] for run in runs) / len(runs)

    result["settings"] = {
        "unet": models.unet_label(args.unet),
        "unet_parameters": count_parameters(pipeline.unet),
        "vae": models.vae_label(args.vae),
        "vae_parameters": count_parameters(pipeline.vae),
        "num_images_per_call": args.num_images, "device": device.type, "precision": "fp32",
        "latent_shape": list(pipeline.latent_shape(1)[1:]),
    }
    result["results"] = {"runs": runs, "mean_decode_seconds": decode_seconds}
    report.add_table(result, f"UnconditionalLatentPipeline, {args.num_images} image(s) per call",
                     ["scheduler", "steps", "seconds", "images/s", "UNet s/step", "VAE decode share"],
                     [[r["scheduler"], r["steps"], r["seconds"], r["images_per_sec"], r["unet_seconds_per_step"],
                       f"{r['decode_share']:.1%}"] for r in runs])

    by_setting = {(r["scheduler"], r["steps"]): r for r in runs}
    ddpm, dpm = by_setting.get(("ddpm", 1000)), by_setting.get(("dpmsolver++", 25))
    if ddpm and dpm:
        ratio = dpm["images_per_sec"] / ddpm["images_per_sec"]
        denoise_ratio = ddpm["denoise_seconds"] / dpm["denoise_seconds"]
        result["results"]["dpmsolver25_over_ddpm1000"] = ratio
        result["results"]["dpmsolver25_over_ddpm1000_denoising_only"] = denoise_ratio
        report.add_target(result, f"25-step DPM-Solver++ ≥ {TARGET_RATIO:.0f}x the images/s of 1000-step DDPM "
                                  "(same model, decode included)",
                          f"{ratio:.1f}x end to end; {denoise_ratio:.1f}x for the denoising loop alone",
                          ratio >= TARGET_RATIO)
    else:
        report.add_target(result, f"25-step DPM-Solver++ ≥ {TARGET_RATIO:.0f}x the images/s of 1000-step DDPM",
                          "not judged: both ddpm:1000 and dpmsolver++:25 must be measured", None)

    projections = []
    for unet_name in args.projection_unets:
        print(f"Timing the forward pass of {unet_name}...", flush=True)
        forward_s, parameters = unet_forward_seconds(unet_name, args.num_images, device)
        ddpm_s, dpm_s = 1000 * forward_s + decode_seconds, 25 * forward_s + decode_seconds
        projections.append({"unet": unet_name, "parameters": parameters, "forward_seconds": forward_s,
                            "ddpm1000_seconds": ddpm_s, "dpmsolver25_seconds": dpm_s, "ratio": ddpm_s / dpm_s})
    if projections:
        result["results"]["projections"] = projections
        report.add_table(result, "Projected with full-size UNets (their forward pass timed here, the decode above)",
                         ["UNet", "params (M)", "forward s", "DDPM 1000 s", "DPM-Solver++ 25 s", "ratio"],
                         [[p["unet"], p["parameters"] / 1e6, p["forward_seconds"], p["ddpm1000_seconds"],
                           p["dpmsolver25_seconds"], p["ratio"]] for p in projections])
    result["notes"] += [
        f"UNet {result['settings']['unet']} ({result['settings']['unet_parameters'] / 1e6:.1f}M parameters) on "
        f"{'x'.join(map(str, result['settings']['latent_shape']))} latents, VAE "
        f"{result['settings']['vae']} ({result['settings']['vae_parameters'] / 1e6:.1f}M parameters), "
        f"{device.type}, fp32, {args.num_images} image(s) per call.",
        "The end-to-end ratio between schedulers is bounded by the decode, which costs the same for every "
        "scheduler: with a small UNet the decode dominates the short runs. A 25-step run can be at most 40x "
        "faster than a 1000-step run.",
    ]
    if device.type == "cpu" and args.unet == "cpu-latent":
        result["notes"].append("On this CPU a reduced UNet and one image per call keep the 1000-step DDPM run "
                               "within minutes; the projections show the ratio with the full-size UNets.")
    report.finish_result(result, args)
    return result


if __name__ == "__main__":
    main()
