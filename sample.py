"""Draw images from a saved unconditional latent diffusion pipeline into a folder.

    python sample.py PIPELINE --num_images 50000 --output_dir samples/ffhq --scheduler ddim \
        --num_inference_steps 200 --batch_size 64 --save_npz
    accelerate launch sample.py PIPELINE ...                                  # several GPUs
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 sample.py PIPELINE ...   # several CPU processes

With --guide GUIDE --guidance_scale W each step takes guide + W * (model - guide) (docs/sampling.md,
"Guidance"): GUIDE is a pipeline folder or hub id, a checkpoint-N folder of the same run, or 'base' for a
DreamBooth result. A pipeline saved with a guide samples guided by default; --guidance_scale alone reweights it.

PIPELINE is a folder written by UnconditionalLatentPipeline.save_pretrained (or CompVis' LDM layout),
a DreamBooth LoRA output (its base model is loaded with the adapter), a few-step student of distill.py
(sampled with its LCMScheduler, 4 steps unless --num_inference_steps), a diffusers DDPMPipeline (pixel
space, e.g. from train_unconditional_latent.py --vae_name_or_path none), or a hub id of one of them; it
is loaded without running code from the folder. Images are `{i:06d}.png`; image i
is drawn with seed + i, so it is the same however many processes or whatever batch size produced
it. A run that stops can be started again with the same arguments: it makes only the missing images.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from accelerate import Accelerator
from PIL import Image

from uldm import args as cli
from uldm.distillation import check_student_steps, max_student_steps
from uldm.errors import InputError, exit_cleanly_on_input_errors
from uldm.first_stage import load_saved_model
from uldm.guidance import load_guide
from uldm.sampling import (
    SCHEDULER_NAMES,
    make_image_grid,
    make_scheduler,
    sample_file_name,
    save_image_atomically,
    SAMPLE_ARGS_FILE,
    SAMPLE_GRID_FILE,
    SAMPLE_NPZ_FILE,
    save_samples_npz,
    write_missing_samples,
)

DEFAULT_STEPS = 50
STUDENT_DEFAULT_STEPS = 4

# Arguments that change the pixels: a resumed run must use the same ones.
IMAGE_DEFINING_ARGS = ("pretrained_model_name_or_path", "scheduler", "num_inference_steps", "eta", "seed",
                       "mixed_precision", "guide", "guidance_scale", "guidance_interval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pretrained_model_name_or_path", metavar="PIPELINE",
                        help="Saved pipeline folder or hub id.")
    parser.add_argument("--num_images", type=int, required=True, help="How many images the folder should hold.")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                        help="Sampler, built from the saved scheduler's config; default: the saved scheduler.")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help=f"Sampler steps; default {DEFAULT_STEPS} ({STUDENT_DEFAULT_STEPS} for a few-step student of "
                             "distill.py, or its grid's size if smaller: a student takes 1 to its grid's size).")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (ignored by other schedulers).")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per forward pass on each process.")
    parser.add_argument("--seed", type=int, default=0, help="Image i is drawn with seed + i.")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                        help="Autocast compute; latents stay fp32. Default: accelerate's configuration (else 'no').")
    parser.add_argument("--save_npz", action="store_true",
                        help=f"Also write {SAMPLE_NPZ_FILE} (uint8 N×H×W×3, key arr_0, in index order).")
    parser.add_argument("--save_grid", action="store_true", help=f"Also write {SAMPLE_GRID_FILE} of the first images.")
    parser.add_argument("--grid_rows", type=int, default=4, help="Rows (and columns) of the grid.")
    cli.add_guidance_args(parser.add_argument_group("guidance"))
    args = parser.parse_args(argv)
    for name in ("pretrained_model_name_or_path", "guide"):  # so a resumed run may name a folder differently
        if getattr(args, name) and os.path.isdir(getattr(args, name)):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    cli.check_guidance_args(args)
    for name in ("num_images", "num_inference_steps", "batch_size", "grid_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    return args


def check_resume_is_consistent(args: argparse.Namespace, output_dir: Path) -> None:
    """Refuse to mix images made with other settings into one folder."""
    args_path = output_dir / SAMPLE_ARGS_FILE
    if not args_path.is_file():
        return
    previous = json.loads(args_path.read_text())
    changed = {name: (previous.get(name), getattr(args, name)) for name in IMAGE_DEFINING_ARGS
               if previous.get(name) != getattr(args, name)}
    if changed:
        details = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changed.items())
        raise InputError(
            f"{output_dir} holds images made with other settings ({details}). Use another --output_dir, "
            f"or the earlier settings to resume (see {args_path})."
        )


def write_args(args: argparse.Namespace, output_dir: Path) -> None:
    temporary = output_dir / f".{SAMPLE_ARGS_FILE}.tmp"
    temporary.write_text(json.dumps(vars(args), indent=2, sort_keys=True) + "\n")
    os.replace(temporary, output_dir / SAMPLE_ARGS_FILE)


def load_pipeline(args: argparse.Namespace, accelerator: Accelerator):
    """The sampler of the saved model's own space (uldm.first_stage.load_saved_model)."""
    with accelerator.main_process_first():  # one download into the hub cache, then everyone reads it
        pipeline = load_saved_model(args.pretrained_model_name_or_path)
        if args.scheduler is not None:
            pipeline.scheduler = make_scheduler(args.scheduler, pipeline.scheduler.config)
        set_guidance(args, pipeline)
    pipeline.set_progress_bar_config(disable=True)  # sample.py shows one bar over images instead
    return pipeline.to(accelerator.device)


def resolve_steps(args: argparse.Namespace, scheduler) -> None:
    """--num_inference_steps left out: a few-step student's default (at most its grid's size), else the usual; a
    student asked for more steps than its grid has is refused before anything is written."""
    if args.num_inference_steps is None:
        most = max_student_steps(scheduler)
        args.num_inference_steps = min(STUDENT_DEFAULT_STEPS, most) if most else DEFAULT_STEPS
    check_student_steps(scheduler, args.num_inference_steps)


def set_guidance(args: argparse.Namespace, pipeline) -> None:
    """--guide (checked to fit before anything is sampled), or the saved guide with another weight or interval."""
    if args.guide:
        guide = load_guide(args.guide, pipeline, source=args.pretrained_model_name_or_path)
        pipeline.set_guidance(guide, args.guidance_scale, args.guidance_interval)
    elif args.guidance_scale is not None or args.guidance_interval is not None:
        saved = getattr(pipeline, "guide", None)
        if saved is None:
            raise InputError(f"{args.pretrained_model_name_or_path} carries no guide to reweight: give --guide GUIDE "
                             "with --guidance_scale.")
        scale = pipeline.config.guidance_scale if args.guidance_scale is None else args.guidance_scale
        pipeline.set_guidance(saved, scale, args.guidance_interval or pipeline.default_guidance_interval)


def write_grid(output_dir: Path, num_images: int, rows: int) -> None:
    count = min(num_images, rows * rows)
    images = []
    for index in range(count):
        with Image.open(output_dir / sample_file_name(index)) as image:
            images.append(image.convert("RGB"))
    save_image_atomically(make_image_grid(images, rows), output_dir / SAMPLE_GRID_FILE)


@exit_cleanly_on_input_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    args.mixed_precision = accelerator.mixed_precision
    output_dir = Path(args.output_dir)
    pipeline = load_pipeline(args, accelerator)
    resolve_steps(args, pipeline.scheduler)
    check_resume_is_consistent(args, output_dir)  # on every process, so all of them stop together
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()  # everyone has read the old arguments before they are replaced
    if accelerator.is_main_process:
        write_args(args, output_dir)

    write_missing_samples(
        pipeline, output_dir, args.num_images, accelerator, seed=args.seed, batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps, eta=args.eta,
    )

    if accelerator.is_main_process:
        if args.save_npz:
            save_samples_npz(output_dir, args.num_images, output_dir / SAMPLE_NPZ_FILE)
        if args.save_grid:
            write_grid(output_dir, args.num_images, args.grid_rows)
        accelerator.print(f"{args.num_images} images in {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
