#!/usr/bin/env python
"""DreamBooth for an unconditional latent diffusion model: fine-tune it on photos of one subject.

    accelerate launch train_dreambooth_unconditional.py \
        --pretrained_model_name_or_path outputs/ffhq256-seed --instance_data_dir data/me_aligned \
        --with_prior_preservation --class_data_dir data/ffhq256-seed-class --num_class_images 200 \
        --prior_loss_weight 0.5 --output_dir outputs/dreambooth-me

With no text prompt, the data is the only handle: training on the instance photos pulls the whole
distribution towards the subject, and the prior-preservation loss on images sampled from the base
model (generated into --class_data_dir when missing) keeps its diversity. The VAE is frozen; the
UNet is fully fine-tuned, or gets a LoRA adapter with --use_lora (only the adapter is saved).
The output loads like the base model (`uldm.pipeline_loading.load_pipeline(output_dir)`), or, with
--use_lora, as diffusers users load LoRA: load the base, then `.load_lora_weights(output_dir)`.

Defaults follow diffusers' train_dreambooth.py: 800 steps, learning rate 5e-6 (1e-4 with --use_lora),
constant schedule, AdamW(0.9, 0.999, weight decay 1e-2). Validation grids (fixed noise; step 0 is the
base model) and samples/validation_metrics.jsonl (distance of the samples to the instance photos and
their spread) show the subject/diversity trade-off as training goes.
"""

from __future__ import annotations

import argparse
import logging
import os
from functools import partial
from pathlib import Path

import torch

from uldm import args as cli
from uldm.data import DataConfig, Preprocessing, prepare_training_set
from uldm.diffusion import describe_levers, noisy_latents_and_target
from uldm.dreambooth import (
    DreamBoothDataset, DreamBoothLoss, base_resolution, check_class_image_sizes, check_resolution,
    fine_tuned_scheduler, generate_missing_class_images, instance_photos, list_instance_images, load_base_pipeline,
    SubjectReferences, side_by_side, training_noise_scheduler,
)
from uldm.errors import InputError, exit_cleanly_on_input_errors
from uldm.guidance import training_guidance
from uldm.hub import HubUploader
from uldm.latent_cache import CacheConfig
from uldm.latents import latents_from_batch, pipeline_scaling
from uldm.lora import adapter_only_checkpoint_hooks, add_lora_adapter, lora_target_modules, save_lora_result
from uldm.metrics.subject_similarity import InstanceEmbeddings, load_image_encoder, mean_pairwise_similarity, summary_line
from uldm.model_card import write_model_card
from uldm.models import count_parameters, use_xformers_if_installed
from uldm.sampling import SCHEDULER_NAMES, build_pipeline, save_pipeline
from uldm.saving import final_save_remedy, save_folder_atomically
from uldm.training import (
    Schedule, Validation, ValidationResult, build_training_loop, finish_run, read_metrics, start_run,
)
from uldm.validation import ValidationConfig, fixed_validation_noise, image_grid, sample_from_noise
from uldm.vae import describe_vae, latent_shape, vae_dtype_for, vae_fingerprint

logger = logging.getLogger("train_dreambooth_unconditional")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("base model and subject")
    group.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="The base: a pipeline saved by this toolkit, a CompVis LDM folder (unet + vqvae + "
                            "scheduler) or a hub id. Its code is never run.")
    group.add_argument("--revision", type=str, default=None)
    cli.add_variant_arg(group)
    group.add_argument("--instance_data_dir", type=str, required=True,
                       help="Photos of the subject (5-20; faces aligned with align_faces.py).")
    group.add_argument("--resolution", type=int, default=None,
                       help="Must be the base model's resolution (its default).")
    group.add_argument("--center_crop", action="store_true", help="Crop the centre instead of a seeded random position.")
    group.add_argument("--random_flip", action="store_true", help="Mirror images horizontally at random.")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument("--cache_latents", action="store_true",
                       help="Encode instance and class images once (centre crops) and train from the stored latents.")
    group.add_argument("--latent_cache_dir", type=str, default=None, help="Default: <output_dir>/latent_cache.")
    group.add_argument("--encode_batch_size", type=int, default=16)

    group = parser.add_argument_group("prior preservation")
    group.add_argument("--with_prior_preservation", action="store_true",
                       help="Add the loss on class images (samples of the base model) to keep its diversity.")
    group.add_argument("--class_data_dir", type=str, default=None,
                       help="Class images; missing ones are generated by the base model. Reusable across runs.")
    group.add_argument("--num_class_images", type=int, default=100,
                       help="Class images to train with; generated when the folder holds fewer.")
    group.add_argument("--prior_loss_weight", type=float, default=1.0,
                       help="Weight of the prior loss: higher keeps more diversity, lower gives more of the subject.")
    group.add_argument("--sample_batch_size", type=int, default=4, help="Batch size of class-image generation.")
    group.add_argument("--class_sampling_steps", type=int, default=25, help="Sampler steps per class image.")
    group.add_argument("--class_sampler", type=str, default="dpmsolver++", choices=SCHEDULER_NAMES,
                       help="Sampler of the class images (a fast one: dpmsolver++ gives good images in ~25 steps).")
    group.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                       help="Choose prior generation precision between fp32, fp16 and bf16 (bfloat16): the class "
                            "images are sampled under autocast to it (fp32/no: full precision). Default: the run's "
                            "--mixed_precision.")

    cli.add_lora_args(parser, "Train a LoRA adapter instead of the whole UNet; only the adapter (a few MB) is saved.")

    cli.add_loss_lever_args(parser)  # the base model's noise schedule and prediction type are kept
    # DreamBooth defaults (diffusers' train_dreambooth.py): short runs, small constant learning rate.
    cli.add_optimization_args(parser, learning_rate=None, adam_beta1=0.9, adam_weight_decay=1e-2,
                              lr_scheduler="constant", lr_warmup_steps=0)
    parser.set_defaults(train_batch_size=4, num_epochs=None)
    cli.add_ema_args(parser)  # with --use_lora the EMA (and its checkpoints) keeps a copy of the whole UNet
    cli.add_logging_args(parser, validation_steps=100)
    cli.add_subject_metric_args(parser)
    cli.add_checkpoint_args(parser, checkpointing_steps=200)
    cli.add_compute_args(parser)
    cli.add_hub_args(parser)
    cli.add_text_only_args(parser)
    args = parser.parse_args(argv)
    cli.check_common_args(args)
    if args.max_train_steps is None and args.num_epochs is None:
        args.max_train_steps = 800
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.use_lora else 5e-6
    if args.with_prior_preservation:
        if not args.class_data_dir:
            raise InputError("--with_prior_preservation needs --class_data_dir (a folder; missing images are generated).")
        if args.num_class_images < 1 or args.sample_batch_size < 1 or args.class_sampling_steps < 1:
            raise InputError("--num_class_images, --sample_batch_size and --class_sampling_steps must be at least 1.")
    elif args.class_data_dir:
        logger.warning("--class_data_dir is ignored without --with_prior_preservation.")
    return args


def build_image_set(folder: str, args, preprocessing: Preprocessing, vae, vae_key: str, accelerator,
                    cache_config: CacheConfig | None, max_items: int | None = None):
    """An image folder as a data set of images, or of cached latents with --cache_latents; and its
    readable image files."""
    config = DataConfig(train_data_dir=folder, resolution=preprocessing.resolution,
                        center_crop=preprocessing.center_crop, random_flip=args.random_flip,
                        max_train_samples=max_items, seed=args.seed)
    return prepare_training_set(config, accelerator, cache_config, vae, vae_key,
                                description={"images": str(folder), "resolution": args.resolution})


def build_training_set(args, vae, accelerator) -> tuple[DreamBoothDataset, list[Path]]:
    """Instance (and class) examples as images, or as cached latents with --cache_latents (which stores one crop
    per image, so it implies --center_crop); and the readable instance photos (checked once here, reused for the
    references and the model card)."""
    preprocessing = Preprocessing(args.resolution, cli.center_crop_of(args, warn=True))
    cache_config = cli.cache_config(args)
    base = args.pretrained_model_name_or_path
    vae_key = vae_fingerprint(vae, base, "vqvae" if (Path(base) / "vqvae").is_dir() else "vae", args.revision)
    instance_set, instance_files = build_image_set(args.instance_data_dir, args, preprocessing, vae, vae_key,
                                                   accelerator, cache_config)
    class_set = None
    if args.with_prior_preservation:
        class_set, _ = build_image_set(args.class_data_dir, args, preprocessing, vae, vae_key, accelerator,
                                       cache_config, max_items=args.num_class_images)
    dataset = DreamBoothDataset(instance_set, class_set, min_length=args.train_batch_size * accelerator.num_processes)
    return dataset, instance_files


@exit_cleanly_on_input_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    # Everything that can be wrong with the input is checked before anything is written or generated.
    pipeline = load_base_pipeline(args.pretrained_model_name_or_path, args.revision, variant=args.variant)
    args.resolution = check_resolution(args.resolution, pipeline)
    levers = cli.loss_config(args, pipeline.scheduler.config)
    sampler = fine_tuned_scheduler(pipeline, levers, args.use_lora)
    instance_paths = list_instance_images(args.instance_data_dir)
    if args.with_prior_preservation:
        check_class_image_sizes(args.class_data_dir, args.resolution)
    config = cli.training_config(args)
    validation_config = cli.config_from(ValidationConfig, args)
    guidance = training_guidance(validation_config, pipeline, base=args.pretrained_model_name_or_path,
                                 lora=args.use_lora)
    accelerator = start_run(config)
    hub = HubUploader.from_config(cli.hub_config(args), accelerator.is_main_process)

    unet, vae = pipeline.unet, pipeline.vae
    vae.requires_grad_(False).eval()
    vae.to(accelerator.device)
    vae_dtype = vae_dtype_for(accelerator.mixed_precision, config.compute.vae_precision, args.cache_latents)
    if vae.dtype != vae_dtype:
        vae.to(dtype=vae_dtype)
    unet.to(accelerator.device)
    scaling = pipeline_scaling(pipeline)
    logger.info("Base model %s: %d px, VAE %s, UNet %.1fM parameters, latent scale %.5f",
                args.pretrained_model_name_or_path, base_resolution(pipeline), describe_vae(vae),
                count_parameters(unet) / 1e6, scaling.scale)

    if args.with_prior_preservation:
        generate_missing_class_images(
            pipeline, args.class_data_dir, args.num_class_images, accelerator, seed=args.seed,
            batch_size=args.sample_batch_size, num_inference_steps=args.class_sampling_steps,
            scheduler_name=args.class_sampler, precision=args.prior_generation_precision,
        )

    train_set, instance_files = build_training_set(args, vae, accelerator)
    class_set = train_set.prior
    logger.info("Instance images: %d; class images: %d", len(instance_paths), len(class_set) if class_set else 0)

    noise_scheduler = training_noise_scheduler(sampler)
    lora_config = checkpoint_model_hooks = None
    if args.use_lora:
        lora_config = add_lora_adapter(unet, args.rank, args.lora_alpha, lora_target_modules(args.lora_target_modules),
                                       args.lora_dropout)
        checkpoint_model_hooks = adapter_only_checkpoint_hooks(accelerator)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    logger.info("Training %.3fM of the UNet's %.1fM parameters", sum(p.numel() for p in trainable) / 1e6,
                count_parameters(unet) / 1e6)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        use_xformers_if_installed(unet)
    unet.train()

    validation_noise = fixed_validation_noise(validation_config.num_validation_images,
                                              latent_shape(vae, args.resolution), args.seed, accelerator.device)
    # Only the main process validates and writes the model card, the only users of the photos.
    photos = references = subject_scores = None
    if accelerator.is_main_process:
        photos = instance_photos(instance_files, args.instance_data_dir, args.resolution)
        references = SubjectReferences.from_pixels(pipeline, photos)
        subject_scores = subject_embeddings(args, instance_files, accelerator.device)

    def validate(step: int) -> ValidationResult | None:
        """Samples from the same noise every time (step 0: the base model), plus how close they are
        to the subject and how diverse they are."""
        if not accelerator.is_main_process or not validation_config.num_validation_images:
            return None
        def validation_pipeline(model):
            sampling = build_pipeline(model, vae, scaling, sampler.config, validation_config.validation_scheduler)
            return guidance.apply(sampling) if guidance else sampling

        latents, images = sample_from_noise(loop, validation_pipeline, validation_noise,
                                            validation_config.validation_inference_steps)
        values = references.measure(latents, images)
        logger.info("Step %d: distance to the instance images %.4f (latents %.4f), spread of the samples %.4f "
                    "(latents %.4f)", step, values["instance_distance"], values["instance_latent_distance"],
                    values["sample_spread"], values["sample_latent_spread"])
        if subject_scores is not None:
            scores = subject_scores.score(images)
            values.update({key: value for key, value in scores.items()
                           if value is not None and key.split("_", 1)[0] in ("dino", "clip", "div")})
            logger.info("Step %d: %s", step, summary_line(scores))
        return ValidationResult(images={"validation": images}, metrics=values)

    def save_result(model) -> None:
        """A full pipeline that loads like the base one (same VAE, scheduler, latent scaling), or only the
        LoRA adapter; and the model card."""
        if not accelerator.is_main_process:
            return
        name = args.pretrained_model_name_or_path
        if lora_config is not None:
            save_folder_atomically(
                lambda folder: save_lora_result(model, folder,
                                                base_model=os.path.abspath(name) if os.path.isdir(name) else name),
                args.output_dir, "the LoRA adapter", remedy=partial(final_save_remedy, args.output_dir))
        else:
            save_pipeline(model, vae, scaling, sampler, args.output_dir)
        write_dreambooth_model_card(args, config.arguments, loop, photos, len(instance_paths), class_set,
                                    subject_scores, location=hub.location if hub.enabled else None,
                                    lever_facts=describe_levers(sampler.config, levers))
        logger.info("Saved the result of epoch %d (step %d) to %s", loop.epochs_completed, loop.global_step,
                    args.output_dir)
        if not loop.finished:
            hub.upload_in_background(f"Epoch {loop.epochs_completed}")

    loop = build_training_loop(accelerator, config, unet, train_set, "train_dreambooth_unconditional",
                               parameters=trainable,
                               validation=Validation(validate, Schedule(every_steps=validation_config.validation_steps,
                                                                        every_epochs=args.save_images_epochs),
                                                     at_start=True),
                               save_result=save_result, save_schedule=Schedule(every_epochs=args.save_model_epochs),
                               checkpoint_model_hooks=checkpoint_model_hooks)
    unet = loop.model
    dreambooth_loss = DreamBoothLoss(noise_scheduler, args.prior_loss_weight, levers)

    def compute_loss(batch, generator):
        latents = latents_from_batch(batch["instance"], vae, scaling, generator, args.random_flip)
        num_instance = latents.shape[0]
        if "prior" in batch:
            prior = latents_from_batch(batch["prior"], vae, scaling, generator, args.random_flip)
            latents = torch.cat([latents, prior])
        noisy, timesteps, target = noisy_latents_and_target(noise_scheduler, latents, generator, levers)
        prediction = unet(noisy, timesteps).sample
        return dreambooth_loss(prediction, target, timesteps, num_instance)

    if class_set:
        logger.info("Each batch: %d instance + %d class images", args.train_batch_size, args.train_batch_size)
    finished = loop.run(compute_loss)
    finish_run(loop)
    if finished:
        hub.upload_and_wait()


LORA_USAGE = """\
This folder holds a LoRA adapter for the UNet of `{base}`, in diffusers' LoRA layout
(pytorch_lora_weights.safetensors; rank, alpha and target modules in its metadata). Load it as any
diffusers LoRA (peft needed):

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}", trust_remote_code=True)
# or, inside this toolkit's repository (runs no code from the folder; needed for a CompVis LDM base):
# from uldm.pipeline_loading import load_pipeline
# pipe = load_pipeline("{base}")
pipe.load_lora_weights("{location}")
images = pipe(batch_size=4, num_inference_steps=50).images

pipe.fuse_lora()                                          # fold it in ...
pipe.unload_lora_weights()
pipe.save_pretrained("merged")                            # ... for a plain pipeline, no peft needed
```
"""


def subject_embeddings(args, instance_files: list[Path], device) -> InstanceEmbeddings | None:
    """--validation_dino_model / --validation_clip_model: the instance photos embedded once, for scoring every
    validation's samples (uldm.metrics.subject_similarity; the photos centre-cropped as evaluate.py does)."""
    models = {metric: name for metric, name in (("dino", args.validation_dino_model),
                                                 ("clip_i", args.validation_clip_model)) if name}
    if not models:
        return None
    encoders = {metric: load_image_encoder(name, device) for metric, name in models.items()}
    return InstanceEmbeddings.from_photos(instance_files, encoders, device)


def subject_facts(rows: list[dict], scores: InstanceEmbeddings | None) -> dict:
    """The model card's DINO / CLIP-I lines: first and last validation, and the photos among themselves."""
    if scores is None or not rows:
        return {}
    first, last = rows[0], rows[-1]
    facts = {}
    for metric, label in (("dino", "DINO"), ("clip_i", "CLIP-I")):
        if metric not in first or metric not in last:
            continue
        text = f"{first[metric]:.3f} -> {last[metric]:.3f}"
        ceiling = mean_pairwise_similarity(scores.embeddings[metric])
        if ceiling is not None:
            text += f" (the photos among themselves: {ceiling:.3f})"
        if f"div_{metric}" in first and f"div_{metric}" in last:
            text += f"; diversity of the samples {first[f'div_{metric}']:.3f} -> {last[f'div_{metric}']:.3f}"
        facts[f"{label} similarity of the samples to the instance photos (step {first['step']} -> {last['step']})"] = text
    return facts


def write_dreambooth_model_card(args, arguments: dict, loop, photos, num_instance: int, class_set,
                                subject_scores: InstanceEmbeddings | None = None,
                                location: str | None = None, lever_facts: dict | None = None) -> None:
    output_dir = Path(args.output_dir)
    instance_grid = output_dir / "samples" / "instance_images.png"
    instance_grid.parent.mkdir(parents=True, exist_ok=True)
    image_grid(((photos[:16] + 1) / 2).permute(0, 2, 3, 1).numpy()).save(instance_grid)
    grid = loop.last_validation.grids.get("validation")
    comparison = None
    if grid is not None:
        comparison = side_by_side(instance_grid, grid, output_dir / "samples" / "instances_vs_samples.png")
    base_grid = output_dir / "samples" / "validation_0000000.png"
    rows = read_metrics(output_dir, having="instance_distance")
    facts = {"base model": args.pretrained_model_name_or_path, "steps": loop.global_step,
             "instance images": num_instance,
             "prior preservation": f"{len(class_set)} class images, weight {args.prior_loss_weight}" if class_set else "off",
             "trained": f"LoRA rank {args.rank} ({args.lora_target_modules})" if args.use_lora else "whole UNet"}
    if rows:
        first, last = rows[0], rows[-1]
        change = lambda name: f"{first[name]:.4f} -> {last[name]:.4f}"  # noqa: E731
        facts[f"distance of the samples to the nearest instance image (step {first['step']} -> {last['step']})"] = (
            f"{change('instance_distance')} (RMS, 32 px thumbnails in [0, 1]); latents "
            f"{change('instance_latent_distance')}")
        facts["spread of the samples (mean distance between two)"] = (
            f"{change('sample_spread')}; latents {change('sample_latent_spread')}")
    facts.update(subject_facts(rows, subject_scores))
    facts.update(lever_facts or {})
    write_model_card(
        output_dir,
        title="DreamBooth fine-tune of an unconditional latent diffusion model",
        summary=(f"`{args.pretrained_model_name_or_path}` fine-tuned on {num_instance} photos of one subject with "
                 "train_dreambooth_unconditional.py"
                 + (" and prior preservation" if class_set else "") + ". Samples come from the same noise "
                 "at every step, so the grids show the drift from the base model towards the subject."),
        arguments=arguments,
        images={"Instance images (left) and samples after fine-tuning (right)": comparison,
                "Base model samples (step 0, same noise)": base_grid if base_grid.is_file() else None,
                "Loss": output_dir / "loss_curve.png"},
        facts=facts,
        usage=LORA_USAGE.format(base=args.pretrained_model_name_or_path, location=location or output_dir.name)
        if args.use_lora else None,
        tags=["dreambooth", *(["lora"] if args.use_lora else [])], base_model=args.pretrained_model_name_or_path,
        license=args.license, location=location,
    )


if __name__ == "__main__":
    main()
