"""The command line: argument groups shared by the scripts (diffusers' names and meanings), and the one
place where parsed arguments become the library's typed configurations (`config_from`, `training_config`).
Nothing else in `uldm` reads an argparse namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import TypeVar

from .training.checkpoints import PREVIOUS_RUN_PREFIX
from .errors import InputError

logger = logging.getLogger(__name__)

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


def add_latent_cache_args(group) -> None:
    """--cache_latents and its folder (uldm.latent_cache; `cache_config` reads them)."""
    group.add_argument("--cache_latents", action="store_true",
                       help="Encode the data set once and train from stored latents (the VAE encoder then never runs).")
    group.add_argument("--latent_cache_dir", type=str, default=None, help="Default: <output_dir>/latent_cache.")
    group.add_argument("--encode_batch_size", type=int, default=32)


def add_optimization_args(parser: argparse.ArgumentParser, learning_rate: float = 1e-4,
                          adam_beta1: float = 0.95, adam_weight_decay: float = 1e-6,
                          lr_scheduler: str = "cosine", lr_warmup_steps: int = 500) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--output_dir", type=str, required=True)
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="Start a new run in an --output_dir that holds an earlier run: its checkpoints, EMA "
                            f"snapshots, sample grids, metrics and logs are moved (never deleted) into "
                            f"<output_dir>/{PREVIOUS_RUN_PREFIX}<date-time>/. Without it such a folder is refused.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--train_batch_size", type=int, default=16,
                       help="Batch size (per device) for the training dataloader.")
    group.add_argument("--num_epochs", "--num_train_epochs", dest="num_epochs", metavar="N", type=int, default=100,
                       help="Epochs to train (--num_epochs in diffusers' train_unconditional.py, --num_train_epochs "
                            "in train_dreambooth.py).")
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
    group.add_argument("--lr_num_cycles", type=int, default=1,
                       help="Number of hard resets of the lr in cosine_with_restarts scheduler.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power factor of the polynomial scheduler.")
    group.add_argument("--use_8bit_adam", action="store_true",
                       help="Whether or not to use 8-bit Adam from bitsandbytes (needs bitsandbytes and a CUDA GPU).")
    group.add_argument("--set_grads_to_none", action="store_true",
                       help="Save more memory by using setting grads to None instead of zero. Always on here: the "
                            "loop zeroes gradients with set_to_none=True (accepted for diffusers' command lines).")
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: accelerate's config.")
    group.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs.")
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Whether or not to use xformers. Without xformers installed the run goes on with "
                            "PyTorch's scaled_dot_product_attention, which diffusers uses already (same memory saving).")
    group.add_argument("--local_rank", type=int, default=-1,
                       help="For distributed training: local_rank (set by the launcher; accelerate reads LOCAL_RANK).")


def add_ema_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("EMA")
    group.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    group.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse multiplicative factor.")
    group.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warm-up power.")
    group.add_argument("--ema_max_decay", type=float, default=0.9999)


def add_posthoc_ema_args(parser: argparse.ArgumentParser) -> None:
    from .training.posthoc_ema import DEFAULT_SIGMA_RELS, SNAPSHOT_DIR_NAME, SNAPSHOTS_PER_RUN

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


def add_compute_args(parser: argparse.ArgumentParser, frozen_vae: bool = True) -> None:
    """How the training step runs on the device (`uldm.training.ComputeConfig`, `LoopConfig.logging_steps`)."""
    group = parser.add_argument_group("compute")
    group.add_argument("--torch_compile", action="store_true",
                       help="Compile the trained model with torch.compile (inductor) for training; validation and "
                            "the saved model stay eager. The first step then takes minutes (compiling).")
    group.add_argument("--logging_steps", type=int, default=None,
                       help="Read the losses back from the device every this many optimiser steps (metrics.jsonl "
                            "still gets one row per step). A non-finite loss stops the run at the next read-back, "
                            "which also happens before every checkpoint, validation and saved result. "
                            "Default: 1 on the CPU, 10 on GPUs (no device-to-host wait in between).")
    if frozen_vae:
        from .vae import VAE_PRECISIONS

        group.add_argument("--vae_precision", choices=VAE_PRECISIONS, default="auto",
                           help="dtype of the frozen VAE. auto: fp32 with --cache_latents (encoded once, stored) or "
                                "without mixed precision or with fp16 (VAEs overflow in fp16), bf16 with "
                                "--mixed_precision bf16 when it encodes every step.")


DEFAULT_PREDICTION_TYPE = "v_prediction"


def resolve_prediction_type(args: argparse.Namespace) -> None:
    """--prediction_type left out: a saved model keeps its own (an epsilon model goes on as one), else the default."""
    if args.prediction_type is None:
        from .models import saved_prediction_type

        saved = saved_prediction_type(args.pretrained_model_name_or_path, args.revision)
        args.prediction_type = saved or DEFAULT_PREDICTION_TYPE


def add_noise_args(parser: argparse.ArgumentParser) -> None:
    """The noise schedule of a new model (a fine-tune takes its base model's); its levers: add_loss_lever_args."""
    group = parser.add_argument_group("diffusion")
    group.add_argument("--ddpm_num_steps", type=int, default=1000)
    group.add_argument("--ddpm_beta_schedule", type=str, default="scaled_linear",
                       choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
                       help="LDM's 'linear' schedule is diffusers' scaled_linear.")
    group.add_argument("--beta_start", type=float, default=0.0015)
    group.add_argument("--beta_end", type=float, default=0.0195)
    group.add_argument("--prediction_type", type=str, default=None,
                       choices=["epsilon", "v_prediction", "sample"],
                       help=f"What the UNet predicts. Default: that of the saved model given as "
                            f"--pretrained_model_name_or_path, else {DEFAULT_PREDICTION_TYPE}, the one deliberate "
                            f"difference from diffusers' train_unconditional.py (epsilon): it measured far ahead on "
                            f"the demo (docs/benchmarks.md). --prediction_type epsilon restores diffusers' behaviour.")


def add_variant_arg(group) -> None:
    group.add_argument("--variant", type=str, default=None,
                       help="Variant of the model files of the pretrained model identifier from huggingface.co/models, "
                            "'e.g.' fp16 (loads diffusion_pytorch_model.<variant>.safetensors).")


def _timestep_density(value: str) -> str:
    """diffusers calls the uniform density "none"; the issue's --timestep_sampling calls it "uniform"."""
    return "none" if value == "uniform" else value


def add_loss_lever_args(parser: argparse.ArgumentParser) -> None:
    """Every loss and noise lever (`uldm.diffusion.LossConfig`, built by `loss_config`), the same for every
    trainer; diffusers' names where it has them."""
    group = parser.add_argument_group(
        "loss and noise levers", "Off by default. The loss weights are per sample, so with DreamBooth's prior "
                                 "preservation each half of the batch is weighted by its own timesteps.")
    group.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR weighting gamma (5.0 is the paper's choice); off by default.")
    group.add_argument("--offset_noise", type=float, nargs="?", const=0.1, default=0.0,
                       help="Fine-tuning against a modified noise: adds 0.1 (or the value given) x a per-channel "
                            "constant to the noise (https://www.crosslabs.org//blog/diffusion-with-offset-noise).")
    group.add_argument("--rescale_betas_zero_snr", action="store_true",
                       help="Zero terminal SNR (Lin et al. 2023): the last timestep is pure noise; needs "
                            "--prediction_type v_prediction (or sample). Saved in the scheduler config with "
                            "'trailing' spacing, so sampling and fine-tunes of the model use it. DreamBooth trains "
                            "on its base model's schedule: a base saved with zero terminal SNR keeps it without "
                            "this flag; with it, a base without it (v or sample prediction) is fine-tuned, "
                            "validated (step 0 too) and saved on the rescaled schedule, as Lin et al. fine-tune "
                            "Stable Diffusion; refused with --use_lora, since an adapter is loaded onto the base's "
                            "scheduler.")
    group.add_argument("--p2_gamma", type=float, default=None,
                       help="P2 weighting (Choi et al. 2022): the epsilon loss times 1 / (p2_k + SNR)^p2_gamma "
                            "(the same objective for v and sample prediction); the paper uses 1 or 0.5. Off by default.")
    group.add_argument("--p2_k", type=float, default=1.0, help="P2's k (the paper's 1).")
    group.add_argument("--weighting_scheme", "--timestep_sampling", type=_timestep_density, default="none",
                       choices=["none", "logit_normal"],
                       help="Timestep density, with the name and meaning of diffusers' SD3 scripts: 'none' "
                            "(= 'uniform') or 'logit_normal' (u = sigmoid(N(logit_mean, logit_std^2)) is a position "
                            "in the descending timestep list: t = T - 1 - floor(T * u)).")
    group.add_argument("--logit_mean", type=float, default=0.0,
                       help="Mean of the logit-normal density, with diffusers' sign (a drop-in for its SD3 scripts' "
                            "--logit_mean): a positive mean favours the less noisy timesteps, --logit_mean 1 gives a "
                            "mean timestep near 303 of 1000. The SD3 paper's m has the opposite sign.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit-normal density.")


def add_logging_args(parser: argparse.ArgumentParser, validation_steps: int = 1000) -> None:
    group = parser.add_argument_group("logging and validation")
    group.add_argument("--report_to", "--logger", dest="report_to", metavar="NAME", type=str, default="tensorboard",
                       help='The integration to report the results and logs to: "tensorboard", "wandb", "comet_ml", '
                            '"all" or "none" (--logger in diffusers\' train_unconditional.py).')
    group.add_argument("--logging_dir", type=str, default="logs",
                       help="TensorBoard log directory, inside --output_dir unless absolute (kept off the Hub).")
    group.add_argument("--tracker_project_name", type=str, default=None)
    group.add_argument("--validation_steps", type=int, default=validation_steps,
                       help="Write a sample grid every this many steps (and at the end); 0 turns it off.")
    group.add_argument("--save_images_epochs", type=int, default=0,
                       help="How often to save images during training: a grid at the end of every this many epochs "
                            "(as well as every --validation_steps, and at the end); 0: off.")
    group.add_argument("--num_validation_images", "--eval_batch_size", dest="num_validation_images", metavar="N", type=int,
                       default=16, help="The number of images to generate for evaluation, in one batch, from the "
                                        "same noise at every validation (--eval_batch_size in train_unconditional.py).")
    group.add_argument("--validation_inference_steps", "--ddpm_num_inference_steps", dest="validation_inference_steps",
                       metavar="N", type=int, default=50,
                       help="Sampler steps of the validation grids (--ddpm_num_inference_steps in train_unconditional.py, "
                            "whose DDPM sampler needs ~1000; the default DPM-Solver++ needs 25-50).")
    group.add_argument("--validation_scheduler", type=scheduler_name, default="dpmsolver++",
                       help="Sampler of the validation grids: ddim, dpmsolver++, unipc, euler or ddpm (or diffusers' "
                            "class names, e.g. DPMSolverMultistepScheduler, DDPMScheduler).")
    add_guidance_args(group, prefix="validation_",
                      what="the validation grids and FID samples (loaded once, checked before training starts)")


def add_lora_args(parser: argparse.ArgumentParser, use_lora_help: str) -> None:
    """--use_lora and its adapter's shape (uldm.lora), the same for DreamBooth and distillation."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--use_lora", action="store_true", help=use_lora_help)
    group.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    group.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1).")
    group.add_argument("--lora_dropout", type=float, default=0.0)
    group.add_argument("--lora_target_modules", type=str, default="attention+conv",
                       help="'attention', 'attention+conv' (adds the ResNet convolutions) or module names, "
                            "comma-separated.")


def add_guidance_args(group, prefix: str = "", what: str = "the samples") -> None:
    """--<prefix>guide, --<prefix>guidance_scale, --<prefix>guidance_interval (uldm.guidance; docs/sampling.md)."""
    group.add_argument(f"--{prefix}guide", type=str, default=None, metavar="GUIDE",
                       help=f"Guide {what} with a weaker model: output = guide + w * (model - guide). A pipeline folder "
                            "or hub id (e.g. a smaller model trained for ~1/16 of the steps), a checkpoint-N folder of "
                            "the same run (its EMA weights), or 'base' for a DreamBooth result (its base model; for a "
                            "LoRA, the UNet with the adapter switched off).")
    group.add_argument(f"--{prefix}guidance_scale", type=float, default=None, metavar="W",
                       help="Guidance weight w: 1 is unguided, 0 the guide alone; above 1 pushes away from the guide "
                            "(for DreamBooth's base: more subject; below 1 more of the base's variety).")
    group.add_argument(f"--{prefix}guidance_interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                       help="Guide only the steps whose noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) lies in "
                            "(LO, HI]; default: every step.")


def check_guidance_interval(interval, option: str = "--guidance_interval") -> None:
    if interval is not None and not 0 <= interval[0] < interval[1]:
        raise InputError(f"{option} LO HI needs 0 <= LO < HI (noise levels), not {interval}.")


def check_guidance_args(args, prefix: str = "") -> None:
    check_guidance_interval(getattr(args, f"{prefix}guidance_interval", None), f"--{prefix}guidance_interval")
    scale = getattr(args, f"{prefix}guidance_scale", None)
    if getattr(args, f"{prefix}guide", None) and scale is None:
        raise InputError(f"--{prefix}guide needs --{prefix}guidance_scale W (1: unguided; the paper's models use 2-3).")


def scheduler_name(name: str) -> str:
    """A sampler name of uldm.sampling, from it or from diffusers' class name (train_dreambooth.py's choices)."""
    from .sampling import SCHEDULERS

    by_class = {scheduler_class.__name__: key for key, (scheduler_class, _) in SCHEDULERS.items()}
    if name in SCHEDULERS:
        return name
    if name in by_class:
        return by_class[name]
    raise argparse.ArgumentTypeError(f"unknown sampler {name!r}: choose one of {', '.join([*SCHEDULERS, *by_class])}")


def add_fid_args(parser: argparse.ArgumentParser, in_training: bool = True) -> None:
    """FID/KID of samples: at each validation of a training run (`in_training`, with --keep_best_checkpoint), or of
    each candidate of a sweep (then with the sampler's options too: a training script has them in its logging group)."""
    from .metrics.fid import FEATURE_EXTRACTORS

    group = parser.add_argument_group("FID/KID of samples")
    # A sweep after training also takes the short names of a sampling job (sweep_guidance.py's documented ones).
    alias = (lambda name: ()) if in_training else (lambda name: (name,))
    group.add_argument("--validation_fid_images", *alias("--fid_images"), type=int, default=0,
                       help="Score this many samples (from fixed seeds, drawn with --validation_scheduler and "
                            "--validation_inference_steps) with FID and KID" + (" at each validation" if in_training else "")
                            + "; 0: off. A few hundred follow a run; published FIDs use 50000.")
    group.add_argument("--fid_feature_extractor", type=str, default="inception",
                       help=f"{' or '.join(FEATURE_EXTRACTORS)} (a fixed random conv net: offline and cheap, but not "
                            "comparable with published FIDs), or a TorchScript file mapping N x 3 x H x W uint8 images "
                            "to N x D features.")
    group.add_argument("--inception_weights", type=str, default=None,
                       help="Local FID Inception weights (weights-inception-2015-12-05-6726825d.pth), as for evaluate.py.")
    group.add_argument("--fid_reference", *alias("--reference_dir"), type=str, default=None,
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
        group.add_argument("--validation_scheduler", "--scheduler", type=str, default="dpmsolver++",
                           help="Sampler of the FID samples: ddim, dpmsolver++, unipc, euler or ddpm.")
        group.add_argument("--validation_inference_steps", "--num_inference_steps", type=int, default=25)


def check_fid_args(args) -> None:
    if getattr(args, "validation_fid_images", 0) < 0:
        raise InputError("--validation_fid_images must be 0 (off) or more.")
    if 0 < getattr(args, "validation_fid_images", 0) < 2:
        raise InputError("--validation_fid_images must be at least 2 (FID needs a covariance); a few hundred follow a run.")
    if getattr(args, "fid_reference", None):
        from .metrics.fid_validation import check_reference_option

        check_reference_option(args.fid_reference)
    if getattr(args, "keep_best_checkpoint", False):
        if not args.validation_fid_images:
            raise InputError("--keep_best_checkpoint keeps the checkpoint with the lowest FID: give --validation_fid_images N.")
        if not args.checkpointing_steps:
            raise InputError("--keep_best_checkpoint needs checkpoints: give --checkpointing_steps N (ideally a divisor "
                             "of --validation_steps, so that no extra checkpoint is saved for a new best FID).")


def add_subject_metric_args(parser: argparse.ArgumentParser) -> None:
    """DreamBooth's subject fidelity at each validation (uldm.metrics.subject_similarity; names as in evaluate.py)."""
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
    group.add_argument("--save_model_epochs", type=int, default=0,
                       help="How often to save the model during training: the result (EMA weights) is written into "
                            "--output_dir at the end of every this many epochs, replacing the previous one, and at "
                            "the end; 0: only at the end.")


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    """diffusers' Hub flags (train_unconditional.py, train_dreambooth.py), with their help texts; and the
    licence of the model card."""
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true", help="Whether or not to push the model to the Hub.")
    group.add_argument("--hub_token", type=str, default=None, help="The token to use to push to the Model Hub.")
    group.add_argument("--hub_model_id", type=str, default=None,
                       help="The name of the repository to keep in sync with the local `output_dir`.")
    group.add_argument("--hub_private_repo", action="store_true",
                       help="Whether or not to create a private repository.")
    group.add_argument("--license", type=str, default=None,
                       help='The licence in the model card\'s metadata: a Hub licence id such as "apache-2.0", "mit", '
                            '"cc-by-nc-4.0" or "other" (default: none stated).')


# diffusers flags that only mean something for a model that takes text (or another input): refused, with
# what to do instead. An unconditional model is trained without a prompt and samples without one.
TEXT_ONLY_FLAGS = {
    "instance_prompt": "the photos alone define the subject (--instance_data_dir)",
    "class_prompt": "class images are samples of the base model, drawn without a prompt (--class_data_dir, "
                    "--num_class_images)",
    "validation_prompt": "validation grids are drawn from fixed noise (--num_validation_images, --validation_steps)",
    "validation_prompts": "validation grids are drawn from fixed noise (--num_validation_images, --validation_steps)",
    "train_text_encoder": "there is no text encoder: the UNet is trained (or a LoRA adapter on it, --use_lora)",
    "pre_compute_text_embeddings": "there is no text encoder, so there are no embeddings to compute",
    "text_encoder_use_attention_mask": "there is no text encoder",
    "skip_save_text_encoder": "there is no text encoder to save",
    "tokenizer_name": "there is no tokenizer",
    "tokenizer_max_length": "there is no tokenizer",
    "caption_column": "the images are used without captions",
    "class_labels_conditioning": "the UNet takes no class labels",
    "validation_images": "the pipeline takes no input image",
}
_TEXT_FLAGS_GIVEN = "_text_only_flags_given"


class _RefusedTextFlag(argparse.Action):
    """Takes any values, records that the flag was given; `refuse_text_only_flags` then refuses it."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=_TEXT_FLAGS_GIVEN, nargs="*", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, _TEXT_FLAGS_GIVEN, [])
        setattr(namespace, _TEXT_FLAGS_GIVEN, [*given, self.option_strings[0]])


def add_text_only_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "diffusers flags that need text (refused)",
        "An unconditional model takes no prompt, so these flags of diffusers' text-to-image scripts are refused "
        "with what to do instead: " + ", ".join(f"--{name}" for name in TEXT_ONLY_FLAGS) + ".")
    for name in TEXT_ONLY_FLAGS:
        group.add_argument(f"--{name}", action=_RefusedTextFlag)


def refuse_text_only_flags(args: argparse.Namespace) -> None:
    given = list(dict.fromkeys(vars(args).pop(_TEXT_FLAGS_GIVEN, [])))
    if not given:
        return
    reasons = "\n".join(f"  {flag}: {TEXT_ONLY_FLAGS[flag[2:]]}." for flag in given)
    raise InputError(
        f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} text, and this model takes none: an unconditional "
        f"model is trained and samples without a prompt. Remove {'it' if len(given) == 1 else 'them'} from the "
        f"command line:\n{reasons}")


def check_common_args(args) -> None:
    """Checks that argparse cannot express; messages say what to change."""
    refuse_text_only_flags(args)
    if hasattr(args, "validation_guide"):
        check_guidance_args(args, prefix="validation_")
    environment_rank = int(os.environ.get("LOCAL_RANK", -1))
    if hasattr(args, "local_rank") and environment_rank != -1:
        args.local_rank = environment_rank  # diffusers' rule: the launcher's value wins
    for name in ("save_images_epochs", "save_model_epochs"):
        if (getattr(args, name, 0) or 0) < 0:
            raise InputError(f"--{name} must be 0 (off) or a number of epochs.")
    if getattr(args, "overwrite_output_dir", False) and getattr(args, "resume_from_checkpoint", None):
        raise InputError("--overwrite_output_dir starts a new run, --resume_from_checkpoint continues one: give one "
                         "of them.")
    if hasattr(args, "push_to_hub"):
        from .hub import check_hub_config

        check_hub_config(hub_config(args))
    if getattr(args, "train_data_dir", None) and getattr(args, "dataset_name", None):
        raise InputError("Give either --train_data_dir or --dataset_name, not both.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "resolution"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise InputError(f"--{name} must be at least 1.")
    if getattr(args, "max_train_steps", None) is not None and args.max_train_steps < 1:
        raise InputError("--max_train_steps must be at least 1.")
    if getattr(args, "logging_steps", None) is not None and args.logging_steps < 1:
        raise InputError("--logging_steps must be at least 1 (or left out: 1 on the CPU, 10 on GPUs).")
    if getattr(args, "use_8bit_adam", False):  # before DreamBooth spends time generating class images
        from .training import import_bitsandbytes

        import_bitsandbytes()


# --------------------------------------------------------------------------------------------
# Parsed arguments -> configurations


def config_from(config_class: type[Config], args: argparse.Namespace, **overrides) -> Config:
    """A configuration dataclass filled from the arguments of the same names (`overrides` win); fields the
    script has no argument for keep their defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    return config_class(**{**values, **overrides})


def center_crop_of(args: argparse.Namespace, warn: bool = False) -> bool:
    """Whether the run crops at the centre: --center_crop, or --cache_latents, which stores one crop per image.
    `args` may be the saved arguments of an older run (without these flags)."""
    cache_latents = getattr(args, "cache_latents", False)
    center_crop = getattr(args, "center_crop", False)
    if warn and cache_latents and not center_crop:
        logger.warning("--cache_latents stores one crop per image: using centre crops (as --center_crop).")
    return bool(center_crop or cache_latents)


def cache_config(args: argparse.Namespace):
    """The latent cache of a run with --cache_latents (in <output_dir>/latent_cache unless --latent_cache_dir);
    None without it."""
    from .latent_cache import CacheConfig

    if not args.cache_latents:
        return None
    return CacheConfig(args.latent_cache_dir or f"{args.output_dir}/latent_cache", args.encode_batch_size,
                       args.dataloader_num_workers)


def hub_config(args: argparse.Namespace):
    """The Hub flags, with the folders of the run that stay local (TensorBoard logs, the latent cache, class
    images) as absolute paths."""
    from .hub import HubConfig

    folders = [os.path.join(args.output_dir, args.logging_dir) if getattr(args, "logging_dir", None) else None,
               getattr(args, "latent_cache_dir", None), getattr(args, "class_data_dir", None),
               getattr(args, "reference_stats_cache", None)]
    return config_from(HubConfig, args, local_folders=tuple(os.path.abspath(f) for f in folders if f))


def training_config(args: argparse.Namespace):
    """The loop, optimiser and EMA configuration of a training script, and its arguments for the records
    (training_args.json, trackers, model card) without secrets such as --hub_token."""
    from .hub import public_arguments
    from .training.posthoc_ema import PosthocEmaConfig
    from .training import ComputeConfig, EmaConfig, LoopConfig, OptimizerConfig, TrainingConfig

    posthoc = None
    if getattr(args, "use_posthoc_ema", False):  # not every trainer offers it
        posthoc = config_from(PosthocEmaConfig, args, ema_sigma_rels=tuple(args.ema_sigma_rels))
    return TrainingConfig(
        loop=config_from(LoopConfig, args),
        optimizer=config_from(OptimizerConfig, args),
        ema=config_from(EmaConfig, args) if args.use_ema else None,
        posthoc_ema=posthoc,
        compute=config_from(ComputeConfig, args),
        arguments=public_arguments(args),
    )


def loss_config(args: argparse.Namespace, scheduler_config=None):
    """The run's loss and noise levers, checked (before anything runs) against the noise schedule they act on:
    `scheduler_config` (a fine-tune's base model's), else the one of the arguments."""
    from .diffusion import LossConfig, check_loss_levers

    levers = config_from(LossConfig, args)
    check_loss_levers(scheduler_config or {"prediction_type": args.prediction_type}, levers)
    return levers
