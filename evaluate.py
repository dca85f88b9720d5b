#!/usr/bin/env python
"""Evaluate a folder of samples: FID/KID against a reference, identity against a subject's photos.

The reference (a folder or a `datasets` data set) is resized and cropped exactly as training
does, and its features can be cached for later runs:

    python evaluate.py --samples_dir samples/ --reference_dir data/ffhq256 \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth \\
        --reference_stats_cache ~/.cache/uldm/fid --output_json eval.json

Identity similarity of a fine-tuned face model (dlib descriptors, no reference needed), and
subject fidelity as the DreamBooth paper measures it (DINO, CLIP-I, diversity):

    python evaluate.py --samples_dir dreambooth_samples/ --instance_data_dir photos_of_me/ \\
        --dino_model facebook/dino-vits16 --clip_model openai/clip-vit-large-patch14
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uldm.metrics import fid, identity, subject_similarity
from uldm.errors import InputError, exit_cleanly_on_input_errors
from uldm.images import list_image_files
from uldm.sampling import samples_to_score


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples_dir", required=True, help="Folder of generated images.")

    reference = parser.add_argument_group("FID/KID reference (give one)")
    reference.add_argument("--reference_dir", help="Folder of reference images (e.g. the training images).")
    reference.add_argument(
        "--reference_dataset_name",
        help="A `datasets` data set: a hub id, a local imagefolder or parquet folder, or a .parquet file.",
    )
    reference.add_argument("--reference_dataset_config_name")
    reference.add_argument("--reference_split", default="train")
    reference.add_argument("--image_column", default="image")
    reference.add_argument("--cache_dir", help="Where `datasets` caches downloaded data.")
    reference.add_argument(
        "--resolution", type=int, help="Evaluation size; default: the samples' size. The reference is resized to it."
    )
    reference.add_argument(
        "--center_crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Crop the reference at the centre after resizing (default); --no-center_crop: random crops, "
        "as training without --center_crop does.",
    )
    reference.add_argument(
        "--inception_weights",
        help="Local FID Inception weights (weights-inception-2015-12-05-6726825d.pth) for machines without internet.",
    )
    reference.add_argument(
        "--reference_stats_cache", help="Folder caching the reference features, so later runs skip recomputing them."
    )
    reference.add_argument("--kid_subsets", type=int, default=100)
    reference.add_argument("--kid_subset_size", type=int, default=1000)

    identity_group = parser.add_argument_group("identity similarity (dlib face descriptors)")
    identity_group.add_argument("--instance_data_dir", help="Folder of the subject's photos; enables identity scoring.")
    identity_group.add_argument(
        "--face_identity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dlib identity scores (default); --no-face_identity for subjects that are not faces (with --dino_model/--clip_model).",
    )
    identity_group.add_argument("--face_landmarks", type=int, choices=(5, 68), default=5)
    identity_group.add_argument(
        "--face_upsample", type=int, default=1, help="Detector upsampling; 0 is ~4x faster but misses faces < 80 px."
    )
    identity_group.add_argument("--face_jitters", type=int, default=0, help="dlib num_jitters (slower, slightly steadier).")

    subject = parser.add_argument_group("subject fidelity (DreamBooth paper's DINO / CLIP-I / diversity; with --instance_data_dir)")
    subject.add_argument("--dino_model", help=f"DINO ViT folder or hub id, e.g. {subject_similarity.DINO_MODEL}.")
    subject.add_argument("--clip_model", help=f"CLIP folder or hub id, e.g. {subject_similarity.CLIP_MODEL}.")

    parser.add_argument("--output_json", help="Write the results here as JSON.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of random crops and KID subsets.")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    args = parser.parse_args(argv)
    if args.reference_dir and args.reference_dataset_name:
        raise InputError("Give either --reference_dir or --reference_dataset_name, not both.")
    if (args.dino_model or args.clip_model) and not args.instance_data_dir:
        raise InputError("--dino_model / --clip_model compare the samples with the subject's photos: give --instance_data_dir.")
    if not (args.reference_dir or args.reference_dataset_name or args.instance_data_dir):
        raise InputError("Nothing to evaluate: give a reference (--reference_dir / --reference_dataset_name) "
                         "and/or --instance_data_dir.")
    return args


def build_reference(args: argparse.Namespace, resolution: int) -> fid.ReferenceImages:
    if args.reference_dir:
        images = fid.reference_folder(args.reference_dir, resolution, args.center_crop, args.seed)
    else:
        images = fid.reference_dataset(args.reference_dataset_name, resolution, args.center_crop, args.seed,
                                       args.reference_dataset_config_name, args.reference_split, args.image_column,
                                       args.cache_dir)
    return fid.ReferenceImages(images)


def print_table(results: dict[str, Any]) -> None:
    rows = [(key, value) for key, value in results.get("fid_kid", {}).items()]
    rows += [(f"identity/{key}", value) for key, value in results.get("identity", {}).items() if key != "per_sample"]
    rows += [(f"subject/{key}", value) for key, value in results.get("subject", {}).items() if key != "models"]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


@exit_cleanly_on_input_errors
def main(argv: list[str] | None = None, feature_extractor: nn.Module | None = None) -> dict[str, Any]:
    """Run the evaluation; `feature_extractor` replaces the FID Inception (tests pass a tiny one)."""
    args = parse_args(argv)
    wants_fid = bool(args.reference_dir or args.reference_dataset_name)
    if wants_fid and feature_extractor is None:
        feature_extractor = fid.build_inception_feature_extractor(args.inception_weights)
    # Loaded first, so that a model missing offline stops the run before any scoring.
    subject_models = {metric: model for metric, model in (("dino", args.dino_model), ("clip_i", args.clip_model)) if model}
    subject_encoders = {metric: subject_similarity.load_image_encoder(model, args.device) for metric, model in subject_models.items()}
    samples = fid.SampleImages(samples_to_score(args.samples_dir), args.resolution)
    print(f"Scoring {len(samples)} images from {args.samples_dir}")
    results: dict[str, Any] = {"samples_dir": str(args.samples_dir), "arguments": vars(args)}
    loader_options = dict(batch_size=args.batch_size, num_workers=args.num_workers)

    if wants_fid:
        reference = build_reference(args, samples.resolution)
        results["fid_kid"] = fid.compute_fid_kid(
            samples,
            reference,
            feature_extractor,
            cache_dir=args.reference_stats_cache,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            seed=args.seed,
            device=args.device,
            **loader_options,
        )
        results["fid_kid"]["resolution"] = samples.resolution

    instance_paths = list_image_files(args.instance_data_dir) if args.instance_data_dir else []
    if args.instance_data_dir and args.face_identity:
        results["identity"] = identity.compute_identity(
            samples.paths,
            instance_paths,
            upsample_times=args.face_upsample,
            num_jitters=args.face_jitters,
            landmarks=args.face_landmarks,
            **loader_options,
        )
    if subject_models:
        results["subject"] = subject_similarity.subject_fidelity(
            samples.paths, instance_paths, subject_encoders, batch_size=args.batch_size
        )
        results["subject"]["models"] = subject_models

    print_table(results)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
