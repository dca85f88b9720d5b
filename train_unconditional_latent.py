#!/usr/bin/env python
"""Train an unconditional latent diffusion model: a UNet2DModel with DDPM on the latents of a VAE.

    accelerate launch train_unconditional_latent.py \
        --train_data_dir data/ffhq256 --vae_name_or_path stabilityai/sd-vae-ft-mse \
        --model_config_name_or_path seed-ffhq256-sdvae --cache_latents --use_ema \
        --output_dir outputs/ffhq256-ldm

The output folder becomes a diffusers pipeline (unet/ with the EMA weights, vae/, scheduler/)
that loads with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import logging

import torch

from pipeline_latent_uncond import UnconditionalLatentPipeline
from uldm import args as cli
from uldm.checkpoints import final_save_remedy
from uldm.data import build_image_dataset, sharded_verifier
from uldm.diffusion import build_noise_scheduler, noisy_latents_and_target, per_sample_loss
from uldm.errors import exit_cleanly_on_input_errors
from uldm.latent_cache import (
    cached_latents, centre_crops_for_the_cache, latents_from_batch, measure_moments_sharded,
)
from uldm.model_card import write_model_card
from uldm.models import build_unet, count_parameters
from uldm.sampling import make_scheduler
from uldm.saving import processes_stop_together, save_pretrained_atomically
from uldm.training import build_training_loop, save_run_arguments, start_run
from uldm.validation import fixed_validation_noise, log_image_grid
from uldm.vae import (
    check_unet_matches_latents, describe_vae, latent_shape, load_vae, resolve_latent_scaling,
    std_over_processes, vae_dtype_for, vae_fingerprint,
)

logger = logging.getLogger("train_unconditional_latent")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_data_args(parser)
    group = parser.add_argument_group("first stage (VAE)")
    group.add_argument("--vae_name_or_path", type=str, required=True,
                       help="Folder or hub id of an AutoencoderKL, VQModel or AutoencoderTiny (class read from its config).")
    group.add_argument("--vae_subfolder", type=str, default=None, help='e.g. "vae" inside a Stable Diffusion repository.')
    group.add_argument("--revision", type=str, default=None)
    group.add_argument("--latent_scaling_factor", type=str, default="auto",
                       help="'auto': the VAE config's scaling_factor, 1.0 for VQ, else 1/std measured on the data.")
    group.add_argument("--scale_estimation_images", type=int, default=512,
                       help="Images encoded to measure the latent std when it must be measured (without a cache).")
    group.add_argument("--cache_latents", action="store_true",
                       help="Encode the data set once and train from stored latents (the VAE encoder then never runs).")
    group.add_argument("--latent_cache_dir", type=str, default=None, help="Default: <output_dir>/latent_cache.")
    group.add_argument("--encode_batch_size", type=int, default=32)
    group = parser.add_argument_group("model")
    group.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="UNet preset (" + ", ".join(cli.list_presets("unet")) + "), JSON file or model folder.")
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="Start from these UNet weights (a saved pipeline or UNet folder) instead of a fresh model.")
    cli.add_noise_args(parser)
    cli.add_optimization_args(parser)
    cli.add_ema_args(parser)
    cli.add_logging_args(parser)
    cli.add_checkpoint_args(parser)
    args = parser.parse_args(argv)
    cli.check_common_args(args)
    if not args.model_config_name_or_path and not args.pretrained_model_name_or_path:
        args.model_config_name_or_path = "seed-ffhq256-sdvae"
    return args


def measure_latent_std(train_set, vae, args, accelerator) -> float:
    """Std of the latents over many images, the same on every process: over the whole latent cache
    (which every process reads), or over a seeded subset of images encoded in shards."""
    if args.cache_latents:
        return std_over_processes(train_set.latent_moments(), accelerator, sharded=False)
    moments = measure_moments_sharded(train_set, vae, args.scale_estimation_images, args.encode_batch_size,
                                      accelerator.process_index, accelerator.num_processes, args.seed)
    return std_over_processes(moments, accelerator)


@exit_cleanly_on_input_errors
def main(args: argparse.Namespace) -> None:
    accelerator = start_run(args)
    if accelerator.is_main_process:
        save_run_arguments(args, args.output_dir)

    vae = load_vae(args.vae_name_or_path, args.vae_subfolder, args.revision,
                   torch_dtype=vae_dtype_for(accelerator.mixed_precision))
    vae.to(accelerator.device)
    unet = build_unet(args.model_config_name_or_path, args.pretrained_model_name_or_path, args.revision)
    check_unet_matches_latents(unet, vae, args.resolution)
    logger.info("VAE: %s; UNet: %.1fM parameters", describe_vae(vae), count_parameters(unet) / 1e6)

    centre_crops_for_the_cache(args)
    images = build_image_dataset(args, verify=sharded_verifier(accelerator, args.resolution))
    logger.info("Training images: %d", len(images))
    train_set = images
    if args.cache_latents:
        vae_key = vae_fingerprint(vae, args.vae_name_or_path, args.vae_subfolder, args.revision)
        train_set = cached_latents(images, vae, vae_key, args, accelerator,
                                   description={"vae": args.vae_name_or_path, "resolution": args.resolution})
    scaling = resolve_latent_scaling(
        args.latent_scaling_factor, vae,
        measure_std=lambda: measure_latent_std(train_set, vae, args, accelerator),
    )
    logger.info("Latent scale %.6f, shift %.4f (%s)", scaling.scale, scaling.shift, scaling.source)

    noise_scheduler = build_noise_scheduler(args.ddpm_num_steps, args.ddpm_beta_schedule, args.beta_start,
                                            args.beta_end, args.prediction_type)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    loop = build_training_loop(accelerator, args, unet, train_set, "train_unconditional_latent")
    unet, max_train_steps = loop.model, loop.max_train_steps
    accelerator.log({"latent_scaling_factor": scaling.scale}, step=0)
    logger.info(
        "Training %d steps from step %d: %d images, batch %d x %d processes x %d accumulation",
        max_train_steps, loop.global_step, len(train_set), args.train_batch_size, accelerator.num_processes,
        args.gradient_accumulation_steps,
    )

    shape = latent_shape(vae, args.resolution)
    validation_noise = fixed_validation_noise(args.num_validation_images, shape, args.seed, accelerator.device)

    def make_pipeline(model) -> UnconditionalLatentPipeline:
        return UnconditionalLatentPipeline(
            unet=model, vae=vae, scheduler=make_scheduler(args.validation_scheduler, noise_scheduler.config),
            latent_scaling_factor=scaling.scale, latent_shift_factor=scaling.shift,
        )

    def validate(step: int):
        if not accelerator.is_main_process or not args.num_validation_images:
            return None
        with loop.ema_weights() as model, accelerator.autocast():
            model.eval()
            pipeline = make_pipeline(model)
            pipeline.set_progress_bar_config(disable=True)
            images_np = pipeline(batch_size=args.num_validation_images, latents=validation_noise,
                                 num_inference_steps=args.validation_inference_steps, output_type="np").images
            model.train()
        return log_image_grid(accelerator, images_np, step, args.output_dir)

    def on_step_end(step: int):
        if args.validation_steps and step % args.validation_steps == 0 and step < max_train_steps:
            validate(step)

    def compute_loss(batch, generator):
        latents = latents_from_batch(batch, vae, scaling, generator, args.random_flip)
        noisy, timesteps, target = noisy_latents_and_target(noise_scheduler, latents, generator)
        prediction = unet(noisy, timesteps).sample
        return per_sample_loss(prediction, target, timesteps, noise_scheduler, args.snr_gamma).mean()

    finished = loop.run(compute_loss, on_step_end)
    if finished:
        grid = validate(loop.global_step)
        remedy = final_save_remedy(args.output_dir)
        with processes_stop_together(accelerator, "the trained pipeline", args.output_dir, remedy=remedy):
            if accelerator.is_main_process:
                with loop.ema_weights() as model:
                    if vae.dtype != torch.float32:
                        vae.to(torch.float32)
                    pipeline = make_pipeline(model)
                    pipeline.scheduler = make_scheduler("dpmsolver++", noise_scheduler.config)
                    save_pretrained_atomically(pipeline, args.output_dir, "the trained pipeline", remedy=remedy)
                write_model_card(
                    args.output_dir,
                    title="Unconditional latent diffusion model",
                    summary=f"A UNet2DModel ({count_parameters(loop.unwrapped_model) / 1e6:.1f}M parameters) trained "
                            f"with DDPM on the latents of {describe_vae(vae)}, with train_unconditional_latent.py.",
                    args=args,
                    images={"Samples (EMA weights)" if loop.ema else "Samples": grid, "Loss": f"{args.output_dir}/loss_curve.png"},
                    facts={"steps": loop.global_step, "images seen": loop.state.samples_seen,
                           "latent scale": f"{scaling.scale:.6f} ({scaling.source})", "latent shift": scaling.shift},
                )
                logger.info("Saved the pipeline to %s", args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
