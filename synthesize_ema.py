#!/usr/bin/env python
"""Post-hoc EMA: make the pipeline of any EMA length from the snapshots a training run saved.

    python synthesize_ema.py outputs/ffhq256 --sigma_rel 0.05 0.1 0.15 --output_dir outputs/ffhq256-phema

PIPELINE is the output folder of a training run with --use_posthoc_ema (a saved pipeline with
ema_snapshots/ inside; --snapshot_dir if the snapshots are elsewhere). For each --sigma_rel (EDM2's
relative EMA length, between 0 and 0.2887) the snapshots are combined by least squares into that
EMA (Karras et al. 2023, arXiv 2312.02696), and the pipeline is written with those UNet weights to
<output_dir>/sigma_rel_<value>/, with posthoc_ema.json saying which snapshots went in and how
closely their combination matches the asked-for profile.
"""

from __future__ import annotations

import argparse
import logging

from uldm.errors import InputError, exit_cleanly_on_input_errors
from uldm.posthoc_ema import MAX_SIGMA_REL, SNAPSHOT_DIR_NAME, check_sigma_rel, write_synthesized_pipelines

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
    return parser.parse_args(argv)


@exit_cleanly_on_input_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for sigma_rel in args.sigma_rel:
        check_sigma_rel(sigma_rel)
    if args.max_fit_error <= 0:
        raise InputError(f"--max_fit_error must be positive, got {args.max_fit_error}.")
    results = write_synthesized_pipelines(
        args.pretrained_model_name_or_path, args.sigma_rel, args.output_dir,
        snapshot_dir=args.snapshot_dir, at_step=args.at_step, max_fit_error=args.max_fit_error,
    )
    for result in results:
        print(f"sigma_rel {result.sigma_rel:g} at step {result.step}: profile fit error {result.fit_error:.2e} "
              f"-> {result.folder}")


if __name__ == "__main__":
    main()
