"""The first stage: the space the diffusion model works in, behind one small interface.

* `LatentSpace`: a VAE and its `LatentScaling`; the UNet denoises scaled latents and the result is an
  `UnconditionalLatentPipeline` folder (unet/, vae/, scheduler/).
* `PixelSpace`: no first stage (`--vae_name_or_path none`): a plain DDPM on 3 x R x R images in [-1, 1], the
  origin report's starting point (diffusers' `train_unconditional.py`). Its result is a diffusers
  `DDPMPipeline` (unet/ + scheduler/), which `DDPMPipeline.from_pretrained` loads anywhere; `PixelSampler`
  samples it with any of the project's schedulers, with the call of `UnconditionalLatentPipeline`.

A trainer picks the implementation once (`first_stage_class`, `load_first_stage`) and calls it for everything
that differs between the spaces; `load_saved_model` loads whatever a run saved, ready to sample.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from pipeline_latent_uncond import check_guide, denoise, guided_model, scheduler_step_kwargs

from .data import DataConfig, TrainingSet, prepare_training_set
from .errors import InputError
from .latents import LatentScaling, latents_from_batch, measure_latent_std, random_horizontal_flip, resolve_latent_scaling
from .model_card import BASE_TAGS
from .sampling import build_pipeline, save_pipeline, save_trained_pipeline
from .vae import check_unet_matches_latents, describe_vae, latent_shape, load_vae, vae_dtype_for, vae_fingerprint

logger = logging.getLogger(__name__)

NO_FIRST_STAGE = "none"  # the --vae_name_or_path value that selects pixel space
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


@dataclass(frozen=True)
class FirstStageConfig:
    vae_name_or_path: str
    vae_subfolder: str | None = None
    revision: str | None = None
    variant: str | None = None
    latent_scaling_factor: str = "auto"
    scale_estimation_images: int = 512  # images encoded to measure the latent std (without a cache)
    encode_batch_size: int = 32
    cache_latents: bool = False


@dataclass(frozen=True)
class CardFacts:
    """What the model card of a saved model says about its space."""
    title: str
    space: str  # what the UNet was trained on, for the card's summary
    facts: dict = field(default_factory=dict)
    usage: str | None = None  # None: the card's standard "load this pipeline" section
    base_tags: tuple[str, ...] = ()


class FirstStage(ABC):
    """The space a diffusion model is trained and sampled in. Built by `load` once the accelerator exists;
    `fit` runs once on the training set before the first batch is turned into targets."""

    pipeline_class: ClassVar[str]  # the `_class_name` of the folders `save` writes
    default_unet_preset: ClassVar[str]
    clip_sample: ClassVar[bool]  # whether DDPM/DDIM sampling may clip its x0 estimate to [-1, 1]

    @classmethod
    @abstractmethod
    def selected_by(cls, vae_name_or_path: str | None) -> bool:
        """Whether --vae_name_or_path asks for this space."""

    @classmethod
    def check_config(cls, config: FirstStageConfig) -> None:
        """Refuse options that mean nothing here, before anything is written."""

    @classmethod
    @abstractmethod
    def load(cls, config: FirstStageConfig, accelerator, vae_precision: str) -> "FirstStage":
        ...

    @classmethod
    @abstractmethod
    def load_saved(cls, name_or_path: str | os.PathLike, **options):
        """A model this space saved, ready to sample (`options` go to from_pretrained)."""

    @abstractmethod
    def check_unet(self, unet, resolution: int) -> None:
        """Refuse a UNet that does not take and give this space's samples at `resolution`."""

    @abstractmethod
    def describe(self) -> str:
        ...

    @abstractmethod
    def training_set(self, data_config: DataConfig, accelerator, cache_config) -> TrainingSet:
        ...

    def fit(self, train_set, accelerator, seed: int) -> None:
        """Settle what depends on the data (e.g. the latent scale)."""

    def log_to_trackers(self, accelerator) -> None:
        """Record this space's settings with the run's trackers (once they are started)."""

    @abstractmethod
    def targets(self, batch: dict, generator: torch.Generator, random_flip: bool) -> torch.Tensor:
        """The clean samples the UNet learns to denoise, from a training batch; flips drawn from `generator`."""

    @abstractmethod
    def sample_shape(self, resolution: int) -> tuple[int, int, int]:
        ...

    @abstractmethod
    def pipeline(self, unet, scheduler):
        """A sampler of `unet`, called like `UnconditionalLatentPipeline`."""

    @abstractmethod
    def save(self, unet, scheduler, output_dir: str | os.PathLike) -> None:
        ...

    @abstractmethod
    def card(self, output_dir: str | os.PathLike) -> CardFacts:
        ...


class LatentSpace(FirstStage):
    pipeline_class = "UnconditionalLatentPipeline"
    default_unet_preset = "seed-ffhq256-sdvae"
    clip_sample = False  # latents are not bounded

    def __init__(self, config: FirstStageConfig, vae):
        self.config = config
        self.vae = vae
        self.scaling: LatentScaling | None = None  # set by `fit`

    @classmethod
    def selected_by(cls, vae_name_or_path: str | None) -> bool:
        return True  # any VAE (load_vae explains what is wrong with one); last in FIRST_STAGES

    @classmethod
    def load(cls, config: FirstStageConfig, accelerator, vae_precision: str) -> "LatentSpace":
        vae = load_vae(config.vae_name_or_path, config.vae_subfolder, config.revision,
                       torch_dtype=vae_dtype_for(accelerator.mixed_precision, vae_precision, config.cache_latents),
                       variant=config.variant)
        return cls(config, vae.to(accelerator.device))

    @classmethod
    def load_saved(cls, name_or_path: str | os.PathLike, **options):
        from .lora import load_pipeline_or_adapter

        return load_pipeline_or_adapter(name_or_path, **options)

    def check_unet(self, unet, resolution: int) -> None:
        check_unet_matches_latents(unet, self.vae, resolution)

    def describe(self) -> str:
        return describe_vae(self.vae)

    def training_set(self, data_config: DataConfig, accelerator, cache_config) -> TrainingSet:
        config = self.config
        key = None if cache_config is None else vae_fingerprint(self.vae, config.vae_name_or_path,
                                                                config.vae_subfolder, config.revision)
        return prepare_training_set(data_config, accelerator, cache_config, self.vae, key,
                                    description={"vae": config.vae_name_or_path, "resolution": data_config.resolution})

    def fit(self, train_set, accelerator, seed: int) -> None:
        config = self.config
        self.scaling = resolve_latent_scaling(
            config.latent_scaling_factor, self.vae,
            measure_std=lambda: measure_latent_std(train_set, self.vae, accelerator, config.scale_estimation_images,
                                                   config.encode_batch_size, seed),
        )
        logger.info("Latent scale %.6f, shift %.4f (%s)", self.scaling.scale, self.scaling.shift, self.scaling.source)

    def log_to_trackers(self, accelerator) -> None:
        accelerator.log({"latent_scaling_factor": self.scaling.scale}, step=0)

    def targets(self, batch: dict, generator: torch.Generator, random_flip: bool) -> torch.Tensor:
        return latents_from_batch(batch, self.vae, self.scaling, generator, random_flip)

    def sample_shape(self, resolution: int) -> tuple[int, int, int]:
        return latent_shape(self.vae, resolution)

    def pipeline(self, unet, scheduler):
        return build_pipeline(unet, self.vae, self.scaling, scheduler=scheduler)

    def save(self, unet, scheduler, output_dir: str | os.PathLike) -> None:
        save_pipeline(unet, self.vae, self.scaling, scheduler, output_dir)

    def card(self, output_dir: str | os.PathLike) -> CardFacts:
        return CardFacts(
            title="Unconditional latent diffusion model", space=f"the latents of {self.describe()}",
            facts={"latent scale": f"{self.scaling.scale:.6f} ({self.scaling.source})",
                   "latent shift": self.scaling.shift},
            base_tags=BASE_TAGS,
        )


class PixelSpace(FirstStage):
    pipeline_class = "DDPMPipeline"
    default_unet_preset = PIXEL_PRESET
    clip_sample = True  # pixels are bounded to [-1, 1] (diffusers' default)

    @classmethod
    def selected_by(cls, vae_name_or_path: str | None) -> bool:
        return str(vae_name_or_path).strip().lower() == NO_FIRST_STAGE

    @classmethod
    def check_config(cls, config: FirstStageConfig) -> None:
        if config.cache_latents:
            raise InputError("--cache_latents stores a VAE's latents, and --vae_name_or_path none has no VAE: leave "
                             "--cache_latents out (the images are read as usual; --dataloader_num_workers hides "
                             "their decoding).")
        if config.latent_scaling_factor != "auto" or config.vae_subfolder:
            raise InputError("--vae_name_or_path none trains on pixels in [-1, 1], with no latents to scale or VAE "
                             "to find: leave out --latent_scaling_factor and --vae_subfolder.")

    @classmethod
    def load(cls, config: FirstStageConfig, accelerator, vae_precision: str) -> "PixelSpace":
        return cls()

    @classmethod
    def load_saved(cls, name_or_path: str | os.PathLike, **options) -> "PixelSampler":
        return PixelSampler.from_pretrained(name_or_path, **options)

    def check_unet(self, unet, resolution: int) -> None:
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

    def describe(self) -> str:
        return "no first stage (pixel space)"

    def training_set(self, data_config: DataConfig, accelerator, cache_config) -> TrainingSet:
        return prepare_training_set(data_config, accelerator)  # no cache: check_config refused --cache_latents

    def targets(self, batch: dict, generator: torch.Generator, random_flip: bool) -> torch.Tensor:
        pixels = batch["pixel_values"]
        return random_horizontal_flip(pixels, generator) if random_flip else pixels

    def sample_shape(self, resolution: int) -> tuple[int, int, int]:
        return 3, resolution, resolution

    def pipeline(self, unet, scheduler) -> "PixelSampler":
        return PixelSampler(unet, scheduler)

    def save(self, unet, scheduler, output_dir: str | os.PathLike) -> None:
        from diffusers import DDPMPipeline

        save_trained_pipeline(DDPMPipeline(unet=unet, scheduler=scheduler), output_dir)

    def card(self, output_dir: str | os.PathLike) -> CardFacts:
        return CardFacts(title="Unconditional pixel-space diffusion model", space="3-channel pixels",
                         usage=PIXEL_USAGE.format(location=Path(output_dir).name))


# LatentSpace last: it takes every --vae_name_or_path but "none", and every saved layout but a DDPMPipeline.
FIRST_STAGES: tuple[type[FirstStage], ...] = (PixelSpace, LatentSpace)


def first_stage_class(vae_name_or_path: str | None) -> type[FirstStage]:
    return next(kind for kind in FIRST_STAGES if kind.selected_by(vae_name_or_path))


def load_first_stage(config: FirstStageConfig, accelerator, vae_precision: str) -> FirstStage:
    """The first stage of a training run, on the accelerator's device (`vae_precision`: --vae_precision)."""
    return first_stage_class(config.vae_name_or_path).load(config, accelerator, vae_precision)


def load_saved_model(name_or_path: str | os.PathLike, **options):
    """Any model the trainers save, ready to sample, without running code from its folder: a latent pipeline
    (or CompVis' LDM layout), a LoRA adapter (its base model loaded with it) or a pixel-space DDPMPipeline, as
    the sampler of its space. `options` go to from_pretrained."""
    name = pipeline_class_name(name_or_path)
    kind = next((kind for kind in FIRST_STAGES if kind.pipeline_class == name), LatentSpace)
    return kind.load_saved(name_or_path, **options)


def saved_model_first_stage(model, name_or_path: str | os.PathLike, revision: str | None = None) -> FirstStage:
    """The first stage of a model `load_saved_model` loaded, to train on in its space (distill.py): its VAE with
    the latent scale it samples with (never re-measured), or pixel space."""
    from .latents import pipeline_scaling

    if isinstance(model, PixelSampler):
        return PixelSpace()
    source = str(name_or_path)
    subfolder = "vqvae" if (Path(source) / "vqvae").is_dir() else "vae"
    stage = LatentSpace(FirstStageConfig(vae_name_or_path=source, vae_subfolder=subfolder, revision=revision),
                        model.vae)
    stage.scaling = pipeline_scaling(model, source=f"the latent scale of {source}")
    return stage


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


class PixelSampler:
    """Samples a pixel-space UNet with any diffusers scheduler; called like `UnconditionalLatentPipeline`
    (`latents=` is the starting noise, `output_type="latent"` returns the final pixels in [-1, 1] and
    `decode_latents` only maps them to [0, 1]: there is nothing to decode). diffusers' `DDPMPipeline.__call__`
    takes neither noise nor eta and skips `scale_model_input` (Euler needs it)."""

    def __init__(self, unet, scheduler):
        self.unet = unet
        self.scheduler = scheduler
        self._progress_bar = {"disable": True}
        self.set_guidance(None)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **options) -> "PixelSampler":
        from diffusers import DDPMPipeline

        pipeline = DDPMPipeline.from_pretrained(name_or_path, **options)
        return cls(pipeline.unet, pipeline.scheduler)

    def set_guidance(self, guide, guidance_scale: float = 1.0,
                     guidance_interval: tuple[float, float] | None = None) -> None:
        """Make later calls guided by default, as `UnconditionalLatentPipeline.set_guidance` does (on this object
        only: a DDPMPipeline folder has no place for a guide)."""
        check_guide(self.unet, guide)
        self.guide = guide
        self.guidance_scale = float(guidance_scale) if guide is not None else 1.0
        self.guidance_interval = guidance_interval

    def to(self, device) -> "PixelSampler":
        self.unet.to(device)
        if isinstance(self.guide, torch.nn.Module):
            self.guide.to(device)
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
                 guidance_scale: float | None = None, guidance_interval: tuple[float, float] | None = None):
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

            guide = self.guide if guide is None else guide  # the defaults of set_guidance
            guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
            check_guide(self.unet, guide)
            model = guided_model(self.unet, guide, guidance_scale, guidance_interval or self.guidance_interval,
                                 self.scheduler)
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
