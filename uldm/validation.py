"""Validation during training: sample grids from fixed noise, written as PNG and to the trackers."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import save_image_atomically
from .sampling import make_image_grid
from .saving import is_write_failure, save_failure_message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationConfig:
    """What a validation samples (diffusers' argument names; 0 steps: only at the end)."""

    validation_steps: int = 1000
    num_validation_images: int = 16
    validation_inference_steps: int = 50
    validation_scheduler: str = "dpmsolver++"
    validation_guide: str | None = None  # uldm.guidance: the guide spec (None: unguided)
    validation_guidance_scale: float | None = None
    validation_guidance_interval: tuple[float, float] | None = None


def fixed_validation_noise(num_images: int, latent_shape: tuple[int, int, int], seed: int, device) -> torch.Tensor:
    """The same starting noise at every validation, so grids show how the model changes."""
    generator = torch.Generator().manual_seed(seed + 7919)
    return torch.randn((num_images, *latent_shape), generator=generator).to(device)


def image_grid(images: np.ndarray | list[Image.Image], columns: int | None = None) -> Image.Image:
    """A grid of images (NHWC float in [0, 1], or PIL), as square as possible."""
    if isinstance(images, np.ndarray):
        images = [Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)) for image in images]
    columns = columns or math.ceil(math.sqrt(len(images)))
    return make_image_grid(list(images), rows=math.ceil(len(images) / columns))


def log_image_grid(accelerator, images: np.ndarray, step: int, output_dir: str | os.PathLike,
                   tag: str = "validation") -> Path | None:
    """Write `samples/<tag>_<step>.png` and send the images to TensorBoard / wandb (main process).

    A grid is not needed to resume, so a full disk here warns and training goes on (None is returned);
    the next checkpoint stops the run with the full message if the disk stays full."""
    folder = Path(output_dir) / "samples"
    path = folder / f"{tag}_{step:07d}.png"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_image_atomically(image_grid(images), path)
    except Exception as error:
        if not is_write_failure(error):
            raise
        logger.warning(save_failure_message(
            f"the {tag} grid of step {step}", folder, error,
            kept="Training goes on without it (a grid is not needed to resume); the next checkpoint stops the "
                 "run, keeping the previous one, if the disk stays full.",
            remedy="Free some space there: the next grids are written once there is room."))
        path = None
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.clip(images, 0, 1), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image) for image in images]}, step=step)
    if path is not None:
        logger.info("Wrote %s", path)
    return path


@contextlib.contextmanager
def sampling_model(loop):
    """The model of a TrainingLoop as validation samples it: EMA weights swapped in, eval mode, autocast; the
    live weights and train mode come back after the block."""
    with loop.ema_weights() as model, loop.accelerator.autocast():
        model.eval()
        try:
            yield model
        finally:
            model.train()


@torch.no_grad()
def sample_from_noise(loop, make_pipeline, noise: torch.Tensor, num_inference_steps: int) -> tuple[torch.Tensor, np.ndarray]:
    """Samples of the model in training (`sampling_model`) from fixed `noise`: (final latents, images NHWC in
    [0, 1]). `make_pipeline(unet)` builds the sampling pipeline."""
    with sampling_model(loop) as model:
        return samples_from_noise(make_pipeline(model), noise, num_inference_steps)


@torch.no_grad()
def samples_from_noise(pipeline, noise: torch.Tensor, num_inference_steps: int, **options) -> tuple[torch.Tensor, np.ndarray]:
    """A pipeline's samples from `noise`: (final latents, images NHWC in [0, 1]); `options` go to the pipeline
    (e.g. guide, guidance_scale)."""
    latents = pipeline(batch_size=len(noise), latents=noise, num_inference_steps=num_inference_steps,
                       output_type="latent", **options).images
    return latents, pipeline.decode_latents(latents).permute(0, 2, 3, 1).float().cpu().numpy()
