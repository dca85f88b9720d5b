#!/usr/bin/env python
"""Sample quality of the loss levers against the baseline, and of latent against pixel space, on the demo data.

    python bench/bench_quality.py            # the full measurement (about 30 minutes on 2 idle CPU cores)
    python bench/bench_quality.py --quick    # a smoke test: a few steps of everything (a minute or two)

Data: the demo data (`uldm/demo_data.py`: 1024 cartoon faces at 32 px). First stage: the quick start's
tiny AutoencoderKL, trained once with `scripts/quickstart.sh`'s recipe (train_vae.py) and kept in
--work_dir for later runs (or --vae DIR, e.g. outputs/quickstart/vae). Every model is trained by the real
train_unconditional_latent.py, in this process, with the quick start's recipe (tiny UNet on cached 4x8x8
latents, batch 32, lr 1e-3 cosine, EMA 0.999, flips) for --steps steps, once per --seeds (the training
seed: initial weights, batch order, noise), then samples --num_samples images (25 DPM-Solver++ steps,
image i from seed i, the same for every model) which are scored against the training images with FID and
KID on `uldm.metrics.fid.RandomConvFeatures` (a fixed random conv net: offline and deterministic; its numbers
compare runs of this benchmark with each other, never with published FIDs).

Levers: each one added alone to the baseline (v-prediction alone too, as zero terminal SNR needs it).
Same seed, same everything else: the paired differences to the baseline tell whether a lever wins.

Pixel space: the same trainer with --vae_name_or_path none and the tiny-pixel preset, given the latent
baseline's measured training time (x --pixel_budgets): its step time is measured in a short calibration
run first. Training time is the sum of the logged step times (the loop), so start-up and saving are not
counted; the one-off costs of the latent model (the VAE's training, the latent cache) are shown apart.
Sampling cost: seconds per image of the same 25-step sampler, the VAE decode included.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import report  # noqa: E402
from bench.harness import loop_seconds, timing_cache_builds  # noqa: E402

NAME = "quality"
RESOLUTION = 32
BATCH_SIZE = 32
SAMPLE_BATCH_SIZE = 64
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "uldm-bench-quality"
# The study's baseline is ε-prediction, the trainer's default when it was measured (now v_prediction): every run of
# this benchmark starts from it, and a lever's own --prediction_type comes later and wins.
STUDY_BASE = ["--prediction_type", "epsilon"]
# name: (options added to the baseline, description)
LEVERS = {
    "baseline": ([], "ε-prediction, uniform timesteps, unweighted MSE (the quick start's recipe before v-prediction "
                     "became the default; kept so that the levers are measured against the same baseline)"),
    "min_snr": (["--snr_gamma", "5"], "Min-SNR-5 weighting (Hang et al. 2023)"),
    "p2": (["--p2_gamma", "1", "--p2_k", "1"], "P2 weighting, γ 1, k 1 (Choi et al. 2022)"),
    "logit_normal": (["--weighting_scheme", "logit_normal"], "logit-normal timesteps, mean 0, std 1 (SD3)"),
    "v_prediction": (["--prediction_type", "v_prediction"], "v-prediction"),
    "zero_snr": (["--prediction_type", "v_prediction", "--rescale_betas_zero_snr"],
                 "zero terminal SNR + v-prediction, trailing spacing (Lin et al. 2023)"),
    "offset_noise": (["--offset_noise", "0.1"], "offset noise 0.1 (diffusers' --offset_noise)"),
}
# name: (full, quick)
DEFAULTS = {
    "num_images": (1024, 64),
    "vae_steps": (2400, 6),
    "steps": (800, 4),
    "seeds": ([0, 1, 2], [0, 1]),
    "num_samples": (384, 16),
    "sampling_steps": (25, 2),
    "num_heldout": (384, 16),
    "pixel_budgets": ([1.0, 3.0], [1.0]),
    "calibration_steps": (10, 3),
    "levers": (list(LEVERS), list(LEVERS)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=None, help="Demo faces to train on (default 1024).")
    parser.add_argument("--vae", type=str, default=None,
                        help="A trained first stage (e.g. outputs/quickstart/vae); default: train the quick start's "
                             "VAE once and keep it in --work_dir.")
    parser.add_argument("--vae_steps", type=int, default=None, help="Steps of that VAE (the quick start's 2400).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps of each latent model (default 800).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default 0 1 2).")
    parser.add_argument("--num_samples", type=int, default=None, help="Samples scored per model (default 384).")
    parser.add_argument("--sampling_steps", type=int, default=None, help="DPM-Solver++ steps per sample (default 25).")
    parser.add_argument("--num_heldout", type=int, default=None,
                        help="Held-out demo faces scored as a reference (the best FID at this sample count).")
    parser.add_argument("--levers", nargs="+", default=None,
                        help=f"Which levers (default all: {' '.join(LEVERS)}). 'baseline' is always run.")
    parser.add_argument("--pixel_budgets", type=float, nargs="*", default=None,
                        help="Pixel-space runs, in multiples of the latent baseline's training time (default 1 3; "
                             "none to skip pixel space).")
    parser.add_argument("--calibration_steps", type=int, default=None,
                        help="Steps of the run that measures the pixel model's step time (default 10).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the tiny models gain little from more, and on a shared "
                             "machine more threads make every run slower and noisier).")
    parser.add_argument("--work_dir", type=str, default=None,
                        help=f"Data, VAE and runs (default {DEFAULT_WORK_DIR}, where later runs reuse the data and "
                             "the VAE; with --quick a temporary folder).")
    args = report.parse_benchmark_args(parser, argv, DEFAULTS)
    for name in ("num_images", "vae_steps", "steps", "num_samples", "sampling_steps", "num_heldout",
                 "calibration_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.calibration_steps < 3:
        parser.error("--calibration_steps must be at least 3 (the first two steps are left out).")
    unknown = [name for name in args.levers if name not in LEVERS]
    if unknown:
        parser.error(f"Unknown --levers {unknown}; choose from {', '.join(LEVERS)}.")
    args.levers = ["baseline"] + [name for name in args.levers if name != "baseline"]
    if any(budget <= 0 for budget in args.pixel_budgets):
        parser.error("--pixel_budgets must be positive.")
    return args


# ------------------------------------------------------------------------------------ the runs


def run_script(module_name: str, argv: list) -> None:
    from uldm.testing import run_script_in_this_process

    run_script_in_this_process(module_name, argv)


def ensure_demo_data(work: Path, num_images: int, num_subject_images: int = 1) -> Path:
    """The demo faces (drawn once into `work`), with at least `num_subject_images` photos of the subject."""
    from uldm.demo_data import FACES_DIR, SUBJECT_DIR, write_demo_dataset

    root = work / f"data-{num_images}"
    faces = root / FACES_DIR
    if (not faces.is_dir() or len(list(faces.glob("*.png"))) != num_images
            or len(list((root / SUBJECT_DIR).glob("*.png"))) < num_subject_images):
        write_demo_dataset(root, num_images=num_images, num_subject_images=num_subject_images, resolution=RESOLUTION)
    return faces


def ensure_vae(args, work: Path, faces: Path) -> tuple[Path, float | None, str]:
    """The first stage: --vae, or the quick start's VAE trained here once (kept for later runs). Returns the
    folder, the seconds its training loop took (from its metrics.jsonl; None where unknown) and where it came from."""
    if args.vae:
        folder = Path(args.vae)
        seconds = loop_seconds(folder)[0] if (folder / "metrics.jsonl").is_file() else None
        return folder, seconds, f"given ({folder})"
    folder = work / f"vae-{args.num_images}-{args.vae_steps}"
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"Training the quick start's VAE ({args.vae_steps} steps), once...", flush=True)
        # scripts/quickstart.sh, step 2.
        run_script("train_vae", [
            "--train_data_dir", faces, "--resolution", RESOLUTION, "--model_config_name_or_path", "tiny-kl-f4",
            "--train_batch_size", 8, "--max_train_steps", args.vae_steps, "--learning_rate", 1e-3,
            "--lr_scheduler", "cosine", "--lr_warmup_steps", max(1, args.vae_steps // 20), "--validation_steps", 0,
            "--num_validation_images", 16, "--checkpointing_steps", 0, "--report_to", "none", "--seed", 0,
            "--output_dir", folder])
    return folder, loop_seconds(folder)[0], f"the quick start's recipe, {args.vae_steps} steps (cached in {folder})"


def training_argv(args, faces: Path, first_stage: str | Path, output_dir: Path, seed: int, steps: int,
                  options: list[str], work: Path, unet: str = "tiny") -> list:
    """scripts/quickstart.sh's step 3, with `options` added and the UNet preset `unet`; pixel space without the
    cache."""
    argv = ["--train_data_dir", faces, "--resolution", RESOLUTION, "--vae_name_or_path", first_stage,
            "--random_flip", "--train_batch_size", BATCH_SIZE, "--max_train_steps", steps, "--learning_rate", 1e-3,
            "--lr_scheduler", "cosine", "--lr_warmup_steps", max(1, steps // 20), "--use_ema", "--ema_max_decay",
            0.999, "--validation_steps", 0, "--num_validation_images", 0, "--checkpointing_steps", 0,
            "--report_to", "none", "--seed", seed, "--output_dir", output_dir, *options]
    if first_stage == "none":
        return argv + ["--model_config_name_or_path", "tiny-pixel"]
    return argv + ["--model_config_name_or_path", unet, "--cache_latents", "--latent_scaling_factor", "auto",
                   "--latent_cache_dir", work / "latent_cache"]


def load_sampler(folder: Path):
    from uldm.first_stage import load_saved_model

    sampler = load_saved_model(folder)  # from_pretrained leaves the models in eval mode
    sampler.set_progress_bar_config(disable=True)
    return sampler


def draw_samples(folder: Path, num_samples: int, steps: int) -> tuple[torch.Tensor, float]:
    """Samples 0..N-1 (image i from seed i) of the model saved in `folder` (see `sample_images`)."""
    return sample_images(load_sampler(folder), num_samples, steps)


@torch.no_grad()
def sample_images(sampler, num_samples: int, steps: int, **call_options) -> tuple[torch.Tensor, float]:
    """Samples 0..N-1 (image i from seed i) as N x 3 x R x R uint8, and the seconds per image; `call_options` go
    to every sampler call (e.g. a guide)."""
    from uldm.sampling import batches, generators_for_indices

    chunks = []
    start = time.perf_counter()
    for indices in batches(list(range(num_samples)), SAMPLE_BATCH_SIZE):
        images = sampler(batch_size=len(indices), num_inference_steps=steps,
                         generator=generators_for_indices(0, indices), output_type="np", **call_options).images
        chunks.append(torch.from_numpy((images * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
    return torch.cat(chunks), (time.perf_counter() - start) / num_samples


class Scorer:
    """FID/KID against the training images' features (extracted once) with the small extractor."""

    def __init__(self, faces: Path, seed: int = 0):
        from uldm.metrics import fid

        self.fid = fid
        self.extractor = fid.RandomConvFeatures()
        reference = fid.ReferenceImages(fid.reference_folder(faces, RESOLUTION, center_crop=True))
        self.real = self.features(reference)
        self.seed = seed

    def features(self, images) -> torch.Tensor:
        return self.fid.extract_features(images, self.extractor, batch_size=256, desc="features")

    def score(self, images: torch.Tensor) -> dict[str, float]:
        fake = self.features(list(images))
        kid_mean, kid_std, _ = self.fid.kid_from_features(self.real, fake, subsets=50, subset_size=len(fake),
                                                           seed=self.seed)
        return {"fid": self.fid.fid_from_features(self.real, fake), "kid": kid_mean, "kid_std": kid_std}


@dataclass
class Demo:
    """What every quality benchmark starts from (`prepare_demo`)."""

    faces: Path
    vae_dir: Path
    vae_train_s: float | None  # its training loop's seconds (None where unknown)
    vae_source: str
    vae_wall_s: float  # the time ensure_vae took here: a one-off, kept in --work_dir for later runs
    scorer: Scorer


def prepare_demo(args, work: Path, num_subject_images: int = 1) -> Demo:
    """The demo faces, the quick start's first stage and the scorer, in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    faces = ensure_demo_data(work, args.num_images, num_subject_images)
    started = time.monotonic()
    vae_dir, vae_train_s, vae_source = ensure_vae(args, work, faces)
    return Demo(faces, vae_dir, vae_train_s, vae_source, time.monotonic() - started, Scorer(faces))


def heldout_faces(num_images: int, count: int) -> torch.Tensor:
    """Demo faces that are not in the training set (indices num_images..): N x 3 x R x R uint8."""
    from uldm.demo_data import draw_face, face_rng, random_face_factors

    faces = [np.asarray(draw_face(random_face_factors(face_rng(0, index, "faces")), RESOLUTION))
             for index in range(num_images, num_images + count)]
    return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def reconstructions(vae_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstructions (posterior mean) of uint8 images: the latent models' best possible pixels."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    pixels = images.float() / 127.5 - 1
    decoded = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in pixels.split(128)])
    return ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: Path) -> None:
    from uldm.validation import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid((images[:64].permute(0, 2, 3, 1).numpy() / 255.0)).save(path)


def train_and_score(args, scorer: Scorer, faces: Path, first_stage, work: Path, name: str, seed: int, steps: int,
                    options: list[str]) -> dict:
    """One model: train, sample, score; its folder is removed afterwards (a grid of seed 0's samples is kept)."""
    output_dir = work / "runs" / f"{name}-seed{seed}"
    shutil.rmtree(output_dir, ignore_errors=True)
    started = time.perf_counter()
    run_script("train_unconditional_latent",
               training_argv(args, faces, first_stage, output_dir, seed, steps, [*STUDY_BASE, *options], work))
    wall_s = time.perf_counter() - started
    train_s, logged = loop_seconds(output_dir)
    images, sample_s = draw_samples(output_dir, args.num_samples, args.sampling_steps)
    scores = scorer.score(images)
    if seed == args.seeds[0]:
        save_grid(images, work / "grids" / f"{name}.png")
    shutil.rmtree(output_dir)
    record = {"seed": seed, "steps": logged, "train_s": train_s, "run_wall_s": wall_s,
              "sample_s_per_image": sample_s, **scores}
    print(f"{name} seed {seed}: FID {scores['fid']:.3f}, KID {scores['kid']:.5f}, {logged} steps in {train_s:.1f} s",
          flush=True)
    return record


def pixel_step_seconds(args, faces: Path, work: Path) -> float:
    """The pixel model's seconds per training step, from a short run (its first two steps left out)."""
    output_dir = work / "runs" / "pixel-calibration"
    shutil.rmtree(output_dir, ignore_errors=True)
    run_script("train_unconditional_latent",
               training_argv(args, faces, "none", output_dir, args.seeds[0], args.calibration_steps, STUDY_BASE,
                             work))
    seconds, steps = loop_seconds(output_dir, skip=2)
    shutil.rmtree(output_dir)
    return seconds / steps


# ---------------------------------------------------------------------------------- summaries


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: list[dict]) -> dict:
    summary = {"runs": records}
    for key in ("fid", "kid", "train_s", "sample_s_per_image", "steps"):
        summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std([record[key] for record in records])
    return summary


def paired_with_baseline(config: dict, baseline: dict) -> dict:
    """FID minus the baseline's of the same seed (same initial weights, batches and noise): how often and by how
    much the lever is better."""
    base = {run["seed"]: run["fid"] for run in baseline["runs"]}
    differences = [run["fid"] - base[run["seed"]] for run in config["runs"] if run["seed"] in base]
    mean, std = mean_std(differences)
    return {"fid_difference_mean": mean, "fid_difference_std": std, "seeds_better": sum(d < 0 for d in differences),
            "seeds": len(differences)}


def plus_minus(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    return run_in_work_dir(parse_args(argv), run, "bench-quality-")


def run_in_work_dir(args: argparse.Namespace, run, prefix: str) -> dict:
    """`run(args, work)` on --threads torch threads (1 with --quick), in --work_dir, else DEFAULT_WORK_DIR for a full
    run (its VAE is kept for later runs) or a temporary folder for a quick one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1 if args.quick else args.threads)
    try:
        if args.work_dir is not None or not args.quick:
            return run(args, Path(args.work_dir or DEFAULT_WORK_DIR))
        with tempfile.TemporaryDirectory(prefix=prefix) as work:
            return run(args, Path(work))
    finally:
        torch.set_num_threads(previous)


def run(args: argparse.Namespace, work: Path) -> dict:
    result = report.start_result(NAME, "Sample quality: loss levers, and latent against pixel space", args)
    shutil.rmtree(work / "latent_cache", ignore_errors=True)  # built again, so that its cost is measured
    chosen = [name for name in args.levers if name in LEVERS]

    demo = prepare_demo(args, work)
    faces, vae_dir, vae_train_s, vae_source, scorer = (demo.faces, demo.vae_dir, demo.vae_train_s, demo.vae_source,
                                                       demo.scorer)
    heldout = heldout_faces(args.num_images, args.num_heldout)
    references = {"heldout_faces": scorer.score(heldout), "vae_reconstructions": scorer.score(reconstructions(vae_dir, heldout))}

    configs = {}
    with timing_cache_builds() as cache_timer:  # the first latent run encodes the data set; later ones read it
        for name in chosen:
            options, _ = LEVERS[name]
            configs[name] = summarise([train_and_score(args, scorer, faces, vae_dir, work, name, seed, args.steps,
                                                       options) for seed in args.seeds])
    cache_build_s = cache_timer.seconds
    for name, config in configs.items():
        if name != "baseline":
            config["against_baseline"] = paired_with_baseline(config, configs["baseline"])

    pixel = {}
    pixel_step_s = None
    if args.pixel_budgets:
        pixel_step_s = pixel_step_seconds(args, faces, work)
        budget_s = configs["baseline"]["train_s_mean"]
        for multiple in args.pixel_budgets:
            steps = max(1, round(multiple * budget_s / pixel_step_s))
            pixel[f"{multiple:g}x"] = {"budget_multiple": multiple, "planned_steps": steps, **summarise(
                [train_and_score(args, scorer, faces, "none", work, f"pixel-{multiple:g}x", seed, steps, [])
                 for seed in args.seeds])}

    fill_result(result, args, chosen, configs, pixel, references, vae_source, vae_train_s, cache_build_s,
                pixel_step_s, work)
    report.finish_result(result, args)
    return result


def fill_result(result, args, chosen, configs, pixel, references, vae_source, vae_train_s, cache_build_s,
                pixel_step_s, work) -> None:
    from uldm.metrics.fid import RandomConvFeatures

    result["settings"] = {
        "data": f"demo faces, {args.num_images} at {RESOLUTION} px", "vae": vae_source,
        "latent_model": "tiny preset (0.7M) on 4x8x8 latents, --cache_latents", "pixel_model": "tiny-pixel preset "
        "(1.1M) on 3x32x32", "recipe": f"batch {BATCH_SIZE}, lr 1e-3 cosine with 5% warm-up, EMA max decay 0.999, "
        "random flips (scripts/quickstart.sh)", "steps": args.steps, "seeds": args.seeds,
        "num_samples": args.num_samples, "sampler": f"DPM-Solver++, {args.sampling_steps} steps",
        "feature_extractor": f"uldm.metrics.fid.RandomConvFeatures ({RandomConvFeatures().num_features} features)",
        "torch_threads": torch.get_num_threads(), "pixel_budgets": args.pixel_budgets,
        "levers": {name: " ".join(LEVERS[name][0]) for name in chosen},
    }
    result["results"] = {"configs": configs, "pixel": pixel, "references": references,
                         "vae_train_s": vae_train_s, "latent_cache_build_s": cache_build_s,
                         "pixel_step_s": pixel_step_s, "grids_dir": str(work / "grids")}

    rows = []
    for name in chosen:
        config = configs[name]
        paired = config.get("against_baseline")
        versus = "–" if paired is None else (
            f"{paired['fid_difference_mean']:+.2f} ± {paired['fid_difference_std']:.2f} "
            f"(better in {paired['seeds_better']} of {paired['seeds']})")
        rows.append([name, LEVERS[name][1], plus_minus(config["fid_mean"], config["fid_std"]),
                     plus_minus(config["kid_mean"], config["kid_std"], 1e3), versus,
                     ", ".join(f"{run['fid']:.2f}" for run in config["runs"])])
    report.add_table(result, f"Loss levers, {args.steps} steps each, mean ± std over seeds {args.seeds}",
                     ["lever", "what", "FID", "KID × 10³", "FID − baseline, same seed", "FID per seed"], rows)

    one_off = (vae_train_s or 0.0) + (cache_build_s or 0.0)
    space_rows = [["latent (tiny, 4x8x8)", "1x", round(configs["baseline"]["steps_mean"]),
                   configs["baseline"]["train_s_mean"], one_off, plus_minus(configs["baseline"]["fid_mean"],
                                                                            configs["baseline"]["fid_std"]),
                   plus_minus(configs["baseline"]["kid_mean"], configs["baseline"]["kid_std"], 1e3),
                   configs["baseline"]["sample_s_per_image_mean"]]]
    for label, entry in pixel.items():
        space_rows.append(["pixel (tiny-pixel, 3x32x32)", label, round(entry["steps_mean"]),
                           entry["train_s_mean"], 0.0, plus_minus(entry["fid_mean"], entry["fid_std"]),
                           plus_minus(entry["kid_mean"], entry["kid_std"], 1e3), entry["sample_s_per_image_mean"]])
    if pixel:
        report.add_table(result, "Latent against pixel space at the same training time (mean ± std over seeds)",
                         ["space", "time budget", "steps", "training s", "one-off s (VAE + cache)", "FID",
                          "KID × 10³", "sampling s/image"], space_rows)
    report.add_table(result, "References (real images against the training set, same sample count)",
                     ["images", "FID", "KID × 10³"],
                     [[f"{args.num_heldout} held-out demo faces (the best reachable)",
                       references["heldout_faces"]["fid"], references["heldout_faces"]["kid"] * 1e3],
                      ["the VAE's reconstructions of them (the best a latent model can reach)",
                       references["vae_reconstructions"]["fid"], references["vae_reconstructions"]["kid"] * 1e3]])

    if not args.quick:
        report.add_target(result, "the full benchmark finishes within 30 minutes on 2 CPU cores",
                          f"{(time.monotonic() - result['_start_time']) / 60:.1f} min "
                          f"({result['machine']['cpu_cores']} cores, threads {torch.get_num_threads()})",
                          (time.monotonic() - result["_start_time"]) <= 1800)
    result["notes"] += verdicts(args, chosen, configs, pixel) + [
        "FID/KID use uldm.metrics.fid.RandomConvFeatures, a fixed random convolutional network (weights from a fixed seed, "
        "no download): it follows colours, layout and texture statistics of the samples, which is what the demo "
        "faces differ in, and its numbers compare only runs scored the same way (never published FIDs). FID at "
        f"{args.num_samples} samples is biased upwards by the sample count, equally for every run; KID is not.",
        f"Training time is the sum of the logged step times with {torch.get_num_threads()} torch thread(s); the "
        "pixel budget is the latent baseline's mean training time times the multiple, converted to steps with the "
        f"pixel model's step time ({pixel_step_s or 0:.3f} s) measured in a short calibration run.",
    ]
    if args.work_dir is not None or not args.quick:  # otherwise the work folder was a temporary one
        result["notes"].append(f"Sample grids of the first seed: {work / 'grids'} (not committed).")


def verdicts(args, chosen, configs, pixel) -> list[str]:
    """One line per lever: does it beat the baseline in every seed (paired), and pixel against latent."""
    notes = []
    for name in chosen[1:]:
        paired = configs[name]["against_baseline"]
        verdict = ("better than the baseline in every seed" if paired["seeds_better"] == paired["seeds"] else
                   "worse than the baseline in every seed" if paired["seeds_better"] == 0 else
                   f"better in {paired['seeds_better']} of {paired['seeds']} seeds only")
        notes.append(f"{name}: {verdict} (FID {paired['fid_difference_mean']:+.2f} ± "
                     f"{paired['fid_difference_std']:.2f} against the same seed's baseline).")
    base = configs["baseline"]
    for label, entry in pixel.items():
        ratio = entry["fid_mean"] / base["fid_mean"] if base["fid_mean"] > 0 else math.inf
        notes.append(f"pixel space at {label} the latent model's training time: FID {entry['fid_mean']:.2f} against "
                     f"{base['fid_mean']:.2f} ({ratio:.1f}x), sampling {entry['sample_s_per_image_mean'] / base['sample_s_per_image_mean']:.1f}x "
                     "the latent model's time per image.")
    return notes


if __name__ == "__main__":
    main()
