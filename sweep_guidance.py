#!/usr/bin/env python
"""Choose the guidance weight by measurement (docs/quality.md, "Choosing the guidance weight").

FID/KID per weight: each weight's samples (the same seeds every time) are scored against the training images of
the run (as synthesize_ema.py --sweep reads them) or --reference_dir; the table is printed and written with a curve
(<output_dir>/guidance_sweep.md, .json, .png), and the best weight becomes the pipeline's default (the guide is saved
into PIPELINE as a component; --no_save only measures):

    python sweep_guidance.py outputs/ffhq256 --guide outputs/ffhq256/checkpoint-2000 --guidance_scales 1 1.5 2 3 \\
        --fid_images 2000 --num_inference_steps 25 --scheduler dpmsolver++ --inception_weights weights.pth

With --guide_sigma_rels (the guide a run folder trained with --use_posthoc_ema) each weight is also tried with each
EMA length of the guide, synthesised from its snapshots (a weight x sigma_rel table).

DreamBooth, the fidelity-diversity curves: with --instance_data_dir the sweep measures, for each weight guided by
the base (default 0 0.5 1 1.5 2 3), each --lora_scales value (a LoRA result) and each validation of the run, how
close the samples are to the subject (DINO / CLIP-I with --dino_model / --clip_model, else the distance to the
photos) against how varied they are (<output_dir>/fidelity_diversity.md, .json, .png):

    python sweep_guidance.py outputs/me --instance_data_dir data/me_aligned --num_samples 64 --dino_model facebook/dino-vits16
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from uldm import args as cli
from uldm import guidance_sweep as sweep
from uldm.errors import InputError, exit_cleanly_on_input_errors
from uldm.guidance import BASE, load_guide
from uldm.metrics.fid_validation import FidConfig, PipelineFid, sweep_scorer
from uldm.plots import plot_fidelity_diversity, plot_guidance_sweep
from uldm.saving import write_json_atomically

logger = logging.getLogger("sweep_guidance")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pretrained_model_name_or_path", metavar="PIPELINE",
                        help="The model to guide: a saved pipeline folder (or hub id), or a DreamBooth result.")
    parser.add_argument("--guide", default=None, metavar="GUIDE",
                        help="A pipeline folder or hub id, a checkpoint-N folder of the run, or 'base' (a DreamBooth "
                             "result's base model; the default with --instance_data_dir).")
    parser.add_argument("--guidance_scales", type=float, nargs="*", default=None, metavar="W",
                        help=f"Weights to try (default {' '.join(f'{w:g}' for w in sweep.FID_WEIGHTS)}; with "
                             f"--instance_data_dir {' '.join(f'{w:g}' for w in sweep.DREAMBOOTH_WEIGHTS)}).")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="Guide only the steps whose noise level lies in (LO, HI]; default: every step.")
    parser.add_argument("--output_dir", default=None, help="Where the table, JSON and curve go. Default: PIPELINE.")
    parser.add_argument("--no_save", action="store_true", help="Only measure: leave the pipeline's default as it is.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the samples (the same for every weight).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ema = parser.add_argument_group("the guide's EMA length (a guide run trained with --use_posthoc_ema)")
    ema.add_argument("--guide_sigma_rels", type=float, nargs="+", default=None,
                     help="Also sweep the guide's EMA length, synthesised from its snapshots (e.g. 0.05 0.1 0.2).")
    ema.add_argument("--guide_snapshot_dir", default=None, help="Default: GUIDE/ema_snapshots.")
    ema.add_argument("--guide_at_step", type=int, default=None,
                     help="The guide's EMA as it was at this snapshot step (an earlier point of the run).")
    ema.add_argument("--max_fit_error", type=float, default=0.2, help="As synthesize_ema.py's.")
    cli.add_fid_args(parser, in_training=False)
    dreambooth = parser.add_argument_group("DreamBooth: the fidelity-diversity curves")
    dreambooth.add_argument("--instance_data_dir", default=None,
                            help="The subject's photos: measure fidelity against diversity instead of FID.")
    dreambooth.add_argument("--lora_scales", type=float, nargs="*", default=list(sweep.LORA_SCALES),
                            help="LoRA scales of the second curve (a LoRA result).")
    dreambooth.add_argument("--num_samples", type=int, default=32, help="Samples per point.")
    dreambooth.add_argument("--batch_size", type=int, default=16)
    dreambooth.add_argument("--dino_model", default=None, help="DINO ViT folder or hub id (fidelity = DINO).")
    dreambooth.add_argument("--clip_model", default=None, help="CLIP folder or hub id (fidelity = CLIP-I).")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    dreambooth = args.instance_data_dir is not None
    default = sweep.DREAMBOOTH_WEIGHTS if dreambooth else sweep.FID_WEIGHTS
    weights = default if args.guidance_scales is None else args.guidance_scales
    args.guidance_scales = sweep.check_dial_values(weights, "--guidance_scales")
    cli.check_guidance_interval(args.guidance_interval)
    if dreambooth:
        args.guide = args.guide or BASE
        args.lora_scales = sweep.check_dial_values(args.lora_scales, "--lora_scales")
        if args.num_samples < 2:
            raise InputError("--num_samples must be at least 2: the variety is a distance between two samples.")
    else:
        if not args.guide:
            raise InputError("Give --guide GUIDE: a pipeline folder or hub id, a checkpoint-N folder or 'base'.")
        if args.validation_fid_images < 2:
            raise InputError("Each weight is scored with FID: give --fid_images N (a few hundred at least).")
        cli.check_fid_args(args)
    if args.guide_sigma_rels is not None and dreambooth:
        raise InputError("--guide_sigma_rels belongs to the FID sweep, not to --instance_data_dir.")
    source = args.pretrained_model_name_or_path
    if args.output_dir is None and not os.path.isdir(source):
        raise InputError(f"{source} is no local folder to write the results into: give --output_dir.")
    args.output_dir = Path(args.output_dir or source)


def load_model_and_guide(args: argparse.Namespace):
    """The pipeline (on --device) and its guide, checked to fit before anything is sampled or written."""
    from uldm.first_stage import load_saved_model

    source = args.pretrained_model_name_or_path
    try:
        pipeline = load_saved_model(source)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"Could not load the pipeline '{source}': {error}") from error
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(args.device)
    return pipeline, load_guide(args.guide, pipeline, source=source)


def write_results(output_dir: Path, name: str, table: str, record: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.md").write_text(table)
    write_json_atomically(output_dir / f"{name}.json", record, end="\n")


def fid_sweep(args: argparse.Namespace) -> None:
    source = args.pretrained_model_name_or_path
    pipeline, guide = load_model_and_guide(args)
    ema_lengths = None
    if args.guide_sigma_rels:
        if not isinstance(guide, torch.nn.Module):
            raise InputError("--guide_sigma_rels needs a guide with weights of its own, not the LoRA switched off.")
        snapshot_dir = args.guide_snapshot_dir or Path(args.guide) / "ema_snapshots"
        ema_lengths = sweep.GuideEmaLengths.check(snapshot_dir, args.guide_sigma_rels, guide, args.guide_at_step,
                                                  args.max_fit_error)
    not_saved = "--no_save" if args.no_save else sweep.why_not_saved(pipeline, guide, source)
    scorer = sweep_scorer(cli.config_from(FidConfig, args), source, args.validation_inference_steps, args.seed,
                          args.device)
    score = PipelineFid(scorer, args.validation_scheduler, args.device)
    rows = sweep.sweep_weights(pipeline, guide, args.guidance_scales, score, args.guidance_interval, ema_lengths)
    best = sweep.best_row(rows)
    extractor = args.fid_feature_extractor + ("" if args.fid_feature_extractor == "inception"
                                              else ", not comparable with published FIDs")
    description = (f"Guidance of {source} by {args.guide}: FID/KID of {args.validation_fid_images} samples "
                   f"({args.validation_scheduler}, {args.validation_inference_steps} steps"
                   + (f", guidance interval {tuple(args.guidance_interval)}" if args.guidance_interval else "")
                   + f"; features: {extractor}).")
    table = sweep.weight_table(rows, description)
    if not_saved is None:
        if ema_lengths is not None:
            ema_lengths.load(guide, best["guide_sigma_rel"])
        sweep.keep_best(pipeline, guide, best, args.guidance_interval, source)
        outcome = f"Saved w = {best['guidance_scale']:g} as the default of {source}" + (
            "" if best["guidance_scale"] != sweep.UNGUIDED else " (unguided scored best: saved without a guide)")
    else:
        outcome = (f"Not saved into the pipeline ({not_saved}): the best weight, w = {best['guidance_scale']:g}, is in "
                   f"{args.output_dir / (sweep.SWEEP_NAME + '.json')}; sample with --guidance_scale "
                   f"{best['guidance_scale']:g}.")
    record = {"pipeline": str(source), "guide": str(args.guide), "guidance_interval": args.guidance_interval,
              "fid_images": args.validation_fid_images, "scheduler": args.validation_scheduler,
              "num_inference_steps": args.validation_inference_steps, "feature_extractor": args.fid_feature_extractor,
              "rows": rows, "best": best, "saved_as_default": not_saved is None, "outcome": outcome}
    write_results(args.output_dir, sweep.SWEEP_NAME, table, record)
    plot_guidance_sweep(rows, args.output_dir / f"{sweep.SWEEP_NAME}.png", title=description)
    print(table)
    print(outcome)


def dreambooth_curves(args: argparse.Namespace) -> None:
    from uldm.dreambooth import SubjectReferences, base_resolution, instance_photos, list_instance_images
    from uldm.metrics.subject_similarity import InstanceEmbeddings
    from uldm.sampling import make_scheduler
    from uldm.validation import fixed_validation_noise

    source = args.pretrained_model_name_or_path
    photo_files = list_instance_images(args.instance_data_dir)
    pipeline, guide = load_model_and_guide(args)
    pipeline.scheduler = make_scheduler(args.validation_scheduler, pipeline.scheduler.config)
    photos = instance_photos(photo_files, args.instance_data_dir, base_resolution(pipeline))
    encoders = {metric: name for metric, name in (("dino", args.dino_model), ("clip_i", args.clip_model)) if name}
    meter = sweep.SubjectMeter(SubjectReferences.from_pixels(pipeline, photos.to(args.device)),
                               InstanceEmbeddings.from_photos(photo_files, encoders, args.device) if encoders else None)
    config = pipeline.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    noise = fixed_validation_noise(args.num_samples, (config.in_channels, size, size), args.seed, "cpu")
    draw = sweep.Draw(noise, args.validation_inference_steps, args.batch_size)
    result = sweep.fidelity_curves(pipeline, guide, args.guidance_scales, args.lora_scales, meter, draw,
                                   source if os.path.isdir(source) else None, args.guidance_interval)
    description = (f"Fidelity against variety of {source}: {args.num_samples} samples per point "
                   f"({args.validation_scheduler}, {args.validation_inference_steps} steps), guide {args.guide}.")
    table = sweep.curves_table(result.curves, meter, description) + "".join(f"\n{note}\n" for note in result.notes)
    fidelity_label, diversity_label = meter.labels
    write_results(args.output_dir, sweep.CURVES_NAME, table,
                  {"pipeline": str(source), "guide": str(args.guide), "fidelity": fidelity_label,
                   "diversity": diversity_label, "num_samples": args.num_samples, "curves": result.curves,
                   "notes": result.notes})
    plot_fidelity_diversity(result.curves, args.output_dir / f"{sweep.CURVES_NAME}.png", fidelity_label,
                            diversity_label, meter.lower_is_more_subject)
    print(table)


@exit_cleanly_on_input_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.instance_data_dir is not None:
        dreambooth_curves(args)
    else:
        fid_sweep(args)


if __name__ == "__main__":
    main()
