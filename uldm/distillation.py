"""Consistency distillation (LCM-style: Luo et al. 2023; Song et al. 2023) of a saved diffusion model into a
student that samples in 1-4 steps with diffusers' `LCMScheduler`.

The teacher's probability-flow ODE is discretised on the grid that `LCMScheduler` samples from: N solver
timesteps t_n = n * k - 1 (k = T / N, n = 1..N, T the training timesteps). Each training example draws a clean
sample x0 from the data, a grid point t = t_n and noise, and forms x_t. The teacher (optionally guided by a
weaker model) takes one DDIM step from x_t to t - k; the target network (an EMA of the student) maps that point
to its clean estimate, and the student, from x_t, must agree with it under a robust (pseudo-Huber) loss. The
student's output is parameterised with the boundary condition of `LCMScheduler.step` (c_skip * x_t + c_out * x0,
with x0 from the UNet's own prediction type), so what it learns is exactly what the scheduler samples.

Works for every prediction type (epsilon, v_prediction, sample) and for latents and pixels alike: the data
flags, the latent cache and the training loop are the trainers' (`distill.py`).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

SIGMA_DATA = 0.5  # LCMScheduler's (get_scalings_for_boundary_condition_discrete)


@dataclass(frozen=True)
class ConsistencyConfig:
    """The distillation's settings (distill.py's flags of the same names)."""

    num_ddim_timesteps: int = 50  # N: solver steps over the teacher's schedule; the student samples at <= N steps
    loss_type: str = "huber"  # "huber" (pseudo-Huber) or "l2"
    huber_c: float = 0.001  # the pseudo-Huber constant (LCM's)
    timestep_scaling: float = 10.0  # LCMScheduler's timestep_scaling: sharpness of the boundary condition


def check_consistency_config(config: ConsistencyConfig, num_train_timesteps: int) -> None:
    if not 1 <= config.num_ddim_timesteps <= num_train_timesteps:
        raise InputError(f"--num_ddim_timesteps must be between 1 and the teacher's {num_train_timesteps} training "
                         f"timesteps, not {config.num_ddim_timesteps} (LCM uses 50).")
    if config.loss_type not in ("huber", "l2"):
        raise InputError(f"--loss_type must be huber or l2, not {config.loss_type!r}.")
    if config.huber_c <= 0:
        raise InputError(f"--huber_c must be positive, not {config.huber_c}.")
    if config.timestep_scaling <= 0:
        raise InputError(f"--timestep_scaling must be positive, not {config.timestep_scaling}.")


# --------------------------------------------------------------------------------------------
# The student's scheduler


def student_scheduler(teacher_scheduler_config, config: ConsistencyConfig):
    """The few-step sampler of a student of a teacher with this noise schedule: `LCMScheduler` on the solver grid
    the student was distilled on (only the teacher's noise-schedule settings are carried over)."""
    import inspect

    from diffusers import LCMScheduler

    accepted = set(inspect.signature(LCMScheduler.__init__).parameters)
    schedule = {key: value for key, value in dict(teacher_scheduler_config).items() if key in accepted}
    return LCMScheduler(**{**schedule, "original_inference_steps": config.num_ddim_timesteps,
                           "timestep_scaling": config.timestep_scaling})


def is_student(scheduler) -> bool:
    """Whether a saved model samples with a few-step scheduler (a distilled student)."""
    from diffusers import LCMScheduler

    return isinstance(scheduler, LCMScheduler)


def max_student_steps(scheduler) -> int | None:
    """How many steps a few-step scheduler can sample with (its original_inference_steps); None for others."""
    return int(scheduler.config.original_inference_steps) if is_student(scheduler) else None


SAMPLING_REMEDY = ("Ask for fewer steps, or sample with --scheduler dpmsolver++ (then it is sampled as an ordinary "
                   "diffusion model, which a student no longer is).")


def check_student_steps(scheduler, num_inference_steps: int, where: str = "--num_inference_steps",
                        remedy: str = SAMPLING_REMEDY) -> None:
    """A student samples on a subset of its distillation grid: more steps than the grid has are refused here,
    before anything is written (LCMScheduler would fail at the first call). `remedy` ends the message."""
    most = max_student_steps(scheduler)
    if most is not None and num_inference_steps > most:
        raise InputError(f"{where} {num_inference_steps}: this is a few-step (consistency-distilled) model whose "
                         f"LCMScheduler samples on a grid of {most} timesteps, so it takes 1 to {most} steps (its "
                         f"quality is meant for 1-8). {remedy}")


# --------------------------------------------------------------------------------------------
# The solver grid and the consistency function


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(-1, *([1] * (ndim - 1)))


class SolverGrid:
    """The teacher's noise schedule on LCMScheduler's grid: timesteps t_n = n * k - 1 (n = 1..N) and the step
    from each to t_n - k (clamped at 0, where the boundary condition makes the student the identity)."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int, device):
        num_train_timesteps = len(alphas_cumprod)
        self.skip = num_train_timesteps // num_ddim_timesteps
        self.timesteps = (torch.arange(1, num_ddim_timesteps + 1) * self.skip - 1).to(device)
        self.alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) timesteps of a batch: a uniform grid point and the point one solver step below it."""
        device = self.timesteps.device
        index = torch.randint(0, len(self.timesteps), (batch_size,), generator=generator, device=device)
        start = self.timesteps[index]
        return start, (start - self.skip).clamp(min=0)

    def alpha_bar(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        return _per_sample(self.alphas_cumprod[timesteps], ndim)


def clean_and_noise(output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor,
                    prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a model output at x_t, for each prediction type (as diffusers' schedulers read it)."""
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output, alpha * output + sigma * sample
    if prediction_type == "sample":
        return output, (sample - alpha * output) / sigma
    raise ValueError(f"Unknown prediction type {prediction_type!r}.")


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out of LCMScheduler at these timesteps (c_skip -> 1 and c_out -> 0 at t = 0)."""
    scaled = timesteps.to(torch.float32) * timestep_scaling
    denominator = scaled**2 + SIGMA_DATA**2
    return _per_sample(SIGMA_DATA**2 / denominator, ndim), _per_sample(scaled / denominator.sqrt(), ndim)


def model_output(model: Callable, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    result = model(sample, timesteps)
    return (result.sample if hasattr(result, "sample") else result).float()


def consistency_function(model: Callable, sample: torch.Tensor, timesteps: torch.Tensor, grid: SolverGrid,
                         prediction_type: str, timestep_scaling: float) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t): the clean sample the student (or target) maps x_t to."""
    clean, _ = clean_and_noise(model_output(model, sample, timesteps), sample.float(),
                               grid.alpha_bar(timesteps, sample.ndim), prediction_type)
    c_skip, c_out = boundary_scalings(timesteps, timestep_scaling, sample.ndim)
    return c_skip * sample.float() + c_out * clean


def ddim_step(teacher: Callable, sample: torch.Tensor, start: torch.Tensor, end: torch.Tensor, grid: SolverGrid,
              prediction_type: str) -> torch.Tensor:
    """The teacher's deterministic DDIM step of its probability-flow ODE from x_start to x_end."""
    clean, noise = clean_and_noise(model_output(teacher, sample, start), sample.float(),
                                   grid.alpha_bar(start, sample.ndim), prediction_type)
    alpha_bar_end = grid.alpha_bar(end, sample.ndim)
    return alpha_bar_end.sqrt() * clean + (1 - alpha_bar_end).sqrt() * noise


def distance(prediction: torch.Tensor, target: torch.Tensor, config: ConsistencyConfig) -> torch.Tensor:
    if config.loss_type == "l2":
        return torch.nn.functional.mse_loss(prediction, target)
    return (torch.sqrt((prediction - target) ** 2 + config.huber_c**2) - config.huber_c).mean()


class ConsistencyLoss:
    """The loss of one batch of clean samples. `teacher(x, t)` gives the (possibly guided) teacher's output;
    `target` is a frozen copy of the student that `sync_target` fills with the EMA weights before each batch."""

    def __init__(self, teacher: Callable, target: torch.nn.Module, scheduler, config: ConsistencyConfig, device,
                 autocast: Callable):
        self.teacher = teacher
        self.target = target
        self.config = config
        self.prediction_type = scheduler.config.prediction_type
        self.grid = SolverGrid(scheduler.alphas_cumprod, config.num_ddim_timesteps, device)
        self.autocast = autocast

    def __call__(self, student: Callable, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        start, end = self.grid.draw(len(clean), generator)
        alpha_bar = self.grid.alpha_bar(start, clean.ndim)
        noisy = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise
        prediction = consistency_function(student, noisy, start, self.grid, self.prediction_type,
                                          self.config.timestep_scaling)
        with torch.no_grad(), self.autocast():
            previous = ddim_step(self.teacher, noisy, start, end, self.grid, self.prediction_type)
            target = consistency_function(self.target, previous.to(noisy.dtype), end, self.grid, self.prediction_type,
                                          self.config.timestep_scaling)
        return distance(prediction, target, self.config)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the student of the same structure (LoRA layers included): the target network."""
    target = copy.deepcopy(model)
    return target.eval().requires_grad_(False)


def sync_target(ema, target: torch.nn.Module) -> None:
    """Fill the target network with the EMA of the student (the loop's EMA; restored exactly on resume)."""
    ema.copy_to(target.parameters())


# --------------------------------------------------------------------------------------------
# The teacher


def load_teacher(name_or_path: str, revision: str | None = None, variant: str | None = None):
    """The teacher, ready to sample: any model the trainers save (a latent pipeline, a DreamBooth result with its
    LoRA folded in, a pixel-space DDPMPipeline); a clear error for anything else, before anything is written."""
    from .first_stage import PixelSampler, load_saved_model, pipeline_class_name
    from .lora import holds_lora_adapter

    options = {key: value for key, value in (("revision", revision), ("variant", variant)) if value}
    source = str(name_or_path)
    local = os.path.isdir(source)
    if os.path.exists(source) and not local:
        raise InputError(f"--pretrained_model_name_or_path {source} is a file; the teacher must be a saved pipeline "
                         "folder (model_index.json with unet/ and scheduler/) or a hub id.")
    if local and not (Path(source) / "model_index.json").is_file() and not holds_lora_adapter(source):
        raise InputError(f"--pretrained_model_name_or_path {source} is not a saved pipeline (no model_index.json): "
                         "give the output folder of train_unconditional_latent.py or train_dreambooth_unconditional.py"
                         " (a LoRA result works too), not a checkpoint-N folder or a UNet folder.")
    is_pixel = pipeline_class_name(source) == "DDPMPipeline"
    try:
        teacher = load_saved_model(source, **options) if is_pixel else load_saved_model(source, fuse_lora=True,
                                                                                          **options)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise InputError(f"Could not load the teacher '{source}': {error}\n--pretrained_model_name_or_path must be a "
                         "pipeline this toolkit saved (a folder or hub id).") from error
    if is_student(teacher.scheduler):
        raise InputError(f"'{source}' is already a distilled student (its scheduler is {type(teacher.scheduler).__name__}"
                         "): distil its teacher instead, a model that samples its ODE with many steps.")
    if not isinstance(teacher, PixelSampler) and teacher.unet.config.get("num_class_embeds"):
        raise InputError(f"The teacher '{source}' is class-conditional; distill.py distils unconditional models.")
    return teacher


def teacher_resolution(teacher) -> int:
    """Image side the teacher samples: the UNet's sample size times the VAE's downsampling (1 in pixel space)."""
    from .vae import downsample_factor

    size = teacher.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return size * (downsample_factor(teacher.vae) if hasattr(teacher, "vae") else 1)


def guided_teacher(teacher, guidance=None) -> Callable:
    """The teacher as the distillation calls it: its UNet, or guided (`guidance`: a `uldm.guidance.Guidance`, the rule
    of `pipeline_latent_uncond.guided_model`), so that the student learns the guided teacher's ODE at one UNet call
    a step."""
    from pipeline_latent_uncond import guided_model

    unet = teacher.unet.eval().requires_grad_(False)
    if guidance is None:
        return unet
    return guided_model(unet, guidance.guide, guidance.scale, guidance.interval, teacher.scheduler)


# --------------------------------------------------------------------------------------------
# A LoRA student

ADAPTER_SCHEDULER_DIR = "scheduler"  # beside the adapter: the student's scheduler, applied when it is loaded


def save_student_adapter(unet, folder: str | os.PathLike, teacher: str, scheduler) -> None:
    """A LoRA student (LCM-LoRA): the adapter in diffusers' layout, naming `teacher` as its base, and the
    scheduler it samples with in scheduler/ (`uldm.lora.load_pipeline_or_adapter` applies it)."""
    from .lora import save_lora_result

    save_lora_result(unet, folder, base_model=teacher)
    scheduler.save_pretrained(Path(folder) / ADAPTER_SCHEDULER_DIR)
