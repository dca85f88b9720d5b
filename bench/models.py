"""The models the benchmarks time, built with random weights (speed and memory do not depend on them)."""

from __future__ import annotations

from typing import Any

import torch

from uldm.presets import read_json_preset

# Stable Diffusion's VAE (kl-f8, 4 latent channels, 83.7M parameters): 256 px -> 4x32x32 latents.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

# diffusers' examples/unconditional_image_generation/train_unconditional.py: its pixel-space UNet
# (113.7M parameters), here at 256x256.
DIFFUSERS_PIXEL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}

# A reduced latent UNet for timing on a 2-core CPU: the layout of configs/unet/small-sdvae256.json
# (4x32x32 latents, attention at 16x16 and 8x8) at half the width and one res block per level.
CPU_LATENT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [64, 128, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 32,
    "norm_num_groups": 32,
}

# A miniature of the pixel UNet's layout for --quick runs: 3x32x32, attention at the second level.
TINY_PIXEL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def unet_config(name_or_path: str) -> dict[str, Any]:
    """A UNet2DModel config: a built-in name above ("pixel-default", "cpu-latent", "tiny-pixel"), a preset or a JSON file."""
    builtin = {"pixel-default": DIFFUSERS_PIXEL_UNET_CONFIG, "cpu-latent": CPU_LATENT_UNET_CONFIG,
               "tiny-pixel": TINY_PIXEL_UNET_CONFIG}
    if name_or_path in builtin:
        return dict(builtin[name_or_path])
    config = read_json_preset(name_or_path, "unet")
    if config is None:
        raise ValueError(f"{name_or_path!r} is neither {sorted(builtin)}, a preset in configs/unet nor a JSON file.")
    return config


def unet_label(name_or_path: str) -> str:
    """How reports name a UNet: built-in names get a description, presets and files keep their name."""
    labels = {"cpu-latent": "cpu-latent (small-sdvae256 at half width, 1 res block per level)",
              "pixel-default": "diffusers' default pixel UNet", "tiny-pixel": "tiny pixel UNet"}
    return labels.get(name_or_path, name_or_path)


def vae_label(name: str) -> str:
    return "Stable Diffusion VAE layout" if name == "sd" else name


def vae_config(name: str) -> dict[str, Any]:
    """"sd" (Stable Diffusion's VAE layout) or a preset from configs/vae (e.g. "tiny-kl-f4")."""
    if name == "sd":
        return dict(SD_VAE_CONFIG)
    config = read_json_preset(name, "vae")
    if config is None:
        raise ValueError(f"VAE {name!r} is neither 'sd' nor a preset in configs/vae.")
    return config


def build_unet(name_or_path: str, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**unet_config(name_or_path))


def build_vae(name: str, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(name))
    vae.requires_grad_(False)
    return vae.eval()


def sample_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return unet.config.in_channels, height, width
