#!/usr/bin/env python
"""Train an unconditional latent diffusion model: a UNet2DModel with DDPM on the latents of a VAE.

    accelerate launch train_unconditional_latent.py \
        --train_data_dir data/ffhq256 --vae_name_or_path stabilityai/sd-vae-ft-mse \
        --model_config_name_or_path seed-ffhq256-sdvae --cache_latents --use_ema \
        --output_dir outputs/ffhq256-ldm

The output folder becomes a diffusers pipeline (unet/ with the EMA weights, vae/, scheduler/)
that loads with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

With `--vae_name_or_path none` the same loop trains a plain pixel-space DDPM on 3 x R x R images
(`--model_config_name_or_path tiny-pixel` for the 32 px demo data); the result is a diffusers
`DDPMPipeline` (unet/, scheduler/).
"""

from __future__ import annotations

import argparse
import logging

from uldm import args as cli
from uldm.data import DataConfig
from uldm.diffusion import build_noise_scheduler, describe_levers, noisy_latents_and_target, weighted_loss
from uldm.errors import exit_cleanly_on_input_errors
from uldm.metrics.fid_validation import (
    FidConfig, build_fid_scorer, build_reference, load_feature_extractor, training_images,
)
from uldm.first_stage import FirstStageConfig, first_stage_class, load_first_stage
from uldm.guidance import training_guidance
from uldm.hub import HubUploader
from uldm.model_card import write_model_card
from uldm.models import build_unet, count_parameters, use_xformers_if_installed
from uldm.presets import list_presets
from uldm.sampling import make_scheduler
from uldm.training import Schedule, Validation, ValidationResult, build_training_loop, finish_run, start_run
from uldm.validation import ValidationConfig, fixed_validation_noise, sample_from_noise

logger = logging.getLogger("train_unconditional_latent")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_data_args(parser)
    group = parser.add_argument_group("first stage (VAE)")
    group.add_argument("--vae_name_or_path", type=str, required=True,
                       help="Folder or hub id of an AutoencoderKL, VQModel or AutoencoderTiny (class read from its "
                            "config); 'none': no first stage, a plain pixel-space DDPM (saved as a DDPMPipeline).")
    group.add_argument("--vae_subfolder", type=str, default=None, help='e.g. "vae" inside a Stable Diffusion repository.')
    group.add_argument("--revision", type=str, default=None)
    cli.add_variant_arg(group)
    group.add_argument("--latent_scaling_factor", type=str, default="auto",
                       help="'auto': the VAE config's scaling_factor, 1.0 for VQ, else 1/std measured on the data.")
    group.add_argument("--scale_estimation_images", type=int, default=512,
                       help="Images encoded to measure the latent std when it must be measured (without a cache).")
    cli.add_latent_cache_args(group)
    group = parser.add_argument_group("model")
    group.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="UNet preset (" + ", ".join(list_presets("unet")) + "), JSON file or model folder.")
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="Start from these UNet weights (a saved pipeline or UNet folder) instead of a fresh model.")
    cli.add_noise_args(parser)
    cli.add_loss_lever_args(parser)
    cli.add_optimization_args(parser)
    cli.add_ema_args(parser)
    cli.add_posthoc_ema_args(parser)
    cli.add_logging_args(parser)
    cli.add_checkpoint_args(parser)
    cli.add_compute_args(parser)
    cli.add_hub_args(parser)
    cli.add_text_only_args(parser)
    cli.add_fid_args(parser)
    args = parser.parse_args(argv)
    cli.resolve_prediction_type(args)
    cli.check_common_args(args)
    cli.check_fid_args(args)
    first_stage = first_stage_class(args.vae_name_or_path)
    if not args.model_config_name_or_path and not args.pretrained_model_name_or_path:
        args.model_config_name_or_path = first_stage.default_unet_preset
    first_stage.check_config(cli.config_from(FirstStageConfig, args))  # e.g. no latent options without a VAE
    return args


@exit_cleanly_on_input_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    config = cli.training_config(args)
    levers = cli.loss_config(args)
    data_config = cli.config_from(DataConfig, args, center_crop=cli.center_crop_of(args, warn=True))
    cache_config = cli.cache_config(args)
    validation_config = cli.config_from(ValidationConfig, args)
    fid_config = cli.config_from(FidConfig, args)
    # Before anything is written: a missing Inception weights file stops the run here.
    fid_extractor = load_feature_extractor(fid_config) if fid_config.enabled else None
    accelerator = start_run(config)
    hub = HubUploader.from_config(cli.hub_config(args), accelerator.is_main_process)

    first_stage = load_first_stage(cli.config_from(FirstStageConfig, args), accelerator,
                                   config.compute.vae_precision)
    unet = build_unet(args.model_config_name_or_path, args.pretrained_model_name_or_path, args.revision,
                      args.variant)
    first_stage.check_unet(unet, args.resolution)
    logger.info("VAE: %s; UNet: %.1fM parameters", first_stage.describe(), count_parameters(unet) / 1e6)

    train_set, files = first_stage.training_set(data_config, accelerator, cache_config)
    logger.info("Training images: %d", len(train_set))
    first_stage.fit(train_set, accelerator, args.seed)

    noise_scheduler = build_noise_scheduler(args.ddpm_num_steps, args.ddpm_beta_schedule, args.beta_start,
                                            args.beta_end, args.prediction_type, levers,
                                            clip_sample=first_stage.clip_sample)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        use_xformers_if_installed(unet)
    validation_noise = fixed_validation_noise(validation_config.num_validation_images,
                                              first_stage.sample_shape(args.resolution), args.seed, accelerator.device)
    fid_scorer = None
    if fid_config.enabled:
        reference = build_reference(fid_config, training_images(data_config, train_set, files), args.resolution,
                                    data_config.center_crop, args.seed)
        fid_scorer = build_fid_scorer(fid_config, fid_extractor, reference, accelerator, args.output_dir,
                                      validation_config.validation_inference_steps, args.seed)

    def sampling_pipeline(model):
        return first_stage.pipeline(model, make_scheduler(validation_config.validation_scheduler,
                                                          noise_scheduler.config))

    # Checked here, before the first step: the latent scale it must share may have been measured just now.
    guidance = training_guidance(validation_config, sampling_pipeline(unet), base=args.pretrained_model_name_or_path)

    def validation_pipeline(model):
        return guidance.apply(sampling_pipeline(model)) if guidance else sampling_pipeline(model)

    def validate(step: int) -> ValidationResult | None:
        """A grid from fixed noise (main process) and, with --validation_fid_images, FID/KID (all processes)."""
        metrics = fid_scorer.score_training_model(loop, validation_pipeline) if fid_scorer is not None else None
        if not accelerator.is_main_process:
            return None
        grids = {}
        if validation_config.num_validation_images:
            _, grids["validation"] = sample_from_noise(loop, validation_pipeline, validation_noise,
                                                       validation_config.validation_inference_steps)
        if metrics:
            logger.info("Step %d: FID %.3f, KID %.5f (%d samples)", step, metrics["fid"], metrics["kid"],
                        fid_config.validation_fid_images)
        return ValidationResult(images=grids, metrics=metrics or {})

    def save_result(model) -> None:
        if not accelerator.is_main_process:
            return
        # Saved pipelines sample with DPM-Solver++ (good images in ~25 steps) on the training noise schedule.
        scheduler = make_scheduler("dpmsolver++", noise_scheduler.config)
        first_stage.save(model, scheduler, args.output_dir)
        card = first_stage.card(args.output_dir)
        write_model_card(
            args.output_dir,
            title=card.title,
            summary=f"A UNet2DModel ({count_parameters(model) / 1e6:.1f}M parameters) trained "
                    f"with DDPM on {card.space}, with train_unconditional_latent.py.",
            arguments=config.arguments,
            images={"Samples (EMA weights)" if loop.ema else "Samples": loop.last_validation.grids.get("validation"),
                    "Loss": f"{args.output_dir}/loss_curve.png"},
            facts={"steps": loop.global_step, "images seen": loop.state.samples_seen, **card.facts,
                   "epochs": loop.epochs_completed, **describe_levers(noise_scheduler.config, levers),
                   **fid_facts(args, loop)},
            usage=card.usage, base_model=args.pretrained_model_name_or_path, license=args.license,
            location=hub.location if hub.enabled else None, base_tags=card.base_tags,
        )
        logger.info("Saved the pipeline of epoch %d (step %d) to %s", loop.epochs_completed, loop.global_step,
                    args.output_dir)
        if not loop.finished:
            hub.upload_in_background(f"Epoch {loop.epochs_completed}")

    loop = build_training_loop(accelerator, config, unet, train_set, "train_unconditional_latent",
                               validation=Validation(validate, Schedule(every_steps=validation_config.validation_steps,
                                                                        every_epochs=args.save_images_epochs),
                                                     keep_best="fid" if args.keep_best_checkpoint else None),
                               save_result=save_result, save_schedule=Schedule(every_epochs=args.save_model_epochs))
    unet = loop.model
    first_stage.log_to_trackers(accelerator)

    def compute_loss(batch, generator):
        clean = first_stage.targets(batch, generator, args.random_flip)
        noisy, timesteps, target = noisy_latents_and_target(noise_scheduler, clean, generator, levers)
        prediction = unet(noisy, timesteps).sample
        return weighted_loss(prediction, target, timesteps, noise_scheduler, levers)

    finished = loop.run(compute_loss)
    finish_run(loop)
    if finished:
        hub.upload_and_wait()


def fid_facts(args, loop) -> dict:
    """The model card's FID lines: the last validation's, and the best one's (its checkpoint kept)."""
    if not args.validation_fid_images or "fid" not in loop.last_validation.metrics:
        return {}
    extractor = args.fid_feature_extractor + ("" if args.fid_feature_extractor == "inception" else
                                              " (not comparable with published FIDs)")
    values = loop.last_validation.metrics
    facts = {f"FID / KID at step {loop.last_validation.step} ({args.validation_fid_images} samples, "
             f"{args.validation_scheduler} {args.validation_inference_steps} steps, {extractor})":
             f"{values['fid']:.3f} / {values['kid']:.5f}"}
    if loop.best is not None:
        facts["lowest FID"] = f"{loop.best[1]:.3f} at step {loop.best[0]} (checkpoint-{loop.best[0]} kept)"
    return facts


if __name__ == "__main__":
    main()
