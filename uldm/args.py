"""The command line: argument groups shared by the scripts (diffusers' names and meanings), and the one
place where parsed arguments become the library's typed configurations (`config_from`, `training_config`).
Nothing else in `uldm` reads an argparse namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

from .errors import InputError

Config = TypeVar("Config")


def add_data_args(parser: argparse.ArgumentParser, default_resolution: int = 256) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="A folder of training images, searched recursively.")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="A `datasets` data set: hub id, local folder, or a local .parquet/.arrow/.json file.")
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` keeps downloads.")
    group.add_argument("--image_column", type=str, default=None,
                       help="Image column of --dataset_name (default: the first column of type Image).")
    group.add_argument("--resolution", type=int, default=default_resolution,
                       help="Images are resized (shorter side) to this and cropped square.")
    group.add_argument("--center_crop", action="store_true",
                       help="Crop the centre instead of a random position (random crops are seeded).")
    group.add_argument("--random_flip", action="store_true", help="Mirror images horizontally at random.")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument("--max_train_samples", type=int, default=None,
                       help="Train on a seeded random subset of this many images.")


def add_optimization_args(parser: argparse.ArgumentParser, learning_rate: float = 1e-4,
                          adam_beta1: float = 0.95, adam_weight_decay: float = 1e-6,
                          lr_scheduler: str = "cosine", lr_warmup_steps: int = 500) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--output_dir", type=str, required=True)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--train_batch_size", type=int, default=16, help="Batch size per process.")
    group.add_argument("--num_epochs", type=int, default=100)
    group.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimiser steps to train for; overrides --num_epochs.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by batch size x accumulation x processes.")
    group.add_argument("--lr_scheduler", type=str, default=lr_scheduler,
                       help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".')
    group.add_argument("--lr_warmup_steps", type=int, default=lr_warmup_steps,
                       help="Warm-up length in optimiser steps (independent of accumulation and processes).")
    group.add_argument("--adam_beta1", type=float, default=adam_beta1)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=adam_weight_decay)
    group.add_argument("--adam_epsilon", type=float, default=1e-08)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: accelerate's config.")
    group.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs.")


def add_ema_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("EMA")
    group.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    group.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse multiplicative factor.")
    group.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warm-up power.")
    group.add_argument("--ema_max_decay", type=float, default=0.9999)


def add_posthoc_ema_args(parser: argparse.ArgumentParser) -> None:
    from .posthoc_ema import DEFAULT_SIGMA_RELS, SNAPSHOT_DIR_NAME, SNAPSHOTS_PER_RUN

    group = parser.add_argument_group("post-hoc EMA (EDM2): choose the EMA length after training")
    group.add_argument("--use_posthoc_ema", action="store_true",
                       help=f"Track power-function EMAs and save snapshots to <output_dir>/{SNAPSHOT_DIR_NAME}/; "
                            "synthesize_ema.py then makes the pipeline of any EMA length. One fp32 copy of the "
                            "weights per profile in memory.")
    group.add_argument("--ema_sigma_rels", type=float, nargs="+", default=list(DEFAULT_SIGMA_RELS),
                       help="Relative EMA lengths tracked (EDM2: 0.05 0.10).")
    group.add_argument("--ema_snapshot_steps", type=int, default=None,
                       help=f"Save the tracked EMAs every this many optimiser steps (and at the end). "
                            f"Default: max_train_steps / {SNAPSHOTS_PER_RUN}.")
    group.add_argument("--ema_snapshot_dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="Precision of the saved snapshots (float16 halves the disk space).")


def add_noise_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("diffusion")
    group.add_argument("--ddpm_num_steps", type=int, default=1000)
    group.add_argument("--ddpm_beta_schedule", type=str, default="scaled_linear",
                       choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
                       help="LDM's 'linear' schedule is diffusers' scaled_linear.")
    group.add_argument("--beta_start", type=float, default=0.0015)
    group.add_argument("--beta_end", type=float, default=0.0195)
    group.add_argument("--prediction_type", type=str, default="epsilon",
                       choices=["epsilon", "v_prediction", "sample"])
    group.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR weighting gamma (5.0 is the paper's choice); off by default.")


def add_logging_args(parser: argparse.ArgumentParser, validation_steps: int = 1000) -> None:
    group = parser.add_argument_group("logging and validation")
    group.add_argument("--report_to", type=str, default="tensorboard",
                       help='"tensorboard", "wandb", "all" or "none".')
    group.add_argument("--tracker_project_name", type=str, default=None)
    group.add_argument("--validation_steps", type=int, default=validation_steps,
                       help="Write a sample grid every this many steps (and at the end); 0 turns it off.")
    group.add_argument("--num_validation_images", type=int, default=16)
    group.add_argument("--validation_inference_steps", type=int, default=50)
    group.add_argument("--validation_scheduler", type=str, default="dpmsolver++",
                       help="Sampler of the validation grids: ddim, dpmsolver++, unipc, euler or ddpm.")


def add_fid_args(parser: argparse.ArgumentParser, in_training: bool = True) -> None:
    """FID/KID of samples: at each validation of a training run (`in_training`, with --keep_best_checkpoint), or of
    each candidate of a sweep (then with the sampler's options too: a training script has them in its logging group)."""
    from .fid import FEATURE_EXTRACTORS

    group = parser.add_argument_group("FID/KID of samples")
    group.add_argument("--validation_fid_images", type=int, default=0,
                       help="Score this many samples (from fixed seeds, drawn with --validation_scheduler and "
                            "--validation_inference_steps) with FID and KID" + (" at each validation" if in_training else "")
                            + "; 0: off. A few hundred follow a run; published FIDs use 50000.")
    group.add_argument("--fid_feature_extractor", type=str, default="inception",
                       help=f"{' or '.join(FEATURE_EXTRACTORS)} (a fixed random conv net: offline and cheap, but not "
                            "comparable with published FIDs), or a TorchScript file mapping N x 3 x H x W uint8 images "
                            "to N x D features.")
    group.add_argument("--inception_weights", type=str, default=None,
                       help="Local FID Inception weights (weights-inception-2015-12-05-6726825d.pth), as for evaluate.py.")
    group.add_argument("--fid_reference", type=str, default=None,
                       help="A folder of reference images (read like the training images) or a stored features file "
                            "(reference-*.safetensors of the cache). Default: the training images, preprocessed as in "
                            "training.")
    group.add_argument("--reference_stats_cache", type=str, default=None,
                       help="Folder caching the reference features. Default: <output_dir>/fid_reference"
                            + ("." if in_training else " of the training run (PIPELINE/fid_reference)."))
    group.add_argument("--fid_batch_size", type=int, default=64, help="Batch size of FID sampling and feature extraction.")
    group.add_argument("--kid_subset_size", type=int, default=1000, help="KID subset size (capped by the number of samples).")
    if in_training:
        group.add_argument("--keep_best_checkpoint", action="store_true",
                           help="Keep the checkpoint of the step with the lowest FID safe from --checkpoints_total_limit "
                                "(recorded in <output_dir>/best_checkpoint.json); a validation step with a new best FID "
                                "and no checkpoint gets one.")
    else:
        group.add_argument("--validation_scheduler", type=str, default="dpmsolver++",
                           help="Sampler of the FID samples: ddim, dpmsolver++, unipc, euler or ddpm.")
        group.add_argument("--validation_inference_steps", type=int, default=25)


def check_fid_args(args) -> None:
    if getattr(args, "validation_fid_images", 0) < 0:
        raise InputError("--validation_fid_images must be 0 (off) or more.")
    if 0 < getattr(args, "validation_fid_images", 0) < 2:
        raise InputError("--validation_fid_images must be at least 2 (FID needs a covariance); a few hundred follow a run.")
    if getattr(args, "fid_reference", None):
        from .fid_validation import check_reference_option

        check_reference_option(args.fid_reference)
    if getattr(args, "keep_best_checkpoint", False):
        if not args.validation_fid_images:
            raise InputError("--keep_best_checkpoint keeps the checkpoint with the lowest FID: give --validation_fid_images N.")
        if not args.checkpointing_steps:
            raise InputError("--keep_best_checkpoint needs checkpoints: give --checkpointing_steps N (ideally a divisor "
                             "of --validation_steps, so that no extra checkpoint is saved for a new best FID).")


def add_subject_metric_args(parser: argparse.ArgumentParser) -> None:
    """DreamBooth's subject fidelity at each validation (uldm.subject_similarity; names as in evaluate.py)."""
    group = parser.add_argument_group("subject fidelity at each validation (DreamBooth paper's DINO / CLIP-I / diversity)")
    group.add_argument("--validation_dino_model", type=str, default=None,
                       help="DINO ViT folder or hub id (e.g. facebook/dino-vits16): log DINO similarity of the "
                            "validation samples to the instance photos, and their DINO diversity.")
    group.add_argument("--validation_clip_model", type=str, default=None,
                       help="CLIP folder or hub id (e.g. openai/clip-vit-large-patch14): the same with CLIP-I.")


def add_checkpoint_args(parser: argparse.ArgumentParser, checkpointing_steps: int = 500) -> None:
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpointing_steps", type=int, default=checkpointing_steps,
                       help="Save a resumable checkpoint every this many steps (and at the end); 0: never.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None,
                       help="Keep at most this many checkpoints (older ones are removed after a new one is complete).")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help='A checkpoint folder, or "latest" (newest complete one; a fresh start if none).')


def check_common_args(args) -> None:
    """Checks that argparse cannot express; messages say what to change."""
    if getattr(args, "train_data_dir", None) and getattr(args, "dataset_name", None):
        raise InputError("Give either --train_data_dir or --dataset_name, not both.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "resolution"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise InputError(f"--{name} must be at least 1.")
    if getattr(args, "max_train_steps", None) is not None and args.max_train_steps < 1:
        raise InputError("--max_train_steps must be at least 1.")


# --------------------------------------------------------------------------------------------
# Parsed arguments -> configurations


def config_from(config_class: type[Config], args: argparse.Namespace, **overrides) -> Config:
    """A configuration dataclass filled from the arguments of the same names (`overrides` win); fields the
    script has no argument for keep their defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    return config_class(**{**values, **overrides})


def training_config(args: argparse.Namespace):
    """The loop, optimiser and EMA configuration of a training script, and its arguments for the records
    (training_args.json, trackers, model card) without secrets such as --hub_token."""
    from .hub import public_arguments
    from .posthoc_ema import PosthocEmaConfig
    from .training import EmaConfig, LoopConfig, OptimizerConfig, TrainingConfig

    posthoc = None
    if getattr(args, "use_posthoc_ema", False):  # not every trainer offers it
        posthoc = config_from(PosthocEmaConfig, args, ema_sigma_rels=tuple(args.ema_sigma_rels))
    return TrainingConfig(
        loop=config_from(LoopConfig, args),
        optimizer=config_from(OptimizerConfig, args),
        ema=config_from(EmaConfig, args) if args.use_ema else None,
        posthoc_ema=posthoc,
        arguments=public_arguments(args),
    )

