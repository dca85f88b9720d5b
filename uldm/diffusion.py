"""DDPM training: the noise schedule, the timesteps, the regression target and the weighted loss.

The loss and noise levers, one `LossConfig` from the command line (`uldm.args.add_loss_lever_args`) to the
loss, the same for every trainer: a new lever is a field here, a flag there, and its use below.

* zero terminal SNR (Lin et al. 2023, arXiv 2305.08891): `schedule_levers` rescales the betas so that the
  last timestep is pure noise (alphas_cumprod[-1] == 0) and sets "trailing" timestep spacing, so every
  sampler built from the saved config starts at that timestep. Both travel in the scheduler config, so
  sampling and fine-tunes of the model inherit them.
* the timestep density (`weighting_scheme`, diffusers' name from its SD3 scripts): uniform ("none") or
  logit-normal (SD3, Esser et al. 2024) with diffusers' sign: u = sigmoid(N(logit_mean, logit_std^2)) is a
  position in the descending timestep list, t = T - 1 - floor(T * u), so a positive mean favours the
  less noisy timesteps (the SD3 paper's m has the opposite sign).
* offset noise (`with_offset_noise`), added to the noise the model is trained to remove.
* the per-timestep loss weight: Min-SNR-gamma (Hang et al. 2023) or P2 (Choi et al. 2022, arXiv
  2204.00227). Both are defined for the epsilon loss of their papers and carried over to v and sample
  prediction so that the objective stays the same function of the model (see `loss_weights`).

SpeeD (Wang et al. 2024, arXiv 2405.17403) is not offered: its weighting is P2 with k = 1, gamma = 1
(offered), and its timestep sampling has no single definition to follow (the released code boosts
timesteps where d sqrt(1 - alphas_cumprod) / dt exceeds 1e-4 five-fold and pairs each with a mirrored
one, while the paper's configurations use tau / k / lambda parameters that code does not read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' --weighting_scheme values that choose a timestep density (its flow-matching loss weights,
# sigma_sqrt and cosmap, have no meaning for DDPM); "none" is uniform.
WEIGHTING_SCHEMES = ("none", "logit_normal")


@dataclass(frozen=True)
class LossConfig:
    """Every loss and noise lever: how timesteps are drawn, how the noise is made, how each sample's loss is
    weighted, and the noise schedule's changes (`schedule_levers`, the only part saved with the model).
    Recorded in training_args.json and the model card."""

    snr_gamma: float | None = None  # Min-SNR-gamma
    p2_gamma: float | None = None  # P2 weighting 1 / (p2_k + SNR)^p2_gamma of the epsilon loss
    p2_k: float = 1.0
    weighting_scheme: str = "none"  # timestep density: "none" (uniform) or "logit_normal"
    logit_mean: float = 0.0  # diffusers' sign: positive favours the less noisy timesteps
    logit_std: float = 1.0
    offset_noise: float = 0.0
    rescale_betas_zero_snr: bool = False


NO_LEVERS = LossConfig()


def schedule_levers(levers: LossConfig) -> dict:
    """The scheduler-config entries of the levers that change the noise schedule. They are saved with the model,
    so every sampler built from its config (`uldm.sampling.make_scheduler`) and every fine-tune inherits them."""
    return {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if levers.rescale_betas_zero_snr else {}


def with_schedule_levers(scheduler, levers: LossConfig):
    """`scheduler` (a base model's) on the levers' noise schedule; itself where it has that schedule already."""
    changes = schedule_levers(levers)
    if all(scheduler.config.get(key) == value for key, value in changes.items()):
        return scheduler
    return type(scheduler).from_config({**scheduler.config, **changes})


def build_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                          beta_start: float = 0.0015, beta_end: float = 0.0195,
                          prediction_type: str = "epsilon", levers: LossConfig = NO_LEVERS,
                          clip_sample: bool = False):
    """A DDPMScheduler for training, on the levers' noise schedule (`schedule_levers`); `clip_sample=False` by
    default, since latents are not bounded to [-1, 1].

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
        clip_sample=clip_sample,
        **schedule_levers(levers),
    )


def has_zero_terminal_snr(scheduler_config) -> bool:
    return bool(scheduler_config.get("rescale_betas_zero_snr", False))


def check_loss_levers(scheduler_config, levers: LossConfig) -> None:
    """Refuse the combinations that cannot work, saying why and what to change. `scheduler_config` is the
    schedule the levers act on (the run's, or a base model's for a fine-tune)."""
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if has_zero_terminal_snr({**scheduler_config, **schedule_levers(levers)}) and prediction_type == "epsilon":
        extra = (" With --snr_gamma the Min-SNR weight min(SNR, gamma) / SNR would moreover be infinite "
                 "(0 / 0) there.") if levers.snr_gamma else ""
        raise InputError(
            "--rescale_betas_zero_snr makes the last timestep pure noise (SNR 0), where epsilon prediction "
            "learns nothing: the noise equals the input, and the image cannot be recovered from a predicted "
            f"noise.{extra} Use --prediction_type v_prediction (as Lin et al. do) or sample (DreamBooth: a base "
            "model trained so)."
        )
    if levers.snr_gamma and levers.p2_gamma is not None:
        raise InputError(
            "--snr_gamma (Min-SNR) and --p2_gamma (P2) both set the loss weight of each timestep; "
            "multiplying them is neither paper's method. Choose one."
        )
    if levers.snr_gamma is not None and not levers.snr_gamma >= 0:
        raise InputError(f"--snr_gamma must be positive (5.0 is the paper's choice; 0 turns it off), "
                         f"not {levers.snr_gamma}.")
    if levers.p2_gamma is not None and not levers.p2_gamma >= 0:
        raise InputError(f"--p2_gamma must be 0 or more (the paper uses 0.5 or 1), not {levers.p2_gamma}.")
    if not levers.p2_k > 0:
        raise InputError(f"--p2_k must be positive (the paper uses 1), not {levers.p2_k}: "
                         "1 / (k + SNR)^gamma is infinite where the SNR is 0.")
    if levers.weighting_scheme not in WEIGHTING_SCHEMES:
        raise InputError(f"--weighting_scheme must be one of {WEIGHTING_SCHEMES}, not {levers.weighting_scheme!r}.")
    if not levers.logit_std > 0:
        raise InputError(f"--logit_std must be positive, not {levers.logit_std}.")


def describe_levers(scheduler_config, levers: LossConfig | None) -> dict[str, str]:
    """The levers in use, in words, for the model card: the prediction type, and the others where they are on."""
    facts = {"prediction type": scheduler_config.get("prediction_type", "epsilon")}
    if has_zero_terminal_snr(scheduler_config):
        facts["noise schedule"] = (f"{scheduler_config.get('beta_schedule')}, rescaled to zero terminal SNR "
                                   f"(sampling with {scheduler_config.get('timestep_spacing')} timestep spacing)")
    if levers is None:
        return facts
    if levers.snr_gamma:
        facts["loss weighting"] = f"Min-SNR, gamma {levers.snr_gamma:g}"
    if levers.p2_gamma is not None:
        facts["loss weighting"] = f"P2, 1 / ({levers.p2_k:g} + SNR)^{levers.p2_gamma:g} of the epsilon loss"
    if levers.weighting_scheme == "logit_normal":
        facts["timestep sampling"] = f"logit-normal, mean {levers.logit_mean:g}, std {levers.logit_std:g}"
    return facts


# --------------------------------------------------------------------------------------------
# Timesteps


def sample_timesteps(noise_scheduler, batch_size: int, generator: torch.Generator, device,
                     levers: LossConfig = NO_LEVERS) -> torch.Tensor:
    """Training timesteps drawn from `generator`: uniform, or logit-normal as diffusers' SD3 scripts draw them
    (compute_density_for_timestep_sampling): u = sigmoid(N(logit_mean, logit_std^2)) picks position
    floor(T * u) of the descending timestep list, here t = T - 1 - floor(T * u). Diffusers' sign, so that its
    command lines mean the same here: --logit_mean 1 gives a mean timestep near 303 of 1000."""
    num_timesteps = noise_scheduler.config.num_train_timesteps
    if levers.weighting_scheme == "none":
        return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device).long()
    normal = torch.randn((batch_size,), generator=generator, device=device)
    fraction = torch.sigmoid(normal * levers.logit_std + levers.logit_mean)
    position = (fraction * num_timesteps).long().clamp_(0, num_timesteps - 1)
    return num_timesteps - 1 - position


def logit_normal_timestep_probabilities(num_timesteps: int, mean: float, std: float) -> torch.Tensor:
    """P(t = i) of the logit-normal draw (`sample_timesteps`): the probability of position T - 1 - i,
    Phi((logit((T - i) / T) - mean) / std) - Phi((logit((T - 1 - i) / T) - mean) / std)."""
    edges = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    logits = torch.logit(edges)  # -inf and +inf at the ends
    cdf = 0.5 * (1 + torch.erf((logits - mean) / (std * math.sqrt(2))))
    return (cdf[1:] - cdf[:-1]).flip(0)


# --------------------------------------------------------------------------------------------
# Targets and weights


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise InputError(f"Unknown prediction type {prediction_type!r}.")


def signal_to_noise(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alphas_cumprod / (1 - alphas_cumprod) of each timestep (0 at a zero-SNR schedule's end)."""
    from diffusers.training_utils import compute_snr

    return compute_snr(noise_scheduler, timesteps)


def weights_for_prediction_type(x0_weights: torch.Tensor, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Weights of the loss of `prediction_type` that make it the x0 loss weighted by `x0_weights`.

    With x_t = a x0 + s eps (a^2 + s^2 = 1, SNR = a^2 / s^2): |eps error|^2 = SNR |x0 error|^2 and
    |v error|^2 = (1 + SNR) |x0 error|^2, so the same objective is x0_weights / SNR on the epsilon loss
    and x0_weights / (SNR + 1) on the v loss.
    """
    if prediction_type == "epsilon":
        return x0_weights / snr
    if prediction_type == "v_prediction":
        return x0_weights / (snr + 1)
    return x0_weights


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample weights of Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) on the x0 loss, i.e.
    min(SNR, gamma) / SNR on the epsilon loss and min(SNR, gamma) / (SNR + 1) on the v loss."""
    return _min_snr_weights(signal_to_noise(noise_scheduler, timesteps), snr_gamma,
                            noise_scheduler.config.prediction_type)


def p2_weights(noise_scheduler, timesteps: torch.Tensor, p2_gamma: float, p2_k: float = 1.0) -> torch.Tensor:
    """Per-sample weights of P2 (Choi et al. 2022): 1 / (k + SNR)^gamma on the epsilon loss (the paper's), i.e.
    SNR / (k + SNR)^gamma on the x0 loss and SNR / ((SNR + 1) (k + SNR)^gamma) on the v loss."""
    return _p2_weights(signal_to_noise(noise_scheduler, timesteps), p2_gamma, p2_k,
                       noise_scheduler.config.prediction_type)


def _min_snr_weights(snr: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    return weights_for_prediction_type(torch.clamp(snr, max=snr_gamma), snr, prediction_type)


def _p2_weights(snr: torch.Tensor, p2_gamma: float, p2_k: float, prediction_type: str) -> torch.Tensor:
    return weights_for_prediction_type(snr / (p2_k + snr) ** p2_gamma, snr, prediction_type)


def loss_weights(noise_scheduler, timesteps: torch.Tensor, levers: LossConfig = NO_LEVERS) -> torch.Tensor | None:
    """Min-SNR or P2 weights per sample (None: unweighted).

    Where the SNR is exactly 0 (the last timestep of a zero-terminal-SNR schedule) both give the x0 loss
    weight 0, because the epsilon loss of their papers says nothing there (the noise is the input). That
    timestep is where sampling starts, so it keeps the unweighted loss (weight 1): v and sample prediction
    then learn the mean image, as Lin et al. need. (Epsilon prediction with zero SNR is refused.)
    """
    if not levers.snr_gamma and levers.p2_gamma is None:
        return None
    snr = signal_to_noise(noise_scheduler, timesteps)  # once per step: it copies the alpha tables to the device
    prediction_type = noise_scheduler.config.prediction_type
    if levers.snr_gamma:
        weights = _min_snr_weights(snr, levers.snr_gamma, prediction_type)
    else:
        weights = _p2_weights(snr, levers.p2_gamma, levers.p2_k, prediction_type)
    if prediction_type != "epsilon":
        weights = torch.where(snr == 0, torch.ones_like(weights), weights)
    return weights


def per_sample_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    noise_scheduler, levers: LossConfig = NO_LEVERS) -> torch.Tensor:
    """MSE per sample (shape [B]), weighted per sample by the levers' weighting (`loss_weights`).

    Per-sample weights keep batches that concatenate two groups (DreamBooth's instance and
    prior halves) correct: each half gets its own timesteps' weights.
    """
    losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = loss_weights(noise_scheduler, timesteps, levers)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses


def with_offset_noise(noise: torch.Tensor, offset_noise: float, generator: torch.Generator) -> torch.Tensor:
    """diffusers' --offset_noise (crosslabs.org, "Diffusion with offset noise"): a constant per sample and
    channel, times `offset_noise` (0.1 there), added to the noise, so the model learns to change the mean
    brightness and colour of a latent too."""
    if not offset_noise:
        return noise
    offset = torch.randn((*noise.shape[:2], 1, 1), generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + offset_noise * offset


def weighted_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                  levers: LossConfig) -> torch.Tensor:
    """The batch's mean loss with the levers' weighting."""
    return per_sample_loss(model_pred, target, timesteps, noise_scheduler, levers).mean()


def noisy_latents_and_target(noise_scheduler, latents: torch.Tensor, generator: torch.Generator,
                             levers: LossConfig = NO_LEVERS):
    """Draw noise (with the levers' offset noise, see with_offset_noise) and timesteps (with their density) from
    `generator`; return (noisy latents, timesteps, target). The timesteps do not depend on the offset noise."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = sample_timesteps(noise_scheduler, latents.shape[0], generator, latents.device, levers)
    noise = with_offset_noise(noise, levers.offset_noise, generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    return noisy, timesteps, training_target(noise_scheduler, latents, noise, timesteps)
