"""Sample grids during training, written as PNG and to the trackers, from fixed noise."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .sampling import make_image_grid

logger = logging.getLogger(__name__)


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
                   tag: str = "validation") -> Path:
    """Write `samples/<tag>_<step>.png` and send the images to TensorBoard / wandb (main process)."""
    folder = Path(output_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}_{step:07d}.png"
    image_grid(images).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.clip(images, 0, 1), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image) for image in images]}, step=step)
    logger.info("Wrote %s", path)
    return path
