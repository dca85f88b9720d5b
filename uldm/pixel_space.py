"""Pixel space: training and sampling with no first stage (`--vae_name_or_path none`).

The same trainer then fits a plain DDPM on 3 x R x R images in [-1, 1], the origin report's starting
point before it moved to latents (diffusers' `train_unconditional.py`). Its result is a diffusers
`DDPMPipeline` (unet/ + scheduler/), which `DDPMPipeline.from_pretrained` loads anywhere. `PixelSampler`
samples such a model with any of the project's schedulers, from given noise or from per-image generators,
with the call of `UnconditionalLatentPipeline` (so validation and sample.py treat both alike): diffusers'
`DDPMPipeline.__call__` takes neither noise nor eta and skips `scale_model_input` (Euler needs it).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch

from pipeline_latent_uncond import check_guide, denoise, guided_model, scheduler_step_kwargs

from .errors import InputError

NO_FIRST_STAGE = "none"  # the --vae_name_or_path value that selects pixel space
PIXEL_PIPELINE_CLASS = "DDPMPipeline"
PIXEL_PRESET = "tiny-pixel"  # 32 px, for the demo data and CPUs
# diffusers' train_unconditional.py builds this UNet (at its default --resolution 64): the origin report's pixel model.
DIFFUSERS_PIXEL_PRESET = "ddpm-pixel64"


PIXEL_USAGE = """\
```python
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{location}")
images = pipe(batch_size=4, num_inference_steps=25).images
```

`sample.py` samples it like the latent pipelines (any `--scheduler`; image i from seed + i).
"""


def is_pixel_space(vae_name_or_path: str | None) -> bool:
    return str(vae_name_or_path).strip().lower() == NO_FIRST_STAGE


def check_unet_takes_pixels(unet, resolution: int) -> None:
    """Refuse a UNet that does not map 3 x R x R images to 3 x R x R (e.g. a latent preset)."""
    config = unet.config
    sample_size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    if (config.in_channels, config.out_channels, sample_size) == (3, 3, resolution):
        return
    raise InputError(
        f"--vae_name_or_path none trains in pixel space, so the UNet must take and give 3 x {resolution} x "
        f"{resolution} images, but this one takes {config.in_channels} x {sample_size} x {sample_size} inputs "
        f"and gives {config.out_channels} channels (a latent-space preset?). Use --model_config_name_or_path "
        f"{PIXEL_PRESET} (32 px) or {DIFFUSERS_PIXEL_PRESET} (diffusers' train_unconditional.py UNet, 64 px), "
        "or a config with in_channels = out_channels = 3 and sample_size = --resolution."
    )


def pixels_from_batch(batch: dict, generator: torch.Generator, random_flip: bool) -> torch.Tensor:
    """The batch's images in [-1, 1], mirrored at random (drawn from `generator`) with `random_flip`."""
    from .latents import random_horizontal_flip

    pixels = batch["pixel_values"]
    return random_horizontal_flip(pixels, generator) if random_flip else pixels


def save_pixel_pipeline(unet, scheduler, output_dir: str | os.PathLike) -> None:
    """A diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/), put in place only once whole."""
    from diffusers import DDPMPipeline

    from .checkpoints import final_save_remedy
    from .saving import save_pretrained_atomically

    save_pretrained_atomically(DDPMPipeline(unet=unet, scheduler=scheduler), output_dir, "the trained pipeline",
                               remedy=partial(final_save_remedy, output_dir))


def pixel_pipeline_usage(output_dir: str | os.PathLike) -> str:
    """The model card's usage section of a saved DDPMPipeline."""
    return PIXEL_USAGE.format(location=Path(output_dir).name)


def pipeline_class_name(name_or_path: str | os.PathLike) -> str | None:
    """The `_class_name` of a pipeline folder's (or hub repository's) model_index.json; None if it has none."""
    source = str(name_or_path)
    if os.path.isdir(source):
        index = Path(source) / "model_index.json"
        model_index = json.loads(index.read_text()) if index.is_file() else {}
    else:
        from diffusers import DiffusionPipeline

        try:
            model_index = dict(DiffusionPipeline.load_config(source))
        except (OSError, ValueError):
            return None  # the latent loader explains what is wrong with the source
    name = model_index.get("_class_name")
    return name[-1] if isinstance(name, (list, tuple)) else name


def is_pixel_pipeline(name_or_path: str | os.PathLike) -> bool:
    return pipeline_class_name(name_or_path) == PIXEL_PIPELINE_CLASS


class PixelSampler:
    """Samples a pixel-space UNet with any diffusers scheduler; called like `UnconditionalLatentPipeline`
    (`latents=` is the starting noise, `output_type="latent"` returns the final pixels in [-1, 1] and
    `decode_latents` only maps them to [0, 1]: there is nothing to decode)."""

    def __init__(self, unet, scheduler):
        self.unet = unet
        self.scheduler = scheduler
        self._progress_bar = {"disable": True}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **options) -> "PixelSampler":
        from diffusers import DDPMPipeline

        pipeline = DDPMPipeline.from_pretrained(name_or_path, **options)
        return cls(pipeline.unet, pipeline.scheduler)

    def to(self, device) -> "PixelSampler":
        self.unet.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def set_progress_bar_config(self, **options) -> None:
        self._progress_bar = options

    def image_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, height, width)

    @staticmethod
    def decode_latents(pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> float32 images (N, 3, H, W) in [0, 1]."""
        return (pixels.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 50, generator=None, eta: float = 0.0,
                 latents: torch.Tensor | None = None, output_type: str = "pil", guide=None,
                 guidance_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None):
        from diffusers import DiffusionPipeline, ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor
        from tqdm.auto import tqdm

        device, dtype = self.unet.device, self.unet.dtype
        if latents is None:
            latents = randn_tensor(self.image_shape(batch_size), generator=generator, device=device, dtype=dtype)
        # The pipeline's order: timesteps first, as init_noise_sigma of Euler-type schedulers depends on them.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        noise = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        with tqdm(total=len(self.scheduler.timesteps), **self._progress_bar) as progress:

            def count_step(step_index, t, sample) -> None:
                progress.update()

            check_guide(self.unet, guide)
            model = guided_model(self.unet, guide, guidance_scale, guidance_interval, self.scheduler)
            sample = denoise(model, self.scheduler, noise, scheduler_step_kwargs(self.scheduler, generator, eta),
                             on_step=count_step)
        if output_type == "latent":
            return ImagePipelineOutput(images=sample)
        images = self.decode_latents(sample)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = DiffusionPipeline.numpy_to_pil(images)
        return ImagePipelineOutput(images=images)
