"""The first stage: loading a VAE of any supported class, encoding, and the latent scale.

Latents are handled in two forms. The *moments* are what the encoder gives: for a KL
autoencoder the posterior's mean and standard deviation (a fresh sample is drawn from them
every time they are used), for VQ and tiny autoencoders the deterministic latents (std 0).
The diffusion model sees *scaled* latents: z = (sample - shift) * scale.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from pipeline_latent_uncond import SUPPORTED_VAE_CLASSES as VAE_CLASSES, vae_latent_channels

from .errors import InputError

logger = logging.getLogger(__name__)

SUPPORTED_VAE_CLASSES = tuple(cls.__name__ for cls in VAE_CLASSES)
_VAE_SUBFOLDER_GUESSES = ("vae", "vqvae")


def _vae_class(name: str):
    import diffusers

    if name not in SUPPORTED_VAE_CLASSES:
        raise InputError(
            f"The first stage is a {name}; supported are {', '.join(SUPPORTED_VAE_CLASSES)}."
        )
    return getattr(diffusers, name)


def _offline_help(name: str) -> str:
    return (
        f"If '{name}' is a Hugging Face hub id, this machine may be offline or the id may be wrong. "
        f"Download it where there is network (`huggingface-cli download {name} --local-dir DIR`) and pass "
        "the folder instead, or set HF_HUB_OFFLINE=1 to use a copy already in the local cache. "
        "A Stable Diffusion pipeline repository keeps its VAE in the subfolder 'vae' (--vae_subfolder vae)."
    )


def _guess_local_subfolder(name_or_path: str, subfolder: str | None) -> str | None:
    """A local pipeline folder given as VAE: use its vae/ or vqvae/ subfolder."""
    root = Path(name_or_path)
    if subfolder or not root.is_dir() or (root / "config.json").is_file():
        return subfolder
    for guess in _VAE_SUBFOLDER_GUESSES:
        if (root / guess / "config.json").is_file():
            return guess
    raise InputError(
        f"{root} has no config.json (nor vae/ or vqvae/ subfolder with one); "
        "point --vae_name_or_path at a folder saved with `save_pretrained`."
    )


def load_vae(name_or_path: str, subfolder: str | None = None, revision: str | None = None,
             torch_dtype: torch.dtype | None = None):
    """Load an AutoencoderKL, VQModel or AutoencoderTiny from a local folder or hub id.

    The class is read from the folder's config.json, so one argument serves all three.
    """
    from diffusers import AutoencoderKL

    subfolder = _guess_local_subfolder(name_or_path, subfolder)
    try:
        config = AutoencoderKL.load_config(name_or_path, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as error:
        raise InputError(f"Could not load the VAE config of '{name_or_path}': {error}\n{_offline_help(name_or_path)}") from error
    cls = _vae_class(config.get("_class_name", "AutoencoderKL"))
    try:
        vae = cls.from_pretrained(name_or_path, subfolder=subfolder, revision=revision, torch_dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise InputError(f"Could not load the VAE weights of '{name_or_path}': {error}\n{_offline_help(name_or_path)}") from error
    vae.requires_grad_(False)
    vae.eval()
    return vae


def vae_kind(vae) -> str:
    return type(vae).__name__


def downsample_factor(vae) -> int:
    if vae_kind(vae) == "AutoencoderTiny":
        return 2 ** (len(vae.config.num_encoder_blocks) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    factor = downsample_factor(vae)
    if resolution % factor:
        raise InputError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}.")
    return vae_latent_channels(vae), resolution // factor, resolution // factor


def check_unet_matches_latents(unet, vae, resolution: int) -> None:
    """Refuse a UNet whose channels or sample size do not fit the VAE's latents."""
    channels, height, _ = latent_shape(vae, resolution)
    config = unet.config
    problems = []
    if config.in_channels != channels or config.out_channels != channels:
        problems.append(
            f"the UNet takes {config.in_channels} and gives {config.out_channels} channels, "
            f"but the VAE makes {channels}-channel latents"
        )
    sample_size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    if sample_size != height:
        problems.append(
            f"the UNet's sample_size is {sample_size}, but {resolution} px images give "
            f"{height}x{height} latents (the VAE downsamples by {downsample_factor(vae)})"
        )
    if problems:
        raise InputError(
            "The UNet does not match the VAE: " + "; ".join(problems) + ". "
            "Pick a UNet preset made for this VAE and resolution (configs/unet/), or change --resolution."
        )


# --------------------------------------------------------------------------------------------
# Encoding


@torch.no_grad()
def encode_moments(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images in [-1, 1] -> (mean, std) of the unscaled latents; std is None for deterministic encoders."""
    pixel_values = pixel_values.to(device=vae.device, dtype=vae.dtype)
    kind = vae_kind(vae)
    if kind == "AutoencoderKL":
        posterior = vae.encode(pixel_values).latent_dist
        return posterior.mean.float(), posterior.std.float()
    return vae.encode(pixel_values).latents.float(), None


def sample_from_moments(mean: torch.Tensor, std: torch.Tensor | None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    if std is None:
        return mean
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


# --------------------------------------------------------------------------------------------
# Latent scale


@dataclass(frozen=True)
class LatentScaling:
    scale: float
    shift: float
    source: str  # how the values were chosen, for the logs

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift) * self.scale

    def invert(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale + self.shift


def configured_scaling(vae) -> tuple[float | None, float]:
    """(scaling_factor, shift_factor) that the VAE's own config sets, or (None, 0) if it sets none.

    diffusers fills a missing `scaling_factor` with 0.18215; `_use_default_values` tells
    whether the value came from the file or from that default.
    """
    defaults = set(getattr(vae.config, "_use_default_values", []) or [])
    scale = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    if "scaling_factor" in defaults:
        scale = None
    if "shift_factor" in defaults or shift is None:
        shift = 0.0
    return scale, float(shift)


def resolve_latent_scaling(
    requested: str | float | None,
    vae,
    measure_std: Callable[[], float] | None = None,
) -> LatentScaling:
    """The latent scale to train with.

    `requested` is a number, or 'auto': the VAE config's factor where it sets one, 1.0 for
    VQ latents (already near unit variance: see diffusers bug #6725), otherwise 1/std measured
    by `measure_std()` over the training data.
    """
    if requested not in (None, "auto"):
        try:
            value = float(requested)
        except ValueError:
            raise InputError(f"--latent_scaling_factor must be 'auto' or a number, not {requested!r}.") from None
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"--latent_scaling_factor must be a positive number, not {requested!r}.")
        return LatentScaling(value, configured_scaling(vae)[1], "given on the command line")
    if vae_kind(vae) == "VQModel":
        return LatentScaling(1.0, 0.0, "VQ latents (scale 1.0)")
    scale, shift = configured_scaling(vae)
    if scale is not None:
        return LatentScaling(float(scale), shift, "the VAE config's scaling_factor")
    if measure_std is None:
        raise InputError("The VAE config sets no scaling_factor; it must be measured, but no data was given.")
    std = measure_std()
    if not math.isfinite(std) or std <= 0:
        raise InputError(f"Measured latent std is {std}; cannot derive a scale. Pass --latent_scaling_factor.")
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


def latent_moments_of_batches(vae, batches: Iterable[torch.Tensor], shift: float = 0.0) -> RunningMoments:
    moments = RunningMoments()
    for pixel_values in batches:
        mean, std = encode_moments(vae, pixel_values)
        moments.add_samples(mean, std, shift)
    return moments


def vae_fingerprint(vae, name_or_path: str, subfolder: str | None, revision: str | None) -> str:
    """Identifies a VAE for cache keys: where it came from plus a digest of its weights."""
    import hashlib

    digest = hashlib.sha256(f"{name_or_path}|{subfolder}|{revision}|{vae_kind(vae)}".encode())
    location = Path(name_or_path) / (subfolder or "")
    if location.is_dir():
        for weights in sorted(location.glob("*.safetensors")) + sorted(location.glob("*.bin")):
            stat = weights.stat()
            digest.update(f"{weights.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    # A few weights in full catch in-place edits that keep size and time.
    for _, parameter in list(vae.named_parameters())[:4]:
        digest.update(parameter.detach().float().cpu().numpy().tobytes()[:4096])
    return digest.hexdigest()[:16]


def vae_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """fp16 VAEs overflow (SD's VAE gives NaNs in fp16), so fp16 runs keep the VAE in fp32."""
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def describe_vae(vae) -> str:
    return f"{vae_kind(vae)} (f{downsample_factor(vae)}, {vae_latent_channels(vae)} latent channels)"
