"""The configuration of a training run: small frozen dataclasses with diffusers' argument names, which the
scripts build from their parsed arguments (`uldm.args.training_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .posthoc_ema import PosthocEmaConfig


@dataclass(frozen=True)
class LoopConfig:
    """The run: where it writes, how batches are formed, when it checkpoints (diffusers' argument names)."""

    output_dir: str
    seed: int = 0
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_epochs: int | None = None
    max_train_steps: int | None = None
    max_grad_norm: float = 1.0
    dataloader_num_workers: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    mixed_precision: str | None = None
    allow_tf32: bool = False
    report_to: str | None = "tensorboard"
    tracker_project_name: str | None = None
    logging_dir: str = "logs"  # TensorBoard's folder, inside output_dir unless absolute (diffusers' rule)
    overwrite_output_dir: bool = False  # a fresh run moves an earlier run's files aside instead of refusing
    logging_steps: int | None = None  # read-backs of the losses; None: 1 on the CPU, GPU_LOGGING_STEPS elsewhere


GPU_LOGGING_STEPS = 10


@dataclass(frozen=True)
class ComputeConfig:
    """How the training step runs (`uldm.args.add_compute_args`)."""

    torch_compile: bool = False  # inductor, through accelerate's dynamo plugin: the prepared model is compiled
    vae_precision: str = "auto"  # the frozen VAE's dtype (uldm.vae.vae_dtype_for); the trainers apply it


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    scale_lr: bool = False
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1  # cosine_with_restarts
    lr_power: float = 1.0  # polynomial
    use_8bit_adam: bool = False


@dataclass(frozen=True)
class EmaConfig:
    """diffusers' EMAModel with warm-up: decay 1 - (1 + step/inv_gamma)^-power, capped at max_decay."""

    ema_inv_gamma: float = 1.0
    ema_power: float = 3 / 4
    ema_max_decay: float = 0.9999


@dataclass(frozen=True)
class TrainingConfig:
    loop: LoopConfig
    optimizer: OptimizerConfig
    ema: EmaConfig | None = None  # None: no EMA
    posthoc_ema: PosthocEmaConfig | None = None  # None: no post-hoc EMA profiles
    compute: ComputeConfig = ComputeConfig()
    arguments: dict = field(default_factory=dict)  # the run's command-line arguments, for the records
