#!/usr/bin/env python
"""Distil a saved diffusion model into a few-step student (consistency distillation, LCM-style).

    accelerate launch distill.py \
        --pretrained_model_name_or_path outputs/ffhq256-ldm --train_data_dir data/ffhq256 --cache_latents \
        --output_dir outputs/ffhq256-lcm

The teacher is any pipeline this toolkit saves: a base model, a DreamBooth result (full or LoRA), a pixel-space
DDPMPipeline; ε- and v-prediction alike, optionally guided by a weaker model (--guide, --guidance_scale). The
student has the teacher's architecture and starts from its weights; it learns to map every point of the
teacher's ODE (one DDIM step of the teacher over --num_ddim_timesteps grid points) to the clean sample that an
EMA target network maps the next point to (uldm/distillation.py). Data flags, the latent cache, checkpoints,
resume and FID during training (at each --student_inference_steps) are the trainers'.

The output folder is an ordinary saved pipeline whose scheduler is diffusers' LCMScheduler, so
`sample.py outputs/ffhq256-lcm --num_inference_steps 2` and `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)(num_inference_steps=2)` sample it with no extra flag. With --use_lora only a LoRA adapter
on the teacher is trained and saved (LCM-LoRA), with the student's scheduler beside it.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from functools import partial


from uldm import args as cli
from uldm.data import DataConfig
from uldm.distillation import (
    ConsistencyConfig, ConsistencyLoss, check_consistency_config, check_student_steps, frozen_copy, guided_teacher,
    load_teacher, save_student_adapter, student_scheduler, sync_target, teacher_resolution,
)
from uldm.errors import InputError, exit_cleanly_on_input_errors
from uldm.first_stage import FirstStageConfig, PixelSampler, saved_model_first_stage
from uldm.guidance import Guidance, load_guide
from uldm.hub import HubUploader
from uldm.lora import adapter_only_checkpoint_hooks, add_lora_adapter, holds_lora_adapter, lora_target_modules
from uldm.metrics.fid_validation import (
    FidConfig, build_fid_scorer, build_reference, load_feature_extractor, training_images,
)
from uldm.model_card import write_model_card
from uldm.models import count_parameters
from uldm.saving import final_save_remedy, save_folder_atomically
from uldm.training import Schedule, Validation, ValidationResult, build_training_loop, finish_run, start_run
from uldm.validation import ValidationConfig, fixed_validation_noise, sample_from_noise, samples_from_noise

logger = logging.getLogger("distill")

DEFAULT_MAX_TRAIN_STEPS = 4000  # LCM(-LoRA)'s 4,000 iterations


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("teacher")
    group.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="The teacher: a pipeline saved by this toolkit (folder or hub id), e.g. the output of "
                            "train_unconditional_latent.py or train_dreambooth_unconditional.py (a LoRA result is "
                            "folded in). Its code is never run.")
    group.add_argument("--revision", type=str, default=None)
    cli.add_variant_arg(group)
    cli.add_guidance_args(group, what="the teacher (the student then samples the guided teacher's ODE at one UNet "
                                      "call a step)")
    cli.add_data_args(parser, default_resolution=None)
    cli.add_latent_cache_args(parser.add_argument_group("latent cache"))
    group = parser.add_argument_group("consistency distillation")
    group.add_argument("--num_ddim_timesteps", type=int, default=50,
                       help="Solver grid: the teacher's DDIM steps over its schedule (LCM's 50: a skip of 20 of 1000 "
                            "timesteps). The student samples on this grid, so it takes at most this many steps.")
    group.add_argument("--loss_type", choices=("huber", "l2"), default="huber",
                       help="huber: the robust pseudo-Huber loss sqrt(d^2 + c^2) - c (LCM's); l2: mean squared error.")
    group.add_argument("--huber_c", type=float, default=0.001, help="The pseudo-Huber constant c.")
    group.add_argument("--timestep_scaling", type=float, default=10.0,
                       help="LCMScheduler's timestep_scaling of the boundary condition (the student is the identity "
                            "at t = 0); saved with the student's scheduler.")
    group.add_argument("--student_inference_steps", type=int, nargs="+", default=[1, 2, 4],
                       help="Step counts of the validation grids and FID scores of the student (at each validation).")
    cli.add_lora_args(parser, "Distil into a LoRA adapter on the teacher (LCM-LoRA) instead of the whole UNet; only "
                              "the adapter and the student's scheduler (a few MB) are saved.")
    cli.add_optimization_args(parser, learning_rate=None, adam_beta1=0.9, adam_weight_decay=1e-2,
                              lr_scheduler="constant", lr_warmup_steps=0)
    parser.set_defaults(num_epochs=None)
    cli.add_ema_args(parser)
    # The EMA is the target network (always on); LCM's decay.
    parser.set_defaults(use_ema=True, ema_max_decay=0.95)
    cli.add_logging_args(parser, validation_steps=500)
    cli.add_checkpoint_args(parser, checkpointing_steps=500)
    cli.add_compute_args(parser)
    cli.add_hub_args(parser)
    cli.add_text_only_args(parser)
    cli.add_fid_args(parser)
    args = parser.parse_args(argv)
    cli.check_common_args(args)
    cli.check_fid_args(args)
    cli.check_guidance_args(args)
    if not args.train_data_dir and not args.dataset_name:
        raise InputError("Give the teacher's training images: --train_data_dir FOLDER (or --dataset_name); the "
                         "student learns the teacher's ODE at noisy versions of them.")
    if min(args.student_inference_steps) < 1:
        raise InputError("--student_inference_steps must be at least 1.")
    if args.max_train_steps is None and args.num_epochs is None:
        args.max_train_steps = DEFAULT_MAX_TRAIN_STEPS
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.use_lora else 1e-5
    return args


def check_teacher_fits(args, teacher, first_stage) -> None:
    """What the teacher rules out, before anything is written."""
    resolution = teacher_resolution(teacher)
    if args.resolution is not None and args.resolution != resolution:
        raise InputError(f"--resolution {args.resolution} does not match the teacher, which samples {resolution} x "
                         f"{resolution} images. Leave --resolution out or set it to {resolution}.")
    args.resolution = resolution
    if args.use_lora and isinstance(teacher, PixelSampler):
        raise InputError("--use_lora needs a latent teacher (a LoRA adapter loads onto an UnconditionalLatentPipeline); "
                         "distil a pixel-space teacher without --use_lora.")
    if args.use_lora and holds_lora_adapter(args.pretrained_model_name_or_path):
        raise InputError(f"The teacher {args.pretrained_model_name_or_path} is itself a LoRA adapter, and a student "
                         "adapter could not name the model it belongs on. Distil it without --use_lora (the student "
                         "is then the whole UNet with the teacher's adapter folded in).")
    first_stage_config = FirstStageConfig(vae_name_or_path="none" if isinstance(teacher, PixelSampler) else
                                          args.pretrained_model_name_or_path, cache_latents=args.cache_latents)
    first_stage.check_config(first_stage_config)


@exit_cleanly_on_input_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    # Everything that can be wrong with the input is checked before anything is written.
    teacher = load_teacher(args.pretrained_model_name_or_path, args.revision, args.variant)
    first_stage = saved_model_first_stage(teacher, args.pretrained_model_name_or_path, args.revision)
    check_teacher_fits(args, teacher, first_stage)
    consistency = cli.config_from(ConsistencyConfig, args)
    check_consistency_config(consistency, teacher.scheduler.config.num_train_timesteps)
    scheduler = student_scheduler(teacher.scheduler.config, consistency)
    check_student_steps(scheduler, max(args.student_inference_steps), "--student_inference_steps",
                        remedy=f"Ask for at most {args.num_ddim_timesteps} steps, or distil on a finer grid "
                               f"(--num_ddim_timesteps {max(args.student_inference_steps)} or more).")
    guidance = None
    if args.guide:
        guidance = Guidance(load_guide(args.guide, teacher, args.pretrained_model_name_or_path), args.guidance_scale,
                            tuple(args.guidance_interval) if args.guidance_interval else None)
    config = cli.training_config(args)
    data_config = cli.config_from(DataConfig, args, center_crop=cli.center_crop_of(args, warn=True))
    validation_config = cli.config_from(ValidationConfig, args)
    fid_config = cli.config_from(FidConfig, args)
    fid_extractor = load_feature_extractor(fid_config) if fid_config.enabled else None
    accelerator = start_run(config)
    hub = HubUploader.from_config(cli.hub_config(args), accelerator.is_main_process)

    teacher.to(accelerator.device)
    if guidance is not None:
        guidance.guide.to(accelerator.device)
    teacher_model = guided_teacher(teacher, guidance)
    student = frozen_copy(teacher.unet).requires_grad_(True).train()
    lora_config = checkpoint_model_hooks = None
    if args.use_lora:
        lora_config = add_lora_adapter(student, args.rank, args.lora_alpha, lora_target_modules(args.lora_target_modules),
                                       args.lora_dropout)
        checkpoint_model_hooks = adapter_only_checkpoint_hooks(accelerator)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    target = frozen_copy(student)
    trainable = [p for p in student.parameters() if p.requires_grad]
    logger.info("Teacher %s (%s, %s%s); student: %.3fM of %.1fM parameters trained; %d-point solver grid",
                args.pretrained_model_name_or_path, first_stage.describe(), teacher.scheduler.config.prediction_type,
                f", guided by {args.guide} at w {args.guidance_scale:g}" if guidance else "",
                sum(p.numel() for p in trainable) / 1e6, count_parameters(student) / 1e6, args.num_ddim_timesteps)

    train_set, files = first_stage.training_set(data_config, accelerator, cli.cache_config(args))
    logger.info("Training images: %d", len(train_set))
    noise = fixed_validation_noise(validation_config.num_validation_images, first_stage.sample_shape(args.resolution),
                                   args.seed, accelerator.device)
    fid_scorer = None
    if fid_config.enabled:
        reference = build_reference(fid_config, training_images(data_config, train_set, files), args.resolution,
                                    data_config.center_crop, args.seed)
        fid_scorer = build_fid_scorer(fid_config, fid_extractor, reference, accelerator, args.output_dir,
                                      args.student_inference_steps[0], args.seed)

    def student_pipeline(model):
        return first_stage.pipeline(model, type(scheduler).from_config(scheduler.config))

    def validate(step: int) -> ValidationResult | None:
        """The student's grids and FID at each --student_inference_steps; at step 0 also the teacher's grid (its
        own sampler at --validation_inference_steps), the quality the student aims at."""
        metrics = {}
        for steps in args.student_inference_steps if fid_scorer is not None else ():
            values = replace(fid_scorer, num_inference_steps=steps).score_training_model(loop, student_pipeline)
            metrics.update({f"{name}_{steps}step": value for name, value in (values or {}).items()})
        if not accelerator.is_main_process:
            return None
        grids = {}
        if validation_config.num_validation_images:
            for steps in args.student_inference_steps:
                _, grids[f"student_{steps}step"] = sample_from_noise(loop, student_pipeline, noise, steps)
            if step == 0:
                _, grids["teacher"] = samples_from_noise(guidance.apply(teacher) if guidance else teacher, noise,
                                                         validation_config.validation_inference_steps)
        if metrics:
            logger.info("Step %d: %s", step, ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()))
        return ValidationResult(images=grids, metrics=metrics)

    def save_result(model) -> None:
        if not accelerator.is_main_process:
            return
        if lora_config is not None:
            source = args.pretrained_model_name_or_path
            save_folder_atomically(
                lambda folder: save_student_adapter(model, folder, os.path.abspath(source) if os.path.isdir(source)
                                                    else source, scheduler),
                args.output_dir, "the student's LoRA adapter", remedy=partial(final_save_remedy, args.output_dir))
        else:
            first_stage.save(model, scheduler, args.output_dir)
        write_student_card(args, config.arguments, loop, first_stage, teacher, lora_config is not None,
                           hub.location if hub.enabled else None)
        logger.info("Saved the student of step %d to %s", loop.global_step, args.output_dir)
        if not loop.finished:
            hub.upload_in_background(f"Step {loop.global_step}")

    keep_best = f"fid_{args.student_inference_steps[0]}step" if args.keep_best_checkpoint else None
    loop = build_training_loop(accelerator, config, student, train_set, "distill", parameters=trainable,
                               validation=Validation(validate, Schedule(every_steps=validation_config.validation_steps,
                                                                        every_epochs=args.save_images_epochs),
                                                     at_start=True, keep_best=keep_best),
                               save_result=save_result, checkpoint_model_hooks=checkpoint_model_hooks)
    student = loop.model
    target.to(accelerator.device)
    consistency_loss = ConsistencyLoss(teacher_model, target, teacher.scheduler, consistency, accelerator.device,
                                       accelerator.autocast)

    def compute_loss(batch, generator):
        sync_target(loop.ema, target)
        clean = first_stage.targets(batch, generator, args.random_flip)
        return consistency_loss(student, clean, generator)

    finished = loop.run(compute_loss)
    finish_run(loop)
    if finished:
        hub.upload_and_wait()


STUDENT_USAGE = """\
```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{location}", trust_remote_code=True)
images = pipe(batch_size=4, num_inference_steps={steps}).images  # 1 to {most} steps; its scheduler is LCMScheduler
```

`sample.py {location} --num_inference_steps {steps}` samples it too (its saved LCMScheduler by default).
"""

PIXEL_STUDENT_USAGE = """\
```python
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{location}")  # its scheduler is LCMScheduler
images = pipe(batch_size=4, num_inference_steps={steps}).images
```
"""

LORA_STUDENT_USAGE = """\
This folder holds a LoRA adapter that makes `{teacher}` a few-step model, and the scheduler it samples with
(scheduler/, an LCMScheduler). Inside this toolkit's repository `sample.py {location} --num_inference_steps {steps}`
loads the teacher, the adapter and the scheduler; with diffusers alone (peft needed):

```python
from diffusers import DiffusionPipeline, LCMScheduler

pipe = DiffusionPipeline.from_pretrained("{teacher}", trust_remote_code=True)
pipe.load_lora_weights("{location}")
pipe.scheduler = LCMScheduler.from_pretrained("{location}", subfolder="scheduler")
images = pipe(batch_size=4, num_inference_steps={steps}).images
```
"""


def write_student_card(args, arguments: dict, loop, first_stage, teacher, lora: bool, location: str | None) -> None:
    steps = args.student_inference_steps
    facts = {"teacher": args.pretrained_model_name_or_path,
             "teacher's sampler": f"{type(teacher.scheduler).__name__} ({teacher.scheduler.config.prediction_type})",
             "guided teacher": (f"{args.guide}, weight {args.guidance_scale:g}" + (
                 f", noise levels {tuple(args.guidance_interval)}" if args.guidance_interval else "")) if args.guide
             else "no",
             "solver grid": f"{args.num_ddim_timesteps} DDIM steps (skip {teacher.scheduler.config.num_train_timesteps // args.num_ddim_timesteps})",
             "loss": f"pseudo-Huber, c = {args.huber_c:g}" if args.loss_type == "huber" else "l2",
             "distillation steps": loop.global_step, "images seen": loop.state.samples_seen,
             "trained": f"LoRA rank {args.rank} ({args.lora_target_modules})" if lora else "whole UNet"}
    metrics = loop.last_validation.metrics
    for count in steps:
        if f"fid_{count}step" in metrics:
            facts[f"FID / KID at {count} step{'s' if count > 1 else ''} (step {loop.last_validation.step}, "
                  f"{args.validation_fid_images} samples, {args.fid_feature_extractor})"] = (
                f"{metrics[f'fid_{count}step']:.3f} / {metrics[f'kid_{count}step']:.5f}")
    template = LORA_STUDENT_USAGE if lora else PIXEL_STUDENT_USAGE if isinstance(teacher, PixelSampler) else STUDENT_USAGE
    name = location or os.path.basename(os.path.normpath(args.output_dir))
    usage = template.format(location=name, teacher=args.pretrained_model_name_or_path, steps=max(steps),
                            most=args.num_ddim_timesteps)
    grids = loop.last_validation.grids
    images = {f"Samples at {count} step{'s' if count > 1 else ''}": grids.get(f"student_{count}step") for count in steps}
    teacher_grid = os.path.join(args.output_dir, "samples", "teacher_0000000.png")
    images["The teacher (its own sampler, same noise)"] = teacher_grid if os.path.isfile(teacher_grid) else None
    images["Loss"] = os.path.join(args.output_dir, "loss_curve.png")
    write_model_card(
        args.output_dir,
        title="Few-step student (consistency distillation)",
        summary=(f"A distilled student of `{args.pretrained_model_name_or_path}` that samples in 1-{max(steps)} steps "
                 f"with LCMScheduler (consistency distillation with distill.py, {loop.global_step} steps)."),
        arguments=arguments, images=images, facts=facts, usage=usage,
        tags=["consistency-distillation", "lcm", *(["lora"] if lora else [])],
        base_model=args.pretrained_model_name_or_path, license=args.license, location=location,
        base_tags=first_stage.card(args.output_dir).base_tags,
    )


if __name__ == "__main__":
    main()
