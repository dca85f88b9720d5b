#!/usr/bin/env python
"""Few-step sampling on the demo data: a consistency-distilled student against its teacher's solvers at equal steps.

    python bench/bench_distill.py            # the full measurement (about 40 minutes on 2 CPU cores, the VAE cached)
    python bench/bench_distill.py --quick    # a smoke test: a few steps of everything (under a minute)

The machinery of bench/bench_quality.py: the demo faces, the quick start's VAE kept in --work_dir, models trained
by the real scripts in this process, --num_samples images (image i from seed i) scored with FID and KID on
`uldm.metrics.fid.RandomConvFeatures`, once per training seed.

Per seed: a teacher (the quick start's recipe, --steps steps, as bench_guidance's main model) and its student
(distill.py, --distill_steps steps). Scored: the student at each --student_steps (LCMScheduler); the teacher with
DPM-Solver++ at 25 steps (the quality to keep) and with DPM-Solver++ and UniPC at each --solver_steps (the honest
baseline: the same number of UNet calls). Also: the distillation's cost as a fraction of the teacher's training
(their training loops' seconds) and the seconds per sampled image.

LoRA (first seed): a LoRA student of the teacher (LCM-LoRA), scored like the full one; and whether it carries over
to a DreamBooth fine-tune of the teacher (the quick start's step 5): the fine-tune with the base's student
adapter and its scheduler, against the fine-tune itself with DPM-Solver++ at 25 and at the same steps, and a
student distilled from the fine-tune itself; subject distance and spread as DreamBooth's validation measures them.
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
from bench.bench_guidance import cell, dreambooth_argv, summarise, train_model  # noqa: E402
from bench.bench_guidance import score as scored  # noqa: E402
from bench.bench_quality import (  # noqa: E402
    DEFAULT_WORK_DIR, RESOLUTION, Scorer, load_sampler, paired_with_baseline, prepare_demo, run_in_work_dir,
    run_script, save_grid,
)
from bench.harness import loop_seconds  # noqa: E402

NAME = "distill"
TITLE = "Few-step sampling: consistency distillation against the teacher's solvers at equal steps"
FIGURE = report.REPO_ROOT / "docs" / "images" / "distill.png"
REFERENCE_STEPS = 25  # the teacher's usual DPM-Solver++ steps
SOLVERS = {"dpmsolver++": "DPM-Solver++", "unipc": "UniPC"}
# name: (full, quick)
DEFAULTS = {
    "num_images": (1024, 64),
    "vae_steps": (2400, 6),
    "steps": (800, 8),
    "distill_steps": (400, 4),
    "seeds": ([0, 1, 2], [0]),
    "num_samples": (256, 8),
    "student_steps": ([1, 2, 4, 8], [1, 2]),
    "solver_steps": ([2, 4, 8], [2]),
    "long_distill_steps": (1600, 8),
    "lora_rank": (16, 2),
    "dreambooth_steps": (300, 2),
    "num_class_images": (64, 4),
    "dreambooth_samples": (64, 8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=None, help="Demo faces to train on (default 1024).")
    parser.add_argument("--vae", type=str, default=None, help="A trained first stage; default: the quick start's VAE.")
    parser.add_argument("--vae_steps", type=int, default=None, help="Steps of that VAE (the quick start's 2400).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps of each teacher (default 800).")
    parser.add_argument("--distill_steps", type=int, default=None, help="distill.py steps of each student (400).")
    parser.add_argument("--distill_learning_rate", type=float, default=1e-4, help="The full student's (1e-4).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default 0 1 2).")
    parser.add_argument("--num_samples", type=int, default=None, help="Samples scored per configuration (256).")
    parser.add_argument("--student_steps", type=int, nargs="+", default=None, help="Student steps (1 2 4 8).")
    parser.add_argument("--solver_steps", type=int, nargs="+", default=None,
                        help="Teacher steps with DPM-Solver++ and UniPC (2 4 8; 25 DPM-Solver++ steps always).")
    parser.add_argument("--long_distill_steps", type=int, default=None,
                        help="First seed only: a student distilled this many steps, its FID tracked during the run "
                             "every quarter (distill.py --validation_fid_images) and scored at the end like the others "
                             "(default 1600; 0 skips it).")
    parser.add_argument("--lora_rank", type=int, default=None, help="Rank of the LoRA student (16; 0 skips LoRA).")
    parser.add_argument("--dreambooth_steps", type=int, default=None,
                        help="DreamBooth steps (the quick start's 300; 0 skips the carry-over test).")
    parser.add_argument("--num_class_images", type=int, default=None, help="Prior-preservation images (64).")
    parser.add_argument("--dreambooth_samples", type=int, default=None, help="Samples per DreamBooth point (64).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as bench_quality).")
    parser.add_argument("--work_dir", type=str, default=None,
                        help=f"Data, VAE and runs (default {DEFAULT_WORK_DIR}; with --quick a temporary folder).")
    parser.add_argument("--figure", type=str, default=None,
                        help=f"The PNG of FID against steps (default {FIGURE.relative_to(report.REPO_ROOT)}; with "
                             "--quick in --results_dir).")
    args = report.parse_benchmark_args(parser, argv, DEFAULTS)
    if args.figure is None:
        args.figure = str(Path(args.results_dir) / "distill.png" if args.quick else FIGURE)
    args.sampling_steps = REFERENCE_STEPS  # the class images' sampler steps (bench_guidance.dreambooth_argv)
    return args


# ------------------------------------------------------------------------------ training


def distill_argv(args, teacher: Path, faces: Path, output_dir: Path, work: Path, steps: int, options: list) -> list:
    return ["--pretrained_model_name_or_path", teacher, "--train_data_dir", faces, "--random_flip",
            "--cache_latents", "--latent_cache_dir", work / "latent_cache", "--train_batch_size", 32,
            "--max_train_steps", steps, "--validation_steps", 0, "--num_validation_images", 0,
            "--checkpointing_steps", 0, "--report_to", "none", "--seed", 0, "--output_dir", output_dir, *options]


def distill(args, teacher: Path, faces: Path, work: Path, name: str, options: list, steps: int | None = None) -> Path:
    output_dir = work / "runs" / f"distill-{name}"
    shutil.rmtree(output_dir, ignore_errors=True)
    run_script("distill", distill_argv(args, teacher, faces, output_dir, work, steps or args.distill_steps, options))
    return output_dir


def long_distillation(args, teacher: Path, faces: Path, work: Path) -> tuple[Path, list[dict]]:
    """A student distilled --long_distill_steps steps, with distill.py's own FID (random-conv features, its
    --validation_fid_images samples against the training images) at every quarter: how far more distillation goes."""
    from uldm.training import read_metrics

    every = max(1, args.long_distill_steps // 4)
    folder = distill(args, teacher, faces, work, "long-student", [
        "--learning_rate", args.distill_learning_rate, "--validation_steps", every, "--validation_fid_images",
        args.num_samples, "--fid_feature_extractor", "random-conv", "--student_inference_steps", 1, 2, 4],
        steps=args.long_distill_steps)
    curve = [{key: value for key, value in row.items() if key == "step" or key.startswith("fid_")}
             for row in read_metrics(folder, having="fid_1step")]
    for row in curve:
        print(f"long distillation step {row['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                                    if k != "step"), flush=True)
    return folder, curve


# ------------------------------------------------------------------------------ sampling


def score(scorer: Scorer, sampler, num_samples: int, steps: int, grid: Path | None = None) -> dict:
    record = scored(scorer, sampler, num_samples, steps)
    images = record.pop("images")
    if grid is not None:
        save_grid(images, grid)
    return record


def with_scheduler(sampler, name: str):
    from uldm.sampling import make_scheduler

    sampler.scheduler = make_scheduler(name, sampler.scheduler.config)
    return sampler


def score_seed(args, scorer: Scorer, teacher: Path, students: dict[str, Path], seed: int, work: Path) -> dict:
    """'teacher SOLVER@S' and 'STUDENT@S' -> scores, for one seed's teacher and its students."""
    grids = work / "grids" if seed == args.seeds[0] else None
    records = {}
    for name in SOLVERS:
        sampler = with_scheduler(load_sampler(teacher), name)
        for steps in sorted({*args.solver_steps, *([REFERENCE_STEPS] if name == "dpmsolver++" else [])}):
            records[f"teacher {name}@{steps}"] = score(scorer, sampler, args.num_samples, steps,
                                                       grids / f"distill-teacher-{name}-{steps}.png" if grids else None)
    for student, folder in students.items():
        sampler = load_sampler(folder)
        for steps in args.student_steps:
            records[f"{student}@{steps}"] = score(scorer, sampler, args.num_samples, steps,
                                                  grids / f"distill-{student.replace(' ', '_')}-{steps}.png"
                                                  if grids else None)
    for key, record in records.items():
        print(f"seed {seed} {key}: FID {record['fid']:.3f}, KID {record['kid']:.5f}", flush=True)
    return records


# ------------------------------------------------------------------------------ DreamBooth carry-over


@torch.no_grad()
def subject_point(pipeline, references, num_samples: int, steps: int, same_noise=None) -> dict:
    """Subject distance and spread of the samples; with `same_noise` (thumbnails of the fine-tune's own 25-step
    samples from the same noise), also the mean paired distance to them: how faithfully this sampler follows the
    fine-tune's ODE, which distance and spread alone do not show (a blurrier sampler is closer to everything)."""
    from uldm.dreambooth import thumbnails
    from uldm.metrics.distances import paired_distances
    from uldm.sampling import generators_for_indices

    indices = list(range(num_samples))
    start = time.perf_counter()
    latents = pipeline(batch_size=len(indices), num_inference_steps=steps, generator=generators_for_indices(0, indices),
                       output_type="latent").images
    images = pipeline.decode_latents(latents).permute(0, 2, 3, 1).float().cpu().numpy()
    point = {"steps": steps, **references.measure(latents, images),
             "sample_s_per_image": (time.perf_counter() - start) / num_samples, "thumbnails": thumbnails(images)}
    if same_noise is not None:
        point["paired_distance"] = float(paired_distances(point["thumbnails"], same_noise, per_element=True).mean())
    return point


def dreambooth_carry_over(args, teacher: Path, lora_student: Path, faces: Path, work: Path) -> dict[str, list[dict]]:
    """The fine-tune sampled four ways; each a list of points (one per step count)."""
    from train_dreambooth_unconditional import instance_photos
    from uldm.demo_data import SUBJECT_DIR
    from uldm.dreambooth import SubjectReferences
    from uldm.lora import adapter_scheduler

    subject = faces.parent / SUBJECT_DIR
    class_dir = work / "runs" / "distill-class-images"
    fine_tune = work / "runs" / "distill-dreambooth"
    for folder in (class_dir, fine_tune):
        shutil.rmtree(folder, ignore_errors=True)
    run_script("train_dreambooth_unconditional", dreambooth_argv(
        args, teacher, subject, class_dir, fine_tune,
        ["--with_prior_preservation", "--prior_loss_weight", 0.5, "--learning_rate", 5e-5]))
    own_student = distill(args, fine_tune, faces, work, "dreambooth-student", [])
    pipeline = load_sampler(fine_tune)
    references = SubjectReferences.from_pixels(
        pipeline, instance_photos(sorted(subject.glob("*.png")), str(subject), RESOLUTION))
    reference = subject_point(pipeline, references, args.dreambooth_samples, REFERENCE_STEPS)["thumbnails"]

    def points(sampler, step_counts) -> list[dict]:
        return [subject_point(sampler, references, args.dreambooth_samples, steps, reference) for steps in step_counts]

    curves = {"fine-tune, DPM-Solver++": points(pipeline, sorted({*args.solver_steps, REFERENCE_STEPS}))}
    pipeline.load_lora_weights(str(lora_student))
    pipeline.scheduler = adapter_scheduler(lora_student)
    curves["fine-tune + the base's LoRA student"] = points(pipeline, args.student_steps)
    curves["student distilled from the fine-tune"] = points(load_sampler(own_student), args.student_steps)
    for name, curve in curves.items():
        for point in curve:
            point.pop("thumbnails")
            print(f"DreamBooth {name} @{point['steps']}: distance {point['instance_distance']:.4f}, spread "
                  f"{point['sample_spread']:.4f}, paired distance to 25 steps {point['paired_distance']:.4f}",
                  flush=True)
    for folder in (class_dir, fine_tune, own_student):
        shutil.rmtree(folder, ignore_errors=True)
    return curves


# ------------------------------------------------------------------------------ summaries


def collect(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    keys = next(iter(per_seed.values())).keys()
    return {key: summarise([{"seed": seed, **records[key]} for seed, records in per_seed.items()]) for key in keys}


def best_solver(args, configs: dict, steps: int) -> str:
    return min((f"teacher {name}@{steps}" for name in SOLVERS), key=lambda key: configs[key]["fid_mean"])


def verdicts(args, configs: dict) -> list[str]:
    """The issue's two goals, measured: 4 student steps within 10% of the teacher's 25-step FID; 2 student steps
    better than any solver at 4."""
    reference = configs[f"teacher dpmsolver++@{REFERENCE_STEPS}"]
    lines = []
    if 4 in args.student_steps:
        student = configs["student@4"]
        ratio = student["fid_mean"] / reference["fid_mean"]
        lines.append(f"4 student steps {'are' if ratio <= 1.1 else 'are not'} within 10% of the teacher's "
                     f"{REFERENCE_STEPS}-step FID: {cell(student)} against {cell(reference)} ({ratio:.2f}x).")
    if 2 in args.student_steps and 4 in args.solver_steps:
        solver = best_solver(args, configs, 4)
        paired = paired_with_baseline(configs["student@2"], configs[solver])
        won = paired["seeds_better"] == paired["seeds"] and paired["fid_difference_mean"] < 0
        lines.append(f"2 student steps {'beat' if won else 'did not beat'} the best solver at 4 steps ({solver}): "
                     f"FID {cell(configs['student@2'])} against {cell(configs[solver])}, better in "
                     f"{paired['seeds_better']} of {paired['seeds']} seeds.")
    for steps in args.solver_steps:
        if steps in args.student_steps:
            solver = best_solver(args, configs, steps)
            paired = paired_with_baseline(configs[f"student@{steps}"], configs[solver])
            lines.append(f"At {steps} steps the student scored {cell(configs[f'student@{steps}'])} against "
                         f"{cell(configs[solver])} for the teacher with {solver.split()[1].split('@')[0]} (better in "
                         f"{paired['seeds_better']} of {paired['seeds']} seeds).")
    return lines


def long_verdict(args, records: dict) -> list[str]:
    """The long student against its own teacher (the first seed's) on the issue's two goals."""
    name = f"student, {args.long_distill_steps} steps"
    if f"{name}@4" not in records or "teacher unipc@4" not in records:
        return []
    reference = records[f"teacher dpmsolver++@{REFERENCE_STEPS}"]["fid"]
    solver = min(records[f"teacher {solver}@4"]["fid"] for solver in SOLVERS)
    one, two, four = (records[f"{name}@{steps}"]["fid"] for steps in (1, 2, 4))
    return [f"Distilled {args.long_distill_steps} steps (first seed only): 1 step FID {one:.2f} and 4 steps {four:.2f} "
            f"against the teacher's {reference:.2f} at {REFERENCE_STEPS} steps ({one / reference:.2f}x and "
            f"{four / reference:.2f}x); 2 steps {two:.2f} against {solver:.2f} for the better solver at 4 steps."]


def add_tables(result: dict, args, configs: dict, costs: list[dict], curves: dict) -> None:
    rows = []
    for key, config in configs.items():
        who, steps = key.rsplit("@", 1)
        rows.append([who, int(steps), cell(config), cell(config, "kid", 1e3), config["sample_s_per_image_mean"]])
    rows.sort(key=lambda row: (row[1], row[0]))
    report.add_table(result, f"FID / KID × 10³ against the number of steps ({args.num_samples} samples, mean ± std over "
                             f"seeds {args.seeds}; one UNet call per step for every row, DPM-Solver++ and UniPC "
                             "being single-step-per-call multistep solvers)",
                     ["sampler", "steps", "FID", "KID × 10³", "s/image (CPU, 1 thread)"], rows)
    report.add_table(result, "The cost of distillation (training loops' seconds, the same machine)",
                     ["seed", "teacher steps", "teacher s", "student steps", "student s", "student / teacher"],
                     [[c["seed"], args.steps, c["teacher_s"], args.distill_steps, c["student_s"],
                       f"{c['student_s'] / c['teacher_s']:.2f}"] for c in costs])
    if curves:
        rows = [[name, point["steps"], point["instance_distance"], point["sample_spread"], point["paired_distance"]]
                for name, points in curves.items() for point in points]
        report.add_table(result, f"A LoRA student of the base on a DreamBooth fine-tune of it (first seed, "
                                 f"{args.dreambooth_samples} samples; subject distance: RMS to the nearest instance "
                                 "photo; spread: mean pairwise RMS distance; paired distance: RMS to the fine-tune's "
                                 f"own {REFERENCE_STEPS}-step DPM-Solver++ sample from the same noise; 32 px "
                                 "thumbnails in [0, 1])",
                         ["sampling", "steps", "subject distance", "spread", "paired distance"], rows)


def draw_figure(args, configs: dict) -> Path:
    import matplotlib.ticker

    from uldm.plots import pyplot, save_figure

    figure, axis = pyplot().subplots(figsize=(6.5, 4.2), dpi=100)
    series = {f"teacher, {label}": [f"teacher {name}@{s}" for s in args.solver_steps] for name, label in SOLVERS.items()}
    series.update({f"{student}": [f"{student}@{s}" for s in args.student_steps]
                   for student in ("student", f"student, {args.long_distill_steps} steps", "LoRA student")
                   if f"{student}@{args.student_steps[0]}" in configs})
    for label, keys in series.items():
        steps = [int(key.rsplit("@", 1)[1]) for key in keys]
        axis.errorbar(steps, [configs[k]["fid_mean"] for k in keys], [configs[k]["fid_std"] for k in keys],
                      marker="o", capsize=3, label=label)
    reference = configs[f"teacher dpmsolver++@{REFERENCE_STEPS}"]["fid_mean"]
    axis.axhline(reference, color="gray", linestyle="--", label=f"teacher, DPM-Solver++ {REFERENCE_STEPS} steps")
    axis.set(xscale="log", yscale="log", xlabel="steps (UNet calls)", ylabel="FID (random-conv features)",
             title=f"Few-step sampling on the demo (mean ± std over {len(args.seeds)} seeds;\nthe LoRA and "
                   "longer students: the first seed)")
    axis.set_xticks(sorted({*args.student_steps, *args.solver_steps}))
    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for formatter in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
        formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, args.figure)


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    return run_in_work_dir(parse_args(argv), run, "bench-distill-")


def run(args: argparse.Namespace, work: Path) -> dict:
    from uldm.metrics.fid import RandomConvFeatures

    result = report.start_result(NAME, TITLE, args)
    demo = prepare_demo(args, work, num_subject_images=8)
    faces, vae_dir, vae_source, vae_wall_s, scorer = (demo.faces, demo.vae_dir, demo.vae_source, demo.vae_wall_s,
                                                      demo.scorer)
    per_seed, costs, curves, long_curve = {}, [], {}, []
    for seed in args.seeds:
        teacher = train_model(args, faces, vae_dir, work, "teacher", seed, args.steps, [])
        students = {"student": distill(args, teacher, faces, work, f"student-seed{seed}",
                                       ["--learning_rate", args.distill_learning_rate])}
        costs.append({"seed": seed, "teacher_s": loop_seconds(teacher)[0],
                      "student_s": loop_seconds(students["student"])[0]})
        first = seed == args.seeds[0]
        if first and args.long_distill_steps:
            students[f"student, {args.long_distill_steps} steps"], long_curve = long_distillation(
                args, teacher, faces, work)
        if first and args.lora_rank:
            students["LoRA student"] = distill(args, teacher, faces, work, "lora-student",
                                               ["--use_lora", "--rank", args.lora_rank, "--learning_rate", 1e-3])
        per_seed[seed] = score_seed(args, scorer, teacher, students, seed, work)
        if first and args.lora_rank and args.dreambooth_steps:
            curves = dreambooth_carry_over(args, teacher, students["LoRA student"], faces, work)
        for folder in (teacher, *students.values()):
            shutil.rmtree(folder)
    first_only = ("LoRA", "student, ")  # the students of the first seed only
    lora = {key: value for key, value in per_seed[args.seeds[0]].items() if key.startswith(first_only)}
    configs = collect({seed: {k: v for k, v in records.items() if not k.startswith(first_only)}
                       for seed, records in per_seed.items()})
    configs.update({key: summarise([{"seed": args.seeds[0], **value}]) for key, value in lora.items()})

    result["settings"] = {
        "data": f"demo faces, {args.num_images} at {RESOLUTION} px", "vae": vae_source,
        "teacher": f"tiny preset (0.7M) on 4x8x8 latents, {args.steps} steps, the quick start's recipe "
                   "(v-prediction, batch 32, lr 1e-3 cosine, EMA max decay 0.999, flips)",
        "student": f"distill.py: {args.distill_steps} steps, batch 32, lr {args.distill_learning_rate:g} constant, "
                   "EMA target 0.95, pseudo-Huber c 0.001, 50-point DDIM grid, flips",
        "long_distill_steps": args.long_distill_steps,
        "lora_student": f"rank {args.lora_rank} (attention+conv), lr 1e-3, first seed only" if args.lora_rank else None,
        "seeds": args.seeds, "num_samples": args.num_samples, "student_steps": args.student_steps,
        "solver_steps": args.solver_steps, "feature_extractor": f"uldm.metrics.fid.RandomConvFeatures "
                                                                f"({RandomConvFeatures().num_features} features)",
        "dreambooth_steps": args.dreambooth_steps, "torch_threads": torch.get_num_threads(),
    }
    lines = verdicts(args, configs) + long_verdict(args, per_seed[args.seeds[0]])
    figure = draw_figure(args, configs)
    result["results"] = {"configs": configs, "costs": costs, "dreambooth": curves, "verdicts": lines,
                         "long_distillation": long_curve, "figure": str(figure)}
    add_tables(result, args, configs, costs, curves)
    if long_curve:
        report.add_table(result, f"FID during a {args.long_distill_steps}-step distillation (first seed; distill.py's "
                                 f"own FID: {args.num_samples} samples against the training images, random-conv; "
                                 "step 0 is the teacher sampled by LCMScheduler)",
                         ["distillation step", *(f"{n} step{'s' * (n > 1)}" for n in (1, 2, 4))],
                         [[row["step"], *(row.get(f"fid_{n}step") for n in (1, 2, 4))] for row in long_curve])
    if not args.quick:
        minutes = (time.monotonic() - result["_start_time"] - vae_wall_s) / 60
        report.add_target(result, "the full benchmark finishes within 45 minutes on 2 CPU cores (the VAE cached)",
                          f"{minutes:.1f} min (threads {torch.get_num_threads()}, load at start "
                          f"{result['load_at_start'][0]:.1f})", minutes <= 45)
    result["notes"] += [*lines,
                        "Every configuration samples the same noise per image (image i from seed i); the "
                        "comparisons are paired by training seed.",
                        "FID/KID on uldm.metrics.fid.RandomConvFeatures (a fixed random conv net): numbers compare "
                        "runs of this benchmark with each other, never with published FIDs.",
                        f"![FID against steps]({Path(args.figure).name if args.quick else 'images/' + Path(args.figure).name})"]
    report.finish_result(result, args)
    return result


if __name__ == "__main__":
    main()
