"""The first stage as a model: loading a VAE of any supported class, its shape, its identity.

What its latents mean (encoding, scale, samples, flips) is `uldm.latents`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline_latent_uncond import SUPPORTED_VAE_CLASSES as VAE_CLASSES, vae_latent_channels

from .errors import InputError
from .images import update_with_listing

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
             torch_dtype: torch.dtype | None = None, variant: str | None = None):
    """Load an AutoencoderKL, VQModel or AutoencoderTiny from a local folder or hub id (`variant`: diffusers'
    weight-file variant, e.g. "fp16").

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
        vae = cls.from_pretrained(name_or_path, subfolder=subfolder, revision=revision, torch_dtype=torch_dtype,
                                  variant=variant)
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


def vae_fingerprint(vae, name_or_path: str, subfolder: str | None, revision: str | None) -> str:
    """Identifies a VAE for cache keys: where it came from plus a digest of its weights."""
    import hashlib

    digest = hashlib.sha256(f"{name_or_path}|{subfolder}|{revision}|{vae_kind(vae)}".encode())
    location = Path(name_or_path) / (subfolder or "")
    if location.is_dir():
        update_with_listing(digest, sorted(location.glob("*.safetensors")) + sorted(location.glob("*.bin")), location)
    # A few weights in full catch in-place edits that keep size and time.
    _update_with_weights(digest, vae)
    return digest.hexdigest()[:16]


def vae_weights_digest(vae) -> str:
    """Identifies a VAE's weights wherever it was loaded from (a digest of the same few weights as
    `vae_fingerprint`): two pipelines whose VAEs differ here make different latents."""
    import hashlib

    digest = hashlib.sha256(vae_kind(vae).encode())
    _update_with_weights(digest, vae)
    return digest.hexdigest()[:16]


def _update_with_weights(digest, vae) -> None:
    for _, parameter in list(vae.named_parameters())[:4]:
        digest.update(parameter.detach().float().cpu().numpy().tobytes()[:4096])


VAE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def vae_dtype_for(mixed_precision: str | None, vae_precision: str = "auto", cache_latents: bool = False) -> torch.dtype:
    """The frozen VAE's dtype (--vae_precision; `auto` decides from the run).

    auto: bf16 only under --mixed_precision bf16 when the VAE encodes every training step, where its speed
    counts (bf16 has fp32's exponent range, so it cannot overflow); fp32 otherwise: with --cache_latents the
    latents are encoded once and kept for the whole run, and in fp16 VAEs overflow (SD's and SDXL's VAE give
    NaNs). A VAE that still misbehaves shows as a non-finite loss, which stops the run with a message."""
    if vae_precision != "auto":
        if vae_precision not in _VAE_DTYPES:
            raise InputError(f"--vae_precision must be one of {', '.join(VAE_PRECISIONS)}, not {vae_precision!r}.")
        return _VAE_DTYPES[vae_precision]
    if mixed_precision == "bf16" and not cache_latents:
        return torch.bfloat16
    return torch.float32


def describe_vae(vae) -> str:
    return f"{vae_kind(vae)} (f{downsample_factor(vae)}, {vae_latent_channels(vae)} latent channels)"
