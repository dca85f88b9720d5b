"""The latent space: encoding images, the latent scale, fresh posterior samples and flips of a batch.

Latents come in two forms. The *moments* are what the encoder gives: for a KL autoencoder the
posterior's mean and standard deviation (a fresh sample is drawn from them every time they are
used), for VQ and tiny autoencoders the deterministic latents (std None). The diffusion model sees
*scaled* latents, z = (sample - shift) * scale, by the one rule of `pipeline_latent_uncond.py`
(`configured_latent_scaling`, `scale_latents`), which travels with every saved model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pipeline_latent_uncond import (
    check_latent_scale, configured_latent_scaling, scale_latents, unscale_latents,
)

from .errors import InputError

# --------------------------------------------------------------------------------------------
# Encoding


@torch.no_grad()
def encode_moments(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images in [-1, 1] -> (mean, std) of the unscaled latents; std is None for deterministic encoders."""
    pixel_values = pixel_values.to(device=vae.device, dtype=vae.dtype)
    encoded = vae.encode(pixel_values)
    if hasattr(encoded, "latent_dist"):  # AutoencoderKL
        posterior = encoded.latent_dist
        return posterior.mean.float(), posterior.std.float()
    return encoded.latents.float(), None


def sample_from_moments(mean: torch.Tensor, std: torch.Tensor | None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    if std is None:
        return mean
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


# --------------------------------------------------------------------------------------------
# The scale


@dataclass(frozen=True)
class LatentScaling:
    scale: float
    shift: float
    source: str  # how the values were chosen, for the logs and the model card

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        return scale_latents(latents, self.scale, self.shift)

    def invert(self, latents: torch.Tensor) -> torch.Tensor:
        return unscale_latents(latents, self.scale, self.shift)


def pipeline_scaling(pipeline, source: str = "the base pipeline") -> LatentScaling:
    """The latent scale and shift a saved pipeline samples with."""
    return LatentScaling(pipeline.latent_scale, pipeline.latent_shift, source)


def resolve_latent_scaling(requested: str | float | None, vae,
                           measure_std: Callable[[], float] | None = None) -> LatentScaling:
    """The latent scale to train with.

    `requested` is a number, or 'auto': what the VAE itself sets (`configured_latent_scaling`: 1.0 for
    VQ latents, else its config's factor), otherwise 1/std measured by `measure_std()` over the data.
    """
    configured_scale, shift = configured_latent_scaling(vae)
    if requested not in (None, "auto"):
        try:
            return LatentScaling(check_latent_scale(requested), shift, "given on the command line")
        except ValueError:
            raise InputError(f"--latent_scaling_factor must be 'auto' or a positive number, not {requested!r}.") from None
    if configured_scale is not None:
        source = "VQ latents (scale 1.0)" if type(vae).__name__ == "VQModel" else "the VAE config's scaling_factor"
        return LatentScaling(configured_scale, shift, source)
    if measure_std is None:
        raise InputError("The VAE config sets no scaling_factor; it must be measured, but no data was given.")
    std = measure_std()
    return LatentScaling(1.0 / std, shift, f"1/std of the training latents (std {std:.5f})")


class RunningMoments:
    """Sum, sum of squares and count in float64, for a std over many batches."""

    def __init__(self):
        self.total = 0.0
        self.total_sq = 0.0
        self.count = 0

    def add_samples(self, mean: torch.Tensor, std: torch.Tensor | None, shift: float = 0.0) -> None:
        """Add the exact first two moments of latents drawn from N(mean, std^2), shifted."""
        centred = mean.double() - shift
        self.total += centred.sum().item()
        second = centred.square()
        if std is not None:
            second = second + std.double().square()
        self.total_sq += second.sum().item()
        self.count += mean.numel()

    def as_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor([self.total, self.total_sq, float(self.count)], dtype=torch.float64, device=device)

    @staticmethod
    def std_from(values: torch.Tensor) -> float:
        total, total_sq, count = values.tolist()
        mean = total / count
        return math.sqrt(max(total_sq / count - mean * mean, 0.0))


def std_over_processes(moments: RunningMoments, accelerator, sharded: bool = True) -> float:
    """Std of the latents whose moments each process gathered; summed over the processes first when each
    one measured its own shard (`sharded`), so that every process gets the same number."""
    totals = moments.as_tensor(accelerator.device)
    if sharded and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return RunningMoments.std_from(totals.cpu())


def moments_of_images(dataset, vae, num_images: int, batch_size: int, process_index: int = 0,
                      num_processes: int = 1, seed: int = 0) -> RunningMoments:
    """Moments of this process's share of a fixed, seeded subset of `num_images` images."""
    chosen = np.random.default_rng(seed).permutation(len(dataset))[: min(num_images, len(dataset))]
    mine = sorted(chosen[process_index::num_processes].tolist())
    moments = RunningMoments()
    for batch in DataLoader(Subset(dataset, mine), batch_size=batch_size):
        mean, std = encode_moments(vae, batch["pixel_values"])
        moments.add_samples(mean, std)
    return moments


def measure_latent_std(train_set, vae, accelerator, num_images: int, batch_size: int, seed: int = 0) -> float:
    """Std of the latents, the same number on every process: over a whole latent cache (which every process
    reads; it has `latent_moments()`), or over a seeded subset of `num_images` images encoded in shards."""
    if hasattr(train_set, "latent_moments"):
        std = std_over_processes(train_set.latent_moments(), accelerator, sharded=False)
    else:
        moments = moments_of_images(train_set, vae, num_images, batch_size, accelerator.process_index,
                                    accelerator.num_processes, seed)
        std = std_over_processes(moments, accelerator)
    if not math.isfinite(std) or std <= 0:
        raise InputError(
            f"The latents' std is {std}, so no scale can be derived from it (has the autoencoder collapsed?). "
            "Pass --latent_scaling_factor, or retrain the autoencoder with a lower --learning_rate."
        )
    return std


# --------------------------------------------------------------------------------------------
# A training batch


def flip_choice(batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
    """Which items of a batch are mirrored (probability 1/2 each), drawn from `generator`; shape [B, 1, 1, 1]."""
    return (torch.rand(batch_size, generator=generator, device=device) < 0.5)[:, None, None, None]


def random_horizontal_flip(pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored with probability 1/2, drawn from `generator`."""
    flip = flip_choice(pixel_values.shape[0], generator, pixel_values.device)
    return torch.where(flip, pixel_values.flip(-1), pixel_values)


def moments_of_batch(batch: dict, vae, generator: torch.Generator,
                     random_flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, std) of a batch of images ({"pixel_values"}, encoded now) or of cached moments ({"mean", ...},
    which hold the mirrored images' moments too when flips are on); flips drawn from `generator`."""
    if "pixel_values" in batch:
        pixels = batch["pixel_values"]
        if random_flip:
            pixels = random_horizontal_flip(pixels, generator)
        return encode_moments(vae, pixels)
    mean, std = batch["mean"], batch.get("std")
    if random_flip:
        flip = flip_choice(mean.shape[0], generator, mean.device)
        mean = torch.where(flip, batch["mean_flipped"], mean)
        std = None if std is None else torch.where(flip, batch["std_flipped"], std)
    return mean, std


def latents_from_batch(batch: dict, vae, scaling: LatentScaling, generator: torch.Generator,
                       random_flip: bool) -> torch.Tensor:
    """Scaled latents of a batch, with a fresh posterior sample; flips and the sample are drawn from `generator`."""
    return scaling.apply(sample_from_moments(*moments_of_batch(batch, vae, generator, random_flip), generator))

