"""DDPM training on latents: the noise schedule, the regression target and the (Min-SNR) loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def build_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                          beta_start: float = 0.0015, beta_end: float = 0.0195,
                          prediction_type: str = "epsilon"):
    """A DDPMScheduler for latents: `clip_sample=False`, since latents are not bounded to [-1, 1].

    LDM's "linear" schedule is linspace(sqrt(b0), sqrt(b1))^2, which diffusers calls
    `scaled_linear`; the face models use b0=0.0015, b1=0.0195.
    """
    from diffusers import DDPMScheduler

    if beta_schedule not in BETA_SCHEDULES:
        raise InputError(f"--ddpm_beta_schedule must be one of {BETA_SCHEDULES}, not {beta_schedule!r}.")
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"--prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}.")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def sample_timesteps(noise_scheduler, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=device
    ).long()


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise InputError(f"Unknown prediction type {prediction_type!r}.")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample weights of Min-SNR-gamma (Hang et al. 2023), for the scheduler's prediction type."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def per_sample_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    noise_scheduler, snr_gamma: float | None = None) -> torch.Tensor:
    """MSE per sample (shape [B]), Min-SNR weighted per sample when `snr_gamma` is given.

    Per-sample weights keep batches that concatenate two groups (DreamBooth's instance and
    prior halves) correct: each half gets its own timesteps' weights.
    """
    losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        losses = losses * min_snr_weights(noise_scheduler, timesteps, snr_gamma).to(losses.dtype)
    return losses


def with_offset_noise(noise: torch.Tensor, offset_noise: float, generator: torch.Generator) -> torch.Tensor:
    """diffusers' --offset_noise (crosslabs.org, "Diffusion with offset noise"): a constant per sample and
    channel, times `offset_noise` (0.1 there), added to the noise, so the model learns to change the mean
    brightness and colour of a latent too."""
    if not offset_noise:
        return noise
    offset = torch.randn((*noise.shape[:2], 1, 1), generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + offset_noise * offset


def noisy_latents_and_target(noise_scheduler, latents: torch.Tensor, generator: torch.Generator,
                             offset_noise: float = 0.0):
    """Draw noise (with `offset_noise`, see with_offset_noise) and timesteps from `generator`; return
    (noisy latents, timesteps, target). The timesteps do not depend on `offset_noise`."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = sample_timesteps(noise_scheduler, latents.shape[0], generator, latents.device)
    noise = with_offset_noise(noise, offset_noise, generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    return noisy, timesteps, training_target(noise_scheduler, latents, noise, timesteps)
