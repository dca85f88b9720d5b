#!/usr/bin/env python
"""Two-model guidance on the demo data: does a weaker version of the model, as a guide, beat unguided sampling?

    python bench/bench_guidance.py            # the full measurement (16 minutes on 2 shared CPU cores, the
                                              # VAE cached; training it once adds about 6)
    python bench/bench_guidance.py --quick    # a smoke test: a few steps of everything (under a minute)

The machinery of bench/bench_quality.py (imported from it): the demo faces, the quick start's VAE kept in
--work_dir, every model trained by the real train_unconditional_latent.py in this process with the quick start's
recipe, --num_samples images (image i from seed i, the same noise for every configuration) scored with FID and
KID on `uldm.metrics.fid.RandomConvFeatures`, once per training seed.

Autoguidance (Karras et al. 2024): the main model trains for --steps steps (checkpoints with EMA at 1/16 and 1/4
of them); its guides are (a) the checkpoint at 1/16 of the steps, (b) the one at 1/4, (c) a smaller model (the
`tiny-half` preset: `tiny` with half the channels, a quarter of the parameters) trained by the same trainer for
1/4 of the steps. Each guide at each --weights (1 = unguided) samples with 25 DPM-Solver++ steps; unguided
sampling at twice the steps is the same compute (a guided step costs two UNet calls). The best weight of each
guide is compared, seed by seed, with unguided sampling at the same steps and at the same compute; the best
guide and weight once more with guidance limited to --interval (noise levels, Kynkäänniemi et al. 2024).

DreamBooth (Domain Guidance): the first seed's main model is fine-tuned on the demo subject as
scripts/quickstart.sh's step 5 does (with prior preservation, without, and a LoRA), and each result is sampled
guided by its base (`base`: for the LoRA the same UNet with the adapter off) over --dreambooth_weights; the
subject distance (to the instance photos) and the spread (mean pairwise distance) of the samples, as
DreamBooth's validation measures them (`uldm.dreambooth.SubjectReferences`), give the fidelity–diversity curve.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import report  # noqa: E402
from bench.bench_quality import (  # noqa: E402
    DEFAULT_WORK_DIR, RESOLUTION, Scorer, load_sampler, mean_std, paired_with_baseline, prepare_demo,
    plus_minus, run_in_work_dir, run_script, sample_images, save_grid, training_argv,
)

NAME = "guidance"
TITLE = "Guidance: autoguidance against unguided sampling, and DreamBooth's subject as a dial"
GUIDE_UNET = "tiny-half"
FIGURE = report.REPO_ROOT / "docs" / "images" / "guidance.png"
# name: (what the guide is, which part of the main run's steps it trained for)
GUIDES = {
    "checkpoint 1/16": ("the main run's checkpoint at 1/16 of its steps (EMA weights)", 16),
    "checkpoint 1/4": ("the main run's checkpoint at 1/4 of its steps (EMA weights)", 4),
    "tiny-half 1/4": (f"a smaller model ({GUIDE_UNET}: half the channels) trained for 1/4 of the steps", 4),
}
# name: (options of train_dreambooth_unconditional.py beyond the shared ones, description)
DREAMBOOTH_VARIANTS = {
    "prior": (["--with_prior_preservation", "--prior_loss_weight", 0.5, "--learning_rate", 5e-5],
              "full fine-tune, prior preservation 0.5 (the quick start's step 5)"),
    "no prior": (["--learning_rate", 5e-5], "full fine-tune without prior preservation"),
    "LoRA + prior": (["--with_prior_preservation", "--prior_loss_weight", 0.5, "--use_lora", "--rank", 4,
                      "--learning_rate", 1e-3], "LoRA rank 4, lr 1e-3, prior preservation 0.5"),
}
# name: (full, quick)
DEFAULTS = {
    "num_images": (1024, 64),
    "vae_steps": (2400, 6),
    "steps": (800, 16),
    "seeds": ([0, 1, 2], [0, 1]),
    "num_samples": (256, 8),
    "sampling_steps": (25, 2),
    "weights": ([1.0, 1.25, 1.5, 2.0, 3.0], [1.0, 2.0]),
    "interval": ([0.28, 5.42], [0.28, 5.42]),
    "dreambooth_steps": (300, 2),
    "num_class_images": (64, 4),
    "dreambooth_samples": (64, 8),
    "dreambooth_weights": ([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0], [0.0, 1.0, 3.0]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=None, help="Demo faces to train on (default 1024).")
    parser.add_argument("--vae", type=str, default=None,
                        help="A trained first stage; default: the quick start's VAE, trained once in --work_dir.")
    parser.add_argument("--vae_steps", type=int, default=None, help="Steps of that VAE (the quick start's 2400).")
    parser.add_argument("--steps", type=int, default=None,
                        help="Training steps of the main model (default 800; a multiple of 16).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default 0 1 2).")
    parser.add_argument("--num_samples", type=int, default=None, help="Samples scored per configuration (256).")
    parser.add_argument("--sampling_steps", type=int, default=None,
                        help="DPM-Solver++ steps of guided sampling (default 25; unguided runs it and twice it).")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="Guidance weights (default 1 1.25 1.5 2 3; 1 is unguided).")
    parser.add_argument("--interval", type=float, nargs="*", default=None,
                        help="Noise levels (low high] of the guidance-interval run of the best guide (default "
                             "0.28 5.42; none to skip).")
    parser.add_argument("--dreambooth_steps", type=int, default=None,
                        help="DreamBooth steps (the quick start's 300; 0 skips DreamBooth).")
    parser.add_argument("--num_class_images", type=int, default=None, help="Prior-preservation images (64).")
    parser.add_argument("--dreambooth_samples", type=int, default=None, help="Samples per DreamBooth point (64).")
    parser.add_argument("--dreambooth_weights", type=float, nargs="+", default=None,
                        help="Weights of the base as the guide (default 0 0.5 1 1.5 2 2.5 3).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as bench_quality).")
    parser.add_argument("--work_dir", type=str, default=None,
                        help=f"Data, VAE and runs (default {DEFAULT_WORK_DIR}, shared with bench_quality.py; with "
                             "--quick a temporary folder).")
    parser.add_argument("--figure", type=str, default=None,
                        help=f"The PNG of the curves (default {FIGURE.relative_to(report.REPO_ROOT)}; with --quick "
                             "in --results_dir).")
    args = report.parse_benchmark_args(parser, argv, DEFAULTS)
    if args.steps < 16 or args.steps % 16:
        parser.error("--steps must be a multiple of 16 (the guides are its checkpoints at 1/16 and 1/4).")
    if args.interval and len(args.interval) != 2:
        parser.error("--interval takes two noise levels, LOW HIGH (or none).")
    if args.figure is None:
        args.figure = str(Path(args.results_dir) / "guidance.png" if args.quick else FIGURE)
    return args


# ------------------------------------------------------------------------------ training


def train_model(args, faces: Path, vae_dir: Path, work: Path, name: str, seed: int, steps: int,
                options: list, unet: str = "tiny") -> Path:
    output_dir = work / "runs" / f"guidance-{name}-seed{seed}"
    shutil.rmtree(output_dir, ignore_errors=True)
    run_script("train_unconditional_latent",
               training_argv(args, faces, vae_dir, output_dir, seed, steps, options, work, unet))
    return output_dir


def train_seed(args, faces: Path, vae_dir: Path, work: Path, seed: int) -> tuple[Path, dict[str, Path]]:
    """The main model and the folders of its three guides (the checkpoints it does not need are removed)."""
    every = args.steps // 16
    main = train_model(args, faces, vae_dir, work, "main", seed, args.steps, ["--checkpointing_steps", every])
    small = train_model(args, faces, vae_dir, work, "small", seed, args.steps // 4, [], GUIDE_UNET)
    guides = {name: main / f"checkpoint-{args.steps // fraction}" for name, (_, fraction) in GUIDES.items()
              if name.startswith("checkpoint")}
    guides["tiny-half 1/4"] = small
    for folder in main.glob("checkpoint-*"):
        if folder not in guides.values():
            shutil.rmtree(folder)
    return main, guides


# ------------------------------------------------------------------------------ sampling


def score(scorer: Scorer, sampler, num_samples: int, steps: int, **call_options) -> dict:
    images, seconds = sample_images(sampler, num_samples, steps, **call_options)
    return {**scorer.score(images), "sample_s_per_image": seconds, "images": images}


def sweep_seed(args, scorer: Scorer, main: Path, guides: dict[str, Path], seed: int, work: Path) -> dict[str, dict]:
    """Every configuration of one seed's model: 'unguided@S' and 'GUIDE@W' -> its scores."""
    from uldm.guidance import load_guide

    sampler = load_sampler(main)
    records = {f"unguided@{steps}": score(scorer, sampler, args.num_samples, steps)
               for steps in (args.sampling_steps, 2 * args.sampling_steps)}
    for name, folder in guides.items():
        guide = load_guide(folder, sampler, main)
        for weight in args.weights:
            if weight != 1.0:
                records[f"{name}@{weight:g}"] = score(scorer, sampler, args.num_samples, args.sampling_steps,
                                                      guide=guide, guidance_scale=weight)
    for key, record in records.items():
        images = record.pop("images")
        if seed == args.seeds[0]:
            save_grid(images, work / "grids" / f"guidance-{key.replace(' ', '_').replace('/', 'of')}.png")
        print(f"seed {seed} {key}: FID {record['fid']:.3f}, KID {record['kid']:.5f}", flush=True)
    return records


def interval_summary(args, scorer: Scorer, trained: dict, configs: dict, best: dict) -> dict:
    """The best guide at its best weight, guided only within --interval, paired with the same guide guiding every
    step and with unguided sampling at the same compute."""
    name = min(best, key=lambda n: best[n]["fid_mean"])
    weight = best[name]["weight"]
    summary = summarise([{"seed": seed, **interval_record(args, scorer, main, guides[name], weight)}
                         for seed, (main, guides) in trained.items()])
    return {"guide": name, "weight": weight, "interval": args.interval, **summary,
            "against_everywhere": paired_with_baseline(summary, configs[config_key(name, weight, 0)]),
            "same_compute": paired_with_baseline(summary, configs[f"unguided@{2 * args.sampling_steps}"])}


def interval_record(args, scorer: Scorer, main: Path, guide_folder: Path, weight: float) -> dict:
    from uldm.guidance import load_guide

    sampler = load_sampler(main)
    guide = load_guide(guide_folder, sampler, main)
    record = score(scorer, sampler, args.num_samples, args.sampling_steps, guide=guide, guidance_scale=weight,
                   guidance_interval=tuple(args.interval))
    record.pop("images")
    return record


# ------------------------------------------------------------------------------ summaries


def config_key(guide: str, weight: float, steps: int) -> str:
    """The name of a configuration: weight 1 of every guide is unguided sampling."""
    return f"unguided@{steps}" if weight == 1.0 else f"{guide}@{weight:g}"


def cell(config: dict, metric: str = "fid", scale: float = 1.0) -> str:
    return plus_minus(config[f"{metric}_mean"], config[f"{metric}_std"], scale)


def summarise(runs: list[dict]) -> dict:
    summary = {"runs": runs}
    for key in ("fid", "kid", "sample_s_per_image"):
        summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std([run[key] for run in runs])
    return summary


def collect(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Configuration -> mean ± std over the seeds (each run keeps its seed, for paired comparisons)."""
    keys = next(iter(per_seed.values())).keys()
    return {key: summarise([{"seed": seed, **records[key]} for seed, records in per_seed.items()]) for key in keys}


def best_weights(args, configs: dict[str, dict]) -> dict[str, dict]:
    """Per guide, its weight of the lowest mean FID, paired seed by seed with unguided sampling at the same steps
    and at the same compute (twice the steps)."""
    best = {}
    for name in GUIDES:
        guided = [weight for weight in args.weights if weight != 1.0]
        if not guided:
            continue
        weight = min(guided, key=lambda w: configs[f"{name}@{w:g}"]["fid_mean"])
        config = configs[f"{name}@{weight:g}"]
        best[name] = {"weight": weight, "fid_mean": config["fid_mean"], "fid_std": config["fid_std"],
                      "same_steps": paired_with_baseline(config, configs[f"unguided@{args.sampling_steps}"]),
                      "same_compute": paired_with_baseline(config, configs[f"unguided@{2 * args.sampling_steps}"])}
    return best


# ------------------------------------------------------------------------------ DreamBooth


def dreambooth_argv(args, base: Path, subject: Path, class_dir: Path, output_dir: Path, options: list) -> list:
    """scripts/quickstart.sh's step 5 (its options, --num_class_images, steps), no validation."""
    return ["--pretrained_model_name_or_path", base, "--instance_data_dir", subject, "--class_data_dir", class_dir,
            "--num_class_images", args.num_class_images, "--class_sampling_steps", args.sampling_steps,
            "--sample_batch_size", 16, "--train_batch_size", 4, "--max_train_steps", args.dreambooth_steps,
            "--lr_scheduler", "constant", "--lr_warmup_steps", 0, "--validation_steps", 0,
            "--num_validation_images", 0, "--resolution", RESOLUTION, "--checkpointing_steps", 0,
            "--report_to", "none", "--seed", 0, "--output_dir", output_dir, *options]


@torch.no_grad()
def subject_curve(args, result: Path, subject: Path) -> list[dict]:
    """The DreamBooth result at `result` guided by its base over --dreambooth_weights: subject distance and
    spread of the same samples (image i from seed i) at each weight."""
    from train_dreambooth_unconditional import instance_photos
    from uldm.dreambooth import SubjectReferences
    from uldm.guidance import BASE, load_guide
    from uldm.sampling import generators_for_indices

    pipeline = load_sampler(result)
    guide = load_guide(BASE, pipeline, result)
    references = SubjectReferences.from_pixels(
        pipeline, instance_photos(sorted(subject.glob("*.png")), str(subject), RESOLUTION))
    points = []
    for weight in args.dreambooth_weights:
        indices = list(range(args.dreambooth_samples))
        latents = pipeline(batch_size=len(indices), num_inference_steps=args.sampling_steps, guide=guide,
                           guidance_scale=weight, generator=generators_for_indices(0, indices),
                           output_type="latent").images
        images = pipeline.decode_latents(latents).permute(0, 2, 3, 1).float().cpu().numpy()
        points.append({"weight": weight, **references.measure(latents, images)})
    return points


def dreambooth_curves(args, base: Path, faces: Path, work: Path) -> dict[str, list[dict]]:
    from uldm.demo_data import SUBJECT_DIR

    subject = faces.parent / SUBJECT_DIR
    class_dir = work / "runs" / "guidance-class-images"  # sampled from this run's base, shared by the variants
    shutil.rmtree(class_dir, ignore_errors=True)
    curves = {}
    for name, (options, _) in DREAMBOOTH_VARIANTS.items():
        output_dir = work / "runs" / f"guidance-dreambooth-{name.replace(' ', '_')}"
        shutil.rmtree(output_dir, ignore_errors=True)
        run_script("train_dreambooth_unconditional",
                   dreambooth_argv(args, base, subject, class_dir, output_dir, options))
        curves[name] = subject_curve(args, output_dir, subject)
        shutil.rmtree(output_dir)
        for point in curves[name]:
            print(f"DreamBooth {name} w {point['weight']:g}: distance {point['instance_distance']:.4f}, "
                  f"spread {point['sample_spread']:.4f}", flush=True)
    shutil.rmtree(class_dir, ignore_errors=True)
    return curves


# ------------------------------------------------------------------------------ the result


def fill_result(result: dict, args, configs: dict, best: dict, interval: dict | None, curves: dict,
                vae: tuple[str, float | None], work: Path) -> None:
    """`vae`: where the first stage came from, and the seconds its training loop took (None where unknown)."""
    from uldm.metrics.fid import RandomConvFeatures

    vae_source, vae_train_s = vae
    vae_wall_s = result.pop("vae_wall_s", 0.0)
    result["settings"] = {
        "data": f"demo faces, {args.num_images} at {RESOLUTION} px", "vae": vae_source,
        "main_model": f"tiny preset (0.7M) on 4x8x8 latents, {args.steps} steps, the quick start's recipe "
                      "(v-prediction, batch 32, lr 1e-3 cosine, EMA max decay 0.999, flips)",
        "guides": {name: what for name, (what, _) in GUIDES.items()}, "guide_unet": f"{GUIDE_UNET} (0.18M)",
        "seeds": args.seeds, "num_samples": args.num_samples, "weights": args.weights,
        "sampler": f"DPM-Solver++, {args.sampling_steps} steps (unguided also {2 * args.sampling_steps})",
        "interval": args.interval, "feature_extractor": f"uldm.metrics.fid.RandomConvFeatures "
                                                        f"({RandomConvFeatures().num_features} features)",
        "dreambooth": {name: what for name, (_, what) in DREAMBOOTH_VARIANTS.items()} if curves else None,
        "dreambooth_steps": args.dreambooth_steps, "num_class_images": args.num_class_images,
        "dreambooth_samples": args.dreambooth_samples, "torch_threads": torch.get_num_threads(),
    }
    verdict = equal_compute_verdict(args, configs, best)
    figure = draw_figure(args, configs, curves)
    result["results"] = {"configs": configs, "best": best, "interval": interval, "dreambooth": curves,
                         "verdict": verdict, "vae_train_s": vae_train_s, "figure": str(figure)}
    add_tables(result, args, configs, best, interval, curves)
    if not args.quick:
        minutes = (time.monotonic() - result["_start_time"] - vae_wall_s) / 60
        report.add_target(result, "the full benchmark finishes within 25 minutes on 2 CPU cores (the VAE cached)",
                          f"{minutes:.1f} min ({result['machine']['cpu_cores']} cores shared with other work, "
                          f"threads {torch.get_num_threads()}, load at start {result['load_at_start'][0]:.1f}; the "
                          f"VAE's one-off training loop, {(vae_train_s or 0) / 60:.1f} min, not counted)",
                          minutes <= 25)
    result["notes"] += [verdict, (
        "The best weight of each guide is picked on the same samples it is then compared with (a slight bias in "
        "its favour); the comparisons are paired: the same seed's model, the same noise per image."),
        "The small guide: the `tiny-half` preset (configs/unet/tiny-half.json, `tiny` with half the channels, a "
        "quarter of the parameters: one size down) trained by the same trainer and recipe for 1/4 of the main "
        "model's steps (the paper's XS guide trained 1/16 as long; here 1/16 would be "
        f"{args.steps // 16} steps).",
        "FID/KID on uldm.metrics.fid.RandomConvFeatures (a fixed random conv net): numbers compare runs of this "
        "benchmark with each other, never with published FIDs.",
        f"![FID against the guidance weight; DreamBooth's fidelity–diversity curve]"
        f"({Path(args.figure).name if args.quick else 'images/' + Path(args.figure).name})"]
    if args.work_dir is not None or not args.quick:
        result["notes"].append(f"Sample grids of the first seed: {work / 'grids'} (not committed).")


def equal_compute_verdict(args, configs: dict, best: dict) -> str:
    """One sentence: did the best guide at its best weight beat unguided sampling at the same compute?"""
    unguided = configs[f"unguided@{2 * args.sampling_steps}"]
    if not best:
        return "No guided weight was run."
    name = min(best, key=lambda n: best[n]["fid_mean"])
    entry, paired = best[name], best[name]["same_compute"]
    won = paired["seeds_better"] == paired["seeds"] and paired["fid_difference_mean"] < 0
    return (f"Guidance {'beat' if won else 'did not beat'} unguided sampling at equal compute on the demo: the best "
            f"guide ({name}, weight {entry['weight']:g}, {args.sampling_steps} steps) scored FID "
            f"{cell(entry)} against {cell(unguided)} unguided at {2 * args.sampling_steps} steps, better in "
            f"{paired['seeds_better']} of {paired['seeds']} seeds (paired difference "
            f"{paired['fid_difference_mean']:+.2f} ± {paired['fid_difference_std']:.2f}).")


def versus(paired: dict) -> str:
    return (f"{paired['fid_difference_mean']:+.2f} ± {paired['fid_difference_std']:.2f} "
            f"(better in {paired['seeds_better']} of {paired['seeds']})")


def add_tables(result: dict, args, configs: dict, best: dict, interval: dict | None, curves: dict) -> None:
    steps = args.sampling_steps
    for metric, scale, label in (("fid", 1.0, "FID"), ("kid", 1e3, "KID × 10³")):
        rows = [[name, what, *(cell(configs[config_key(name, w, steps)], metric, scale) for w in args.weights)]
                for name, (what, _) in GUIDES.items()]
        report.add_table(result, f"{label} against the guidance weight ({args.num_samples} samples, {steps} "
                                 f"DPM-Solver++ steps; mean ± std over seeds {args.seeds}; weight 1 is unguided)",
                         ["guide", "what", *(f"w = {w:g}" for w in args.weights)], rows)
    rows = [[f"unguided, {s} steps", "–", cell(configs[f"unguided@{s}"]),
             configs[f"unguided@{s}"]["sample_s_per_image_mean"], "–", "–"] for s in (steps, 2 * steps)]
    for name, entry in best.items():
        config = configs[f"{name}@{entry['weight']:g}"]
        rows.append([f"{name}, {steps} steps", entry["weight"], cell(entry), config["sample_s_per_image_mean"],
                     versus(entry["same_steps"]), versus(entry["same_compute"])])
    if interval:
        rows.append([f"{interval['guide']}, {steps} steps, guided only for σ in ({interval['interval'][0]:g}, "
                     f"{interval['interval'][1]:g}]", interval["weight"], cell(interval),
                     interval["sample_s_per_image_mean"], "–", versus(interval["same_compute"])])
    report.add_table(result, "The best weight of each guide against unguided sampling (FID − unguided's, same seed)",
                     ["sampling", "weight", "FID", "s/image", f"vs unguided {steps} steps (same steps)",
                      f"vs unguided {2 * steps} steps (same compute)"], rows)
    if curves:
        rows = [[name, point["weight"], point["instance_distance"], point["sample_spread"],
                 point["instance_latent_distance"], point["sample_latent_spread"]]
                for name, points in curves.items() for point in points]
        report.add_table(result, f"DreamBooth on the demo subject guided by its base ({args.dreambooth_samples} "
                                 "samples; distance: RMS to the nearest instance photo, spread: mean pairwise RMS "
                                 "distance; 32 px thumbnails in [0, 1], and latents)",
                         ["fine-tune", "weight", "subject distance", "spread", "latent distance", "latent spread"],
                         rows)


def draw_figure(args, configs: dict, curves: dict) -> Path:
    """FID against the weight per guide (unguided at both step counts as lines), and the DreamBooth curves."""
    from uldm.plots import pyplot, save_figure

    figure, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4.2), dpi=100)
    steps = args.sampling_steps
    for name in GUIDES:
        keys = [config_key(name, w, steps) for w in args.weights]
        left.errorbar(args.weights, [configs[k]["fid_mean"] for k in keys], [configs[k]["fid_std"] for k in keys],
                      marker="o", capsize=3, label=name)
    for s, style in ((steps, "--"), (2 * steps, ":")):
        left.axhline(configs[f"unguided@{s}"]["fid_mean"], color="gray", linestyle=style, label=f"unguided, {s} steps")
    left.set(xlabel="guidance weight", ylabel="FID (random-conv features)",
             title=f"Autoguidance, {steps} steps (mean ± std over {len(args.seeds)} seeds)")
    left.legend(fontsize=8)
    for name, points in curves.items():
        right.plot([p["sample_spread"] for p in points], [p["instance_distance"] for p in points], marker="o",
                   label=name)
        for point in points:
            right.annotate(f"{point['weight']:g}", (point["sample_spread"], point["instance_distance"]), fontsize=7,
                           textcoords="offset points", xytext=(3, 3))
    right.set(xlabel="spread of the samples (diversity)", ylabel="distance to the subject (lower: more subject)",
              title="DreamBooth guided by its base (labels: weight)")
    if curves:
        right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    return save_figure(figure, args.figure)


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    return run_in_work_dir(parse_args(argv), run, "bench-guidance-")


def run(args: argparse.Namespace, work: Path) -> dict:
    result = report.start_result(NAME, TITLE, args)
    demo = prepare_demo(args, work, num_subject_images=8)
    faces, vae_dir, vae_train_s, vae_source, scorer = (demo.faces, demo.vae_dir, demo.vae_train_s, demo.vae_source,
                                                       demo.scorer)
    result["vae_wall_s"] = demo.vae_wall_s

    trained = {seed: train_seed(args, faces, vae_dir, work, seed) for seed in args.seeds}
    configs = collect({seed: sweep_seed(args, scorer, main, guides, seed, work)
                       for seed, (main, guides) in trained.items()})
    best = best_weights(args, configs)
    interval = interval_summary(args, scorer, trained, configs, best) if args.interval and best else None
    curves = dreambooth_curves(args, trained[args.seeds[0]][0], faces, work) if args.dreambooth_steps else {}
    for main, guides in trained.values():
        shutil.rmtree(main)
        shutil.rmtree(guides["tiny-half 1/4"])

    fill_result(result, args, configs, best, interval, curves, (vae_source, vae_train_s), work)
    report.finish_result(result, args)
    return result


if __name__ == "__main__":
    main()
