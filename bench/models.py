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


def make_training_step(model, optimizer, shape: tuple[int, int, int], device: torch.device,
                       autocast_dtype: torch.dtype | None = None, channels_last: bool = False, seed: int = 0,
                       ema=None, make_latents=None, readback_every_step: bool = False):
    """A function step(batch_size) -> detached loss doing what the training scripts do for one batch:
    latents (random ones, as from the latent cache, or `make_latents(batch_size, generator)`), noise and
    timesteps, forward (under autocast when a dtype is given), MSE, backward, clipping, AdamW, and the
    EMA step when an EMAModel is given.

    readback_every_step: copy the non-finite flag and the loss to the host before the backward pass,
    as the training loop does on every micro-batch (a device-to-host sync); without it the step never
    waits for the device."""
    from uldm.diffusion import build_noise_scheduler, noisy_latents_and_target, per_sample_loss

    noise_scheduler = build_noise_scheduler()
    generator = torch.Generator(device).manual_seed(seed)
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def step(batch_size: int) -> torch.Tensor:
        if make_latents is None:
            latents = torch.randn((batch_size, *shape), generator=generator, device=device)
        else:
            latents = make_latents(batch_size, generator)
        noisy, timesteps, target = noisy_latents_and_target(noise_scheduler, latents, generator)
        with autocast:
            prediction = model(noisy.contiguous(memory_format=memory_format), timesteps).sample
        loss = per_sample_loss(prediction, target, timesteps, noise_scheduler).mean()
        if readback_every_step:
            nonfinite, _ = torch.stack([(~torch.isfinite(loss)).float(), loss.detach().float()]).tolist()
            if nonfinite:
                raise FloatingPointError("The loss became NaN or infinite.")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        return loss.detach()

    return step


def make_encoder_latents(vae, images: torch.Tensor):
    """make_latents for make_training_step without a latent cache: the VAE encodes `images` (the first
    batch_size of them) every step and a latent is drawn from the posterior, scaled, in fp32."""
    scale = vae.config.scaling_factor

    @torch.no_grad()
    def make_latents(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        posterior = vae.encode(images[:batch_size]).latent_dist
        return (posterior.sample(generator) * scale).float()

    return make_latents
