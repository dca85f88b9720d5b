"""DreamBooth for unconditional latent models: base model, class images, paired batches, the split
loss and the subject/diversity measures (LoRA adapters: uldm.lora).

With no text prompt the only handle is the data. Fine-tuning on a few instance photos pulls the
whole distribution towards the subject; the prior-preservation loss on images sampled from the
base model ("class images") keeps its diversity. Each batch holds B instance and B class examples
and goes through the UNet in one forward pass; the per-sample losses (`uldm.diffusion.per_sample_loss`,
with every loss lever of the latent trainer) are split into the two halves, each half with its own
timesteps' weights (diffusers' train_dreambooth.py applies a B-sized Min-SNR weight to the 2B losses
and crashes, #5791, and never weights the prior half).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from pipeline_latent_uncond import UnconditionalLatentPipeline

from .diffusion import NO_LEVERS, LossConfig, per_sample_loss, schedule_levers, with_schedule_levers
from .metrics.distances import mean_pairwise_distance, nearest_distances
from .errors import InputError
from .images import list_image_files
from .pipeline_loading import load_pipeline
from .sampling import with_sampler, write_samples
from .vae import downsample_factor

logger = logging.getLogger(__name__)

GENERATED_CLASS_IMAGE = "generated_{index:06d}.png"


# --------------------------------------------------------------------------------------------
# The base model


def load_base_pipeline(name_or_path: str, revision: str | None = None,
                       torch_dtype: torch.dtype | None = None, variant: str | None = None) -> UnconditionalLatentPipeline:
    """The base pipeline (this project's or the CompVis LDM layout), loaded without running its code."""
    options = {"revision": revision} if revision else {}
    if variant:
        options["variant"] = variant
    if torch_dtype is not None:
        options["dtype"] = torch_dtype  # diffusers >= 0.40 name; torch_dtype is deprecated there
    try:
        pipeline = load_pipeline(name_or_path, **options)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(
            f"Could not load the base model '{name_or_path}': {error}\n"
            "--pretrained_model_name_or_path must be an unconditional latent pipeline: a folder written by "
            "train_unconditional_latent.py (model_index.json + unet/ vae/ scheduler/), a folder in the CompVis "
            "LDM layout (unet/ vqvae/ scheduler/), or the hub id of one."
        ) from error
    config = pipeline.unet.config
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise InputError(
            f"The base model '{name_or_path}' is class-conditional (its UNet has class embeddings); DreamBooth "
            "here needs an unconditional model."
        )
    return pipeline


def base_resolution(pipeline: UnconditionalLatentPipeline) -> int:
    """Image side the base model generates: the UNet's latent size times the VAE's downsampling."""
    return pipeline.latent_shape(1)[2] * downsample_factor(pipeline.vae)


def check_resolution(requested: int | None, pipeline: UnconditionalLatentPipeline) -> int:
    resolution = base_resolution(pipeline)
    if requested is not None and requested != resolution:
        raise InputError(
            f"--resolution {requested} does not match the base model, which works at {resolution}x{resolution} "
            f"(UNet sample_size {pipeline.unet.config.sample_size} x VAE downsampling "
            f"{downsample_factor(pipeline.vae)}). Leave --resolution out or set it to {resolution}."
        )
    return resolution


def fine_tuned_scheduler(pipeline: UnconditionalLatentPipeline, levers: LossConfig, use_lora: bool):
    """The base model's sampler on the levers' noise schedule: the fine-tune trains, validates and is saved with
    it. A LoRA adapter is loaded onto the base model and its scheduler, so it cannot carry a new schedule."""
    scheduler = with_schedule_levers(pipeline.scheduler, levers)
    if use_lora and scheduler is not pipeline.scheduler:
        changes = ", ".join(f"{key}={value}" for key, value in schedule_levers(levers).items())
        raise InputError(
            f"The levers change the base model's noise schedule ({changes}), which a LoRA adapter (--use_lora) "
            "cannot carry: it is loaded onto the base model, with the base's scheduler. Fine-tune the whole UNet "
            "(leave out --use_lora), or start from a base model trained with that schedule.")
    return scheduler


def training_noise_scheduler(scheduler):
    """A DDPMScheduler with `scheduler`'s noise schedule and prediction type (clip_sample off for latents)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config, clip_sample=False)


# --------------------------------------------------------------------------------------------
# Instance and class images


def list_instance_images(instance_data_dir: str | os.PathLike) -> list[Path]:
    folder = Path(instance_data_dir)
    if not folder.is_dir():
        raise InputError(f"--instance_data_dir {folder} is not a folder. Give the folder of the subject's photos.")
    paths = list_image_files(folder)
    if not paths:
        raise InputError(
            f"--instance_data_dir {folder} holds no images. Put 5-20 photos of the subject there (for faces, "
            "aligned with `python align_faces.py photos/ --output_dir DIR --output_size 256`)."
        )
    return paths


def check_class_image_sizes(class_data_dir: str | os.PathLike, resolution: int) -> list[Path]:
    """The class images present; all must be resolution x resolution (the base model's samples)."""
    paths = list_image_files(class_data_dir) if Path(class_data_dir).is_dir() else []
    wrong = []
    for path in paths:
        try:
            with Image.open(path) as image:
                size = image.size
        except Exception as error:  # unreadable: reported by the data set loader, not here
            logger.warning("Cannot read the class image %s (%s).", path, error)
            continue
        if size != (resolution, resolution):
            wrong.append(f"{path.name} ({size[0]}x{size[1]})")
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise InputError(
            f"--class_data_dir {class_data_dir} holds {len(wrong)} image(s) that are not {resolution}x{resolution}, "
            f"the base model's resolution: {shown}. Class images are samples of the base model (or real images "
            f"of the class) at its resolution; these may come from another model. Use another --class_data_dir "
            f"(missing images are generated there) or resize them to {resolution}x{resolution}. Nothing was deleted."
        )
    return paths


def instance_photos(paths: list[Path], folder: str | os.PathLike, resolution: int, limit: int = 64) -> torch.Tensor:
    """Up to `limit` of the (already checked) instance photos, centre-cropped, as N x 3 x R x R in [-1, 1]."""
    from .data import ImageFolderDataset, Preprocessing

    dataset = ImageFolderDataset(paths[:limit], Path(folder), Preprocessing(resolution, True))
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])


def class_image_indices_to_generate(existing: Sequence[Path], missing: int) -> list[int]:
    """The first `missing` indices whose generated file is not there yet (a cut-short run resumes)."""
    names = {path.name for path in existing}
    indices, index = [], 0
    while len(indices) < missing:
        if GENERATED_CLASS_IMAGE.format(index=index) not in names:
            indices.append(index)
        index += 1
    return indices


def generate_missing_class_images(pipeline: UnconditionalLatentPipeline, class_data_dir: str | os.PathLike,
                                  num_class_images: int, accelerator, *, seed: int, batch_size: int,
                                  num_inference_steps: int, scheduler_name: str, precision: str | None = None) -> int:
    """Fill `class_data_dir` up to `num_class_images` images with samples of the base model.

    Every process must call this. Images already there (generated earlier or put there by hand) are
    kept and counted; the missing ones are split over the processes, image k drawn from the generator
    seed + k, so the set does not depend on the number of processes or the batch size. Returns the
    number of images generated by all processes together; on return every process sees them all.
    `precision` (--prior_generation_precision): see uldm.sampling.sampling_autocast.
    """
    folder = Path(class_data_dir)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    existing = list_image_files(folder)
    missing = num_class_images - len(existing)
    # Everyone has listed the folder before anyone writes to it, so all agree on what is missing.
    accelerator.wait_for_everyone()
    if missing <= 0:
        logger.info("Using the %d class images in %s (none generated).", len(existing), folder)
        return 0

    indices = class_image_indices_to_generate(existing, missing)
    logger.info("Generating %d class images into %s (%d there already, %d steps of %s).",
                missing, folder, len(existing), num_inference_steps, scheduler_name)
    sampler = with_sampler(pipeline, scheduler_name)
    # Ends with the barrier diffusers lacks: nobody reads the folder before every process has written its share.
    write_samples(sampler, folder, indices, accelerator, file_name=lambda k: GENERATED_CLASS_IMAGE.format(index=k),
                  seed=seed, batch_size=batch_size, num_inference_steps=num_inference_steps,
                  description="Generating class images", precision=precision)
    return missing


class DreamBoothDataset(Dataset):
    """Item i: {"instance": instance item i mod N, "prior": class item i mod M (with prior preservation), "index"}.

    The length is max(N, M, min_length): every class image is seen once per epoch, the few instance
    images many times, and at least one full batch exists even with fewer photos than the batch size.
    """

    def __init__(self, instance: Dataset, prior: Dataset | None = None, min_length: int = 0):
        if len(instance) == 0 or (prior is not None and len(prior) == 0):
            raise InputError("DreamBooth needs at least one instance image (and one class image with prior preservation).")
        self.instance = instance
        self.prior = prior
        self.length = max(len(instance), len(prior) if prior is not None else 0, min_length)
        self._epoch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        # Random crops of the image data sets depend on the epoch.
        self._epoch = value
        for part in (self.instance, self.prior):
            if part is not None and hasattr(part, "epoch"):
                part.epoch = value

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        item = {"instance": self.instance[index % len(self.instance)], "index": index}
        if self.prior is not None:
            item["prior"] = self.prior[index % len(self.prior)]
        return item


# --------------------------------------------------------------------------------------------
# The loss


@dataclass
class DreamBoothLoss:
    """instance_loss + prior_loss_weight * prior_loss over a batch whose first `num_instance` rows are
    instance examples and the rest class examples; the levers' loss weights (if any) are per sample, so
    each half is weighted by its own timesteps."""

    noise_scheduler: object
    prior_loss_weight: float = 1.0
    levers: LossConfig = NO_LEVERS

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 num_instance: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = per_sample_loss(prediction, target, timesteps, self.noise_scheduler, self.levers)
        instance_loss = losses[:num_instance].mean()
        if num_instance == len(losses):
            return instance_loss, {"instance_loss": instance_loss.detach()}
        prior_loss = losses[num_instance:].mean()
        loss = instance_loss + self.prior_loss_weight * prior_loss
        return loss, {"instance_loss": instance_loss.detach(), "prior_loss": prior_loss.detach()}


# --------------------------------------------------------------------------------------------
# Measuring the subject/diversity trade-off


def thumbnails(images: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """NHWC images in [0, 1] -> N x 3 x size x size, area-downscaled so that small shifts matter less."""
    pixels = torch.as_tensor(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    if pixels.shape[-1] > size:
        pixels = F.interpolate(pixels, size=(size, size), mode="area")
    return pixels


@dataclass
class SubjectReferences:
    """What samples are compared with: the instance photos' latents and VAE reconstructions (the
    closest the model can get through its VAE), both for the subject distance."""

    latents: torch.Tensor  # N x C x h x w, scaled like the UNet's latents (posterior mean)
    reconstruction_thumbnails: torch.Tensor  # N x 3 x 32 x 32 (`thumbnails` of the reconstructions)

    @classmethod
    @torch.no_grad()
    def from_pixels(cls, pipeline: UnconditionalLatentPipeline, pixel_values: torch.Tensor) -> "SubjectReferences":
        latents = pipeline.encode_images(pixel_values, sample_posterior=False)
        images = pipeline.decode_latents(latents).permute(0, 2, 3, 1).cpu().numpy()
        return cls(latents.cpu(), thumbnails(images))

    def measure(self, latents: torch.Tensor, images: np.ndarray) -> dict[str, float]:
        """Subject distance and spread of a set of samples, in latent space and in (32 px) pixels."""
        small = thumbnails(images)
        def spread(vectors) -> float:
            value = mean_pairwise_distance(vectors, per_element=True)
            return float("nan") if value is None else value

        return {
            "instance_distance": float(nearest_distances(small, self.reconstruction_thumbnails, per_element=True).mean()),
            "sample_spread": spread(small),
            "instance_latent_distance": float(nearest_distances(latents, self.latents, per_element=True).mean()),
            "sample_latent_spread": spread(latents),
        }


def side_by_side(left: str | os.PathLike, right: str | os.PathLike, output: str | os.PathLike,
                 gap: int = 8) -> Path:
    """Two PNGs next to each other at the same height (instance photos | samples) for the model card."""
    images = [Image.open(path).convert("RGB") for path in (left, right)]
    height = max(image.height for image in images)
    images = [image if image.height == height else
              image.resize((round(image.width * height / image.height), height), Image.Resampling.LANCZOS)
              for image in images]
    canvas = Image.new("RGB", (images[0].width + gap + images[1].width, height), (255, 255, 255))
    canvas.paste(images[0], (0, 0))
    canvas.paste(images[1], (images[0].width + gap, 0))
    canvas.save(output)
    return Path(output)
