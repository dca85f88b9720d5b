#!/usr/bin/env python
"""Post-hoc EMA: make the pipeline of any EMA length from the snapshots a training run saved.

    python synthesize_ema.py outputs/ffhq256 --sigma_rel 0.05 0.1 0.15 --output_dir outputs/ffhq256-phema

PIPELINE is the output folder of a training run with --use_posthoc_ema (a saved pipeline with
ema_snapshots/ inside; --snapshot_dir if the snapshots are elsewhere). For each --sigma_rel (EDM2's
relative EMA length, between 0 and 0.2887) the snapshots are combined by least squares into that
EMA (Karras et al. 2023, arXiv 2312.02696), and the pipeline is written with those UNet weights to
<output_dir>/sigma_rel_<value>/, with posthoc_ema.json saying which snapshots went in and how
closely their combination matches the asked-for profile.

With --sweep, each EMA is scored with FID/KID on --validation_fid_images samples (the options of
FID during training) against the training images, read and preprocessed as the run's
training_args.json says (or --fid_reference); the table is printed and written to
<output_dir>/fid_sweep.md, and only the best pipeline is written (--keep_all: every one):

    python synthesize_ema.py outputs/ffhq256 --sweep --sigma_rel 0.03 0.05 0.08 0.12 0.16 0.2 \
        --validation_fid_images 2000 --inception_weights weights-inception-2015-12-05-6726825d.pth \
        --output_dir outputs/ffhq256-phema
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from uldm import args as cli
from uldm.errors import InputError, exit_cleanly_on_input_errors
from uldm.metrics.fid_validation import FidConfig, PipelineFid, sweep_scorer, sweep_table
from uldm.training.posthoc_ema import MAX_SIGMA_REL, SNAPSHOT_DIR_NAME, check_sigma_rel, write_synthesized_pipelines

logger = logging.getLogger("synthesize_ema")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pretrained_model_name_or_path", metavar="PIPELINE",
                        help=f"Saved pipeline folder of the training run (with {SNAPSHOT_DIR_NAME}/ inside).")
    parser.add_argument("--sigma_rel", type=float, nargs="+", required=True,
                        help=f"One or more EMA lengths to make (0 < sigma_rel < {MAX_SIGMA_REL:.4f}; EDM2 used 0.05-0.2).")
    parser.add_argument("--output_dir", type=str, required=True, help="Where the pipelines go, one folder each.")
    parser.add_argument("--snapshot_dir", type=str, default=None, help=f"Default: PIPELINE/{SNAPSHOT_DIR_NAME}.")
    parser.add_argument("--at_step", type=int, default=None,
                        help="Make the EMA as it was at this snapshot step (default: the latest snapshot).")
    parser.add_argument("--max_fit_error", type=float, default=0.2,
                        help="Refuse a sigma_rel whose profile the snapshots match worse than this (relative L2).")
    sweep = parser.add_argument_group("the sweep: choose the EMA length by FID")
    sweep.add_argument("--sweep", action="store_true",
                       help="Score each --sigma_rel with FID/KID, print the table (also in <output_dir>/fid_sweep.md) "
                            "and write only the best pipeline.")
    sweep.add_argument("--keep_all", action="store_true", help="With --sweep: write every pipeline, not only the best.")
    sweep.add_argument("--seed", type=int, default=0, help="Seed of the FID samples (image i from seed + i).")
    sweep.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_fid_args(parser, in_training=False)
    args = parser.parse_args(argv)
    if args.sweep and not args.validation_fid_images:
        raise InputError("--sweep scores each EMA with FID: give --validation_fid_images N (a few hundred at least; "
                         "more makes the differences between EMA lengths easier to trust).")
    if args.keep_all and not args.sweep:
        raise InputError("--keep_all belongs to --sweep (without it every pipeline is written anyway).")
    cli.check_fid_args(args)
    return args


def fid_of_each_candidate(args) -> PipelineFid:
    """The score function of the sweep, with the reference features ready (cached with the training run's)."""
    config = cli.config_from(FidConfig, args)
    scorer = sweep_scorer(config, args.pretrained_model_name_or_path, args.validation_inference_steps, args.seed,
                          args.device)
    return PipelineFid(scorer, args.validation_scheduler, args.device)


@exit_cleanly_on_input_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for sigma_rel in args.sigma_rel:
        check_sigma_rel(sigma_rel)
    if args.max_fit_error <= 0:
        raise InputError(f"--max_fit_error must be positive, got {args.max_fit_error}.")
    score = fid_of_each_candidate(args) if args.sweep else None
    results = write_synthesized_pipelines(
        args.pretrained_model_name_or_path, args.sigma_rel, args.output_dir,
        snapshot_dir=args.snapshot_dir, at_step=args.at_step, max_fit_error=args.max_fit_error,
        score=score, keep_only_best=args.sweep and not args.keep_all,
    )
    if score is None:
        for result in results:
            print(f"sigma_rel {result.sigma_rel:g} at step {result.step}: profile fit error {result.fit_error:.2e} "
                  f"-> {result.folder}")
        return
    rows = [{"sigma_rel": r.sigma_rel, "fid": s["fid"], "kid": s["kid"], "fit_error": r.fit_error,
             "folder": r.folder.name if r.folder else None} for r, s in zip(results, score.results)]
    extractor = args.fid_feature_extractor + ("" if args.fid_feature_extractor == "inception"
                                              else ", not comparable with published FIDs")
    table = sweep_table(rows, f"Post-hoc EMA of {args.pretrained_model_name_or_path} at step {results[0].step}: FID/KID "
                              f"of {args.validation_fid_images} samples ({args.validation_scheduler}, "
                              f"{args.validation_inference_steps} steps; features: {extractor}).")
    (Path(args.output_dir) / "fid_sweep.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
