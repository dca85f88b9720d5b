#!/usr/bin/env python
"""Train a first-stage autoencoder (AutoencoderKL) from scratch or fine-tune one, for latent diffusion.

    accelerate launch train_vae.py --train_data_dir data/satellite --resolution 256 \
        --model_config_name_or_path kl-f8-c4 --use_ema --output_dir outputs/vae-satellite
    accelerate launch train_vae.py --train_data_dir data/xrays --resolution 256 \
        --pretrained_vae_name_or_path stabilityai/sd-vae-ft-mse --learning_rate 1e-5 --output_dir outputs/vae-xray

Loss: L1 or L2 reconstruction + kl_weight * KL (+ perceptual_weight * LPIPS with local VGG16 weights).
A seeded held-out split gives PSNR and reconstruction grids during training. The output folder
loads with `AutoencoderKL.from_pretrained(folder)`; its config carries the measured
`scaling_factor` (1/std of the latents over the training data), which
`train_unconditional_latent.py --vae_name_or_path folder --latent_scaling_factor auto` uses.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from functools import partial
from pathlib import Path


from uldm import args as cli
from uldm.autoencoder import (
    RECONSTRUCTION_LOSSES, AutoencoderForTraining, AutoencoderLoss, build_autoencoder, centre_cropped_view,
    default_holdout_size, evaluate_reconstructions, load_lpips, reconstruction_pairs, resolve_perceptual_weights,
    split_holdout, stack_pixels, store_scaling_factor,
)
from uldm.data import DataConfig, prepare_training_set
from uldm.errors import InputError, exit_cleanly_on_input_errors
from uldm.hub import HubUploader
from uldm.latents import measure_latent_std, random_horizontal_flip
from uldm.model_card import write_model_card
from uldm.models import count_parameters, use_xformers_if_installed
from uldm.presets import list_presets
from uldm.saving import final_save_remedy, save_pretrained_atomically
from uldm.training import (
    Schedule, Validation, ValidationResult, build_training_loop, finish_run, read_metrics, start_run,
)
from uldm.vae import describe_vae, latent_shape

logger = logging.getLogger("train_vae")

DEFAULT_PRESET = "kl-f8-c4"
USAGE = """\
```python
from diffusers import AutoencoderKL

vae = AutoencoderKL.from_pretrained("{location}")
latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor   # images in [-1, 1]
```

Train a latent diffusion model on it (the scale is read from the config):

```bash
accelerate launch train_unconditional_latent.py --vae_name_or_path {location} --latent_scaling_factor auto ...
```
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_data_args(parser)
    group = parser.add_argument_group("held-out split")
    group.add_argument("--num_holdout_images", type=int, default=None,
                       help="Images kept out of training for PSNR and reconstruction grids (seeded choice; "
                            "default: 10%% of the data, at most 64).")
    group = parser.add_argument_group("model")
    group.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="Train from scratch: a preset (" + ", ".join(list_presets("vae")) +
                            f"; default {DEFAULT_PRESET}), a JSON file or a model folder (its config only).")
    group.add_argument("--pretrained_vae_name_or_path", type=str, default=None,
                       help="Fine-tune this AutoencoderKL (folder or hub id) instead.")
    group.add_argument("--vae_subfolder", type=str, default=None, help='e.g. "vae" inside a Stable Diffusion repository.')
    group.add_argument("--revision", type=str, default=None)
    cli.add_variant_arg(group)
    group = parser.add_argument_group("loss")
    group.add_argument("--reconstruction_loss", choices=RECONSTRUCTION_LOSSES, default="l1",
                       help="Per-pixel reconstruction error (CompVis: l1).")
    group.add_argument("--kl_weight", type=float, default=1e-6,
                       help="Weight of the KL term, with CompVis' meaning (their kl-f4/kl-f8 configs: 1e-6).")
    group.add_argument("--perceptual_weight", type=float, default=0.0,
                       help="Weight of the LPIPS-VGG perceptual loss (CompVis: 1.0). Needs local VGG16 weights: "
                            "see --perceptual_weights_path.")
    group.add_argument("--perceptual_weights_path", type=str, default=None,
                       help="torchvision's VGG16 ImageNet weights (vgg16-397923af.pth), which cannot be downloaded "
                            "at run time here; default: torch.hub's cache, if the file is there.")
    group = parser.add_argument_group("latent scale")
    group.add_argument("--scale_estimation_images", type=int, default=512,
                       help="Training images encoded after training to measure the latent std (scaling_factor = 1/std).")
    group.add_argument("--encode_batch_size", type=int, default=32)
    group.add_argument("--keep_scaling_factor", action="store_true",
                       help="Fine-tuning: keep the pretrained VAE's scaling_factor (e.g. to stay compatible with a "
                            "diffusion model trained on its latents); the measured one is still logged.")
    cli.add_optimization_args(parser, learning_rate=1e-4, adam_beta1=0.9, adam_weight_decay=0.0,
                              lr_scheduler="constant_with_warmup", lr_warmup_steps=100)
    cli.add_ema_args(parser)
    cli.add_logging_args(parser, validation_steps=500)
    cli.add_checkpoint_args(parser)
    cli.add_compute_args(parser, frozen_vae=False)
    cli.add_hub_args(parser)
    cli.add_text_only_args(parser)
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    cli.check_common_args(args)
    if args.model_config_name_or_path and args.pretrained_vae_name_or_path:
        raise InputError("Give either --model_config_name_or_path (train from scratch) or "
                         "--pretrained_vae_name_or_path (fine-tune), not both.")
    if not args.pretrained_vae_name_or_path:
        args.model_config_name_or_path = args.model_config_name_or_path or DEFAULT_PRESET
    if args.kl_weight < 0 or args.perceptual_weight < 0:
        raise InputError("--kl_weight and --perceptual_weight must not be negative.")
    if args.perceptual_weight > 0:
        args.perceptual_weights_path = str(resolve_perceptual_weights(args.perceptual_weights_path))
    if args.num_holdout_images is not None and args.num_holdout_images < 1:
        raise InputError("--num_holdout_images must be at least 1: PSNR is measured on held-out images.")


@exit_cleanly_on_input_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    config = cli.training_config(args)
    accelerator = start_run(config)
    hub = HubUploader.from_config(cli.hub_config(args), accelerator.is_main_process)

    vae = build_autoencoder(args.model_config_name_or_path, args.pretrained_vae_name_or_path,
                            args.vae_subfolder, args.revision, args.variant)
    latent = latent_shape(vae, args.resolution)
    logger.info("%s, %.1fM parameters; %d px images -> %s latents", describe_vae(vae),
                count_parameters(vae) / 1e6, args.resolution, "x".join(map(str, latent)))
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        use_xformers_if_installed(vae)

    images = prepare_training_set(cli.config_from(DataConfig, args), accelerator).dataset
    num_holdout = args.num_holdout_images or default_holdout_size(len(images))
    train_set, holdout = split_holdout(images, num_holdout, args.seed)
    logger.info("Images: %d for training, %d held out", len(train_set), len(holdout))

    perceptual = load_lpips(args.perceptual_weights_path).to(accelerator.device) if args.perceptual_weight else None
    criterion = AutoencoderLoss(args.reconstruction_loss, args.kl_weight, args.perceptual_weight, perceptual)
    grid_pixels = stack_pixels(holdout, max(1, args.num_validation_images))

    def validate(step: int) -> ValidationResult | None:
        """Held-out metrics and a grid of fixed held-out images beside their reconstructions (main process);
        step 0 gives the untrained model's numbers, for comparison."""
        if not accelerator.is_main_process:
            return None
        with loop.ema_weights() as wrapped:
            values = evaluate_reconstructions(wrapped.vae, holdout, args.encode_batch_size, args.reconstruction_loss)
            pairs = reconstruction_pairs(wrapped.vae, grid_pixels)
        logger.info("Step %d, held out: PSNR %.2f dB, %s error %.4f", step, values["val_psnr"],
                    args.reconstruction_loss, values["val_rec_loss"])
        return ValidationResult(images={"reconstruction": pairs}, metrics=values)

    def save_result(wrapped) -> None:
        """Measure the latent scale (all processes share the encoding), store it in the config, save."""
        trained = wrapped.vae
        trained.eval()
        std = measure_latent_std(centre_cropped_view(train_set), trained, accelerator, args.scale_estimation_images,
                                 args.encode_batch_size, args.seed)
        scale, source = store_scaling_factor(trained, std, args.keep_scaling_factor)
        logger.info("Latent std %.5f; scaling_factor %.6f (%s)", std, scale, source)
        if accelerator.is_main_process:
            save_pretrained_atomically(trained, args.output_dir, "the trained VAE",
                                       remedy=partial(final_save_remedy, args.output_dir))
            loop.metrics.log({"latent_std": std, "scaling_factor": scale}, step=loop.global_step)
            if "reconstruction" in loop.last_validation.grids:  # absent when a full disk kept it from being written
                shutil.copyfile(loop.last_validation.grids["reconstruction"], f"{args.output_dir}/reconstructions.png")
            write_vae_card(args, config.arguments, trained, loop, loop.last_validation.metrics, std, scale, source,
                           location=hub.location if hub.enabled else None)
            logger.info("Saved the VAE of epoch %d (step %d) to %s (held-out PSNR %.2f dB)", loop.epochs_completed,
                        loop.global_step, args.output_dir, loop.last_validation.metrics["val_psnr"])
            if not loop.finished:
                hub.upload_in_background(f"Epoch {loop.epochs_completed}")
        trained.train()

    autoencoder = AutoencoderForTraining(vae)
    loop = build_training_loop(accelerator, config, autoencoder, train_set, "train_vae",
                               ema_model=vae, save_result=save_result,
                               save_schedule=Schedule(every_epochs=args.save_model_epochs),
                               validation=Validation(validate, Schedule(every_steps=args.validation_steps,
                                                                        every_epochs=args.save_images_epochs),
                                                     at_start=True))
    model = loop.model

    def compute_loss(batch, generator):
        pixels = batch["pixel_values"]
        if args.random_flip:
            pixels = random_horizontal_flip(pixels, generator)
        reconstruction, kl = model(pixels, autoencoder.latent_noise(pixels, generator))
        return criterion(pixels, reconstruction, kl)

    finished = loop.run(compute_loss)
    finish_run(loop)
    if finished:
        hub.upload_and_wait()


def write_vae_card(args, arguments: dict, vae, loop, final: dict, std: float, scale: float, source: str,
                   location: str | None = None) -> None:
    start = "from scratch" if not args.pretrained_vae_name_or_path else f"from {args.pretrained_vae_name_or_path}"
    before = [row for row in read_metrics(args.output_dir, having="val_psnr") if row["step"] == 0]
    facts = {
        "steps": loop.global_step,
        "images seen": loop.state.samples_seen,
        "held-out PSNR": f"{final['val_psnr']:.2f} dB"
                         + (f" (before training: {before[0]['val_psnr']:.2f} dB)" if before else ""),
        f"held-out {args.reconstruction_loss} error": f"{final['val_rec_loss']:.4f}",
        "latent std": f"{std:.5f}",
        "scaling_factor": f"{scale:.6f} ({source})",
    }
    write_model_card(
        args.output_dir,
        title="First-stage autoencoder",
        summary=f"An {describe_vae(vae)} with {count_parameters(vae) / 1e6:.1f}M parameters, trained {start} "
                f"with train_vae.py ({args.reconstruction_loss} + {args.kl_weight:g} x KL"
                + (f" + {args.perceptual_weight:g} x LPIPS" if args.perceptual_weight else "") + ").",
        arguments=arguments,
        images={"Held-out images (left) and reconstructions (right)": f"{args.output_dir}/reconstructions.png",
                "Loss": f"{args.output_dir}/loss_curve.png"},
        facts=facts,
        usage=USAGE.format(location=location or Path(args.output_dir).name),
        pipeline_tag=None, tags=["autoencoder"], base_model=args.pretrained_vae_name_or_path, license=args.license,
    )


if __name__ == "__main__":
    main()
