"""Training a first-stage autoencoder (AutoencoderKL): model, losses, held-out split and metrics, scale.

The objective is CompVis' first-stage loss without the adversarial part:

    reconstruction (L1 or L2 per pixel) + perceptual_weight * LPIPS + kl_weight * KL

CompVis sums the reconstruction term over pixels and the KL term over latent elements; we divide
both by the number of pixel values, which keeps the ratio, so `kl_weight` means what it means in
their configs (1e-6 for the kl-f4/kl-f8 models) while the logged losses stay per-pixel numbers
that are comparable between resolutions.

After training, the latent scale (1/std of the posterior samples over the training data) is
measured and stored as the VAE config's `scaling_factor`, so a latent diffusion model trained on
it picks it up with `--latent_scaling_factor auto`.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline_latent_uncond import configured_latent_scaling

from .presets import read_model_config
from .data import Preprocessing
from .errors import InputError
from .vae import downsample_factor, load_vae

logger = logging.getLogger(__name__)

RECONSTRUCTION_LOSSES = ("l1", "l2")
VGG16_FILE_NAME = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, as torch.hub caches it
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE_NAME}"


# --------------------------------------------------------------------------------------------
# The model


def build_autoencoder(model_config_name_or_path: str | None = None, pretrained_vae_name_or_path: str | None = None,
                      subfolder: str | None = None, revision: str | None = None, variant: str | None = None):
    """A trainable AutoencoderKL: fresh from a preset / config, or the weights of a saved one."""
    from diffusers import AutoencoderKL

    if pretrained_vae_name_or_path:
        vae = load_vae(pretrained_vae_name_or_path, subfolder, revision, variant=variant)
        if not isinstance(vae, AutoencoderKL):
            raise InputError(
                f"{pretrained_vae_name_or_path} holds a {type(vae).__name__}; train_vae.py trains AutoencoderKL "
                "models only (VQ training needs a codebook loss, which this script does not implement)."
            )
    else:
        config = read_model_config(model_config_name_or_path, "vae", AutoencoderKL, subfolder=subfolder,
                                   revision=revision)
        vae = AutoencoderKL.from_config(config)
    vae.requires_grad_(True)
    vae.train()
    return vae


class AutoencoderForTraining(nn.Module):
    """One forward pass from images to (reconstruction, KL per image).

    Everything happens inside `forward`, the method that DistributedDataParallel wraps, so the
    gradients of encoder and decoder are synchronised. The posterior sample is mean + std x `noise`,
    the noise drawn beforehand from the step's generator (`latent_noise`), which keeps resumed runs
    exact and the forward pass free of a torch.Generator, which torch.compile cannot trace.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def latent_noise(self, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise of the shape of these images' latents, drawn from `generator`."""
        factor = downsample_factor(self.vae)
        batch, _, height, width = pixel_values.shape
        shape = (batch, self.vae.config.latent_channels, height // factor, width // factor)
        return torch.randn(shape, generator=generator, device=pixel_values.device, dtype=torch.float32)

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None):
        """(reconstruction, KL per image); without `noise` the posterior mean is decoded."""
        posterior = self.vae.encode(pixel_values).latent_dist
        latents = posterior.mean if noise is None else posterior.mean + posterior.std * noise
        return self.vae.decode(latents).sample, posterior.kl()


# --------------------------------------------------------------------------------------------
# Losses


def reconstruction_error(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-image mean absolute (l1) or squared (l2) error, shape [B]."""
    difference = reconstruction.float() - target.float()
    error = difference.abs() if kind == "l1" else difference.square()
    return error.flatten(1).mean(dim=1)


def resolve_perceptual_weights(path: str | None) -> Path:
    """The local VGG16 weights LPIPS needs; torch.hub's cache is searched when no path is given."""
    if path:
        candidate = Path(path).expanduser()
        if not candidate.is_file():
            raise InputError(f"--perceptual_weights_path {path} is not a file. {_perceptual_help()}")
        return candidate
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE_NAME
    if cached.is_file():
        return cached
    raise InputError(f"--perceptual_weight needs the LPIPS backbone's weights on this machine. {_perceptual_help()}")


def _perceptual_help() -> str:
    return (
        "LPIPS (the perceptual loss) compares VGG16 ImageNet features; those weights cannot be downloaded "
        f"here. Fetch {VGG16_URL} on a machine with network, copy it over and pass "
        "--perceptual_weights_path /path/to/vgg16-397923af.pth (or put it into torch.hub's cache, "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}). The small linear LPIPS layers ship with "
        "torchmetrics. Or train without it: leave --perceptual_weight at 0."
    )


def load_lpips(weights_path: str | os.PathLike) -> nn.Module:
    """LPIPS-VGG (frozen, eval mode) with the backbone from a local file and torchmetrics' linear layers.

    The file may be torchvision's VGG16 state dict (keys `features.N.*`, classifier ignored) or a
    whole LPIPS state dict (keys `net.sliceK.N.*`, `linK.*`).
    """
    from torchmetrics.functional.image.lpips import _LPIPS

    lpips = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    backbone = _vgg_features_to_lpips_keys(state, lpips)
    missing = [key for key in lpips.net.state_dict() if f"net.{key}" not in backbone]
    if missing:
        raise InputError(
            f"{weights_path} does not hold VGG16 weights (missing e.g. {missing[0]}); {_perceptual_help()}"
        )
    lpips.load_state_dict(backbone, strict=False)
    lpips.eval().requires_grad_(False)
    return lpips


def _vgg_features_to_lpips_keys(state: dict, lpips: nn.Module) -> dict:
    """torchvision's `features.N.weight` -> LPIPS' `net.sliceK.N.weight` (slices keep the layer numbers)."""
    slice_of = {}
    for name, _ in lpips.net.named_parameters():
        slice_name, layer, _ = name.split(".")
        slice_of[layer] = slice_name
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("net.slice") or key.startswith("lin"):
            mapped[key] = value
        elif len(parts) == 3 and parts[0] == "features" and parts[1] in slice_of:
            mapped[f"net.{slice_of[parts[1]]}.{parts[1]}.{parts[2]}"] = value
    return mapped


@dataclass
class AutoencoderLoss:
    """reconstruction + perceptual_weight * LPIPS + kl_weight * KL (see the module docstring)."""

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    perceptual: nn.Module | None = None

    def __call__(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor, kl: torch.Tensor):
        """`kl`: KL divergence of each image's posterior from N(0, I), summed over its latent (shape [B])."""
        values_per_image = pixel_values[0].numel()
        rec = reconstruction_error(reconstruction, pixel_values, self.reconstruction).mean()
        kl = kl.float().mean()
        loss = rec + self.kl_weight * kl / values_per_image
        logs = {"rec_loss": rec.detach(), "kl": kl.detach()}  # kl in nats per image, as CompVis logs it
        if self.perceptual is not None and self.perceptual_weight > 0:
            perceptual = self.perceptual(reconstruction.float(), pixel_values.float()).mean()
            loss = loss + self.perceptual_weight * perceptual
            logs["perceptual_loss"] = perceptual.detach()
        return loss, logs


# --------------------------------------------------------------------------------------------
# Held-out split


class IndexSubset(Dataset):
    """Some items of a data set; passes `epoch` through, so random crops still change per epoch."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    @property
    def epoch(self) -> int:
        return getattr(self.dataset, "epoch", 0)

    @epoch.setter
    def epoch(self, value: int) -> None:
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = value


def default_holdout_size(num_images: int) -> int:
    return max(1, min(64, num_images // 10))


def split_holdout(dataset, num_holdout: int, seed: int) -> tuple[IndexSubset, IndexSubset]:
    """(training part, held-out part): a seeded random choice of `num_holdout` items is held out.

    The held-out part is always centre-cropped and never flipped, so its metrics are comparable
    between evaluations and runs.
    """
    if num_holdout >= len(dataset):
        raise InputError(
            f"--num_holdout_images {num_holdout} leaves no training images out of {len(dataset)}; use fewer."
        )
    order = np.random.default_rng(seed + 104729).permutation(len(dataset))
    holdout = sorted(order[:num_holdout].tolist())
    train = sorted(order[num_holdout:].tolist())
    return IndexSubset(dataset, train), IndexSubset(centre_cropped_view(dataset), holdout)


def centre_cropped_view(dataset):
    """The same images, preprocessed deterministically (centre crop)."""
    if isinstance(dataset, IndexSubset):
        return IndexSubset(centre_cropped_view(dataset.dataset), dataset.indices)
    preprocessing = getattr(dataset, "preprocessing", None)
    if preprocessing is None or preprocessing.center_crop:
        return dataset
    view = copy.copy(dataset)
    view.preprocessing = Preprocessing(preprocessing.resolution, True)
    return view


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def reconstruct(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction (posterior mode), in [-1, 1]."""
    pixel_values = pixel_values.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixel_values).latent_dist.mode()
    return vae.decode(latents).sample.float().clamp(-1, 1)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], computed on the [0, 1] scale."""
    mse = ((reconstruction.float() - target.float()) / 2).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_reconstructions(vae, dataset, batch_size: int = 32, reconstruction_loss: str = "l1") -> dict[str, float]:
    """Held-out metrics: val_rec_loss (the training reconstruction loss), val_mse, val_psnr (dB)."""
    was_training = vae.training
    vae.eval()
    totals = {"val_rec_loss": 0.0, "val_mse": 0.0, "val_psnr": 0.0}
    count = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        target = batch["pixel_values"].to(vae.device).float()
        output = reconstruct(vae, target)
        totals["val_rec_loss"] += reconstruction_error(output, target, reconstruction_loss).sum().item()
        totals["val_mse"] += reconstruction_error(output / 2, target / 2, "l2").sum().item()
        totals["val_psnr"] += psnr(output, target).sum().item()
        count += target.shape[0]
    vae.train(was_training)
    return {name: value / count for name, value in totals.items()}


def reconstruction_pairs(vae, pixel_values: torch.Tensor) -> np.ndarray:
    """Each image beside its reconstruction (NHWC in [0, 1], twice as wide), for the grids."""
    was_training = vae.training
    vae.eval()
    output = reconstruct(vae, pixel_values)
    vae.train(was_training)
    pairs = torch.cat([pixel_values.to(output.device).float(), output], dim=3)
    return ((pairs + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def stack_pixels(dataset, count: int) -> torch.Tensor:
    return torch.stack([dataset[i]["pixel_values"] for i in range(min(count, len(dataset)))])


# --------------------------------------------------------------------------------------------
# Latent scale


def store_scaling_factor(vae, std: float, keep_existing: bool = False) -> tuple[float, str]:
    """Write 1/std into the config (what `--latent_scaling_factor auto` reads); returns (value, source)."""
    existing, _ = configured_latent_scaling(vae)
    if keep_existing and existing is not None:
        return float(existing), "kept from the pretrained VAE"
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std, f"1/std of the training latents (std {std:.5f})"
