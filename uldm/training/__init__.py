"""The training package that every trainer shares, one module per reason to change:

* `config`: the run's configuration (LoopConfig, ComputeConfig, OptimizerConfig, EmaConfig, TrainingConfig).
* `launch`: the Accelerator and what it refuses before any work (an earlier run's checkpoints, processes that
  accelerate does not join, FSDP1), DeepSpeed's settings, logging, `start_run`; FSDP2's gathered weights.
* `builders`: the optimiser, the learning-rate schedule, the EMA, the number of steps.
* `records`: graceful stops (SIGTERM/SIGINT), metrics.jsonl and the trackers, losses read back from the device.
* `loop`: `TrainingLoop` and `build_training_loop`, the `Validation` callback with its `Schedule`.
* `checkpoints`: crash-safe, verified checkpoints; what they hold (`CheckpointContents`, one place); the
  keep-best policy. `posthoc_ema`: power-function EMA profiles, snapshots and their synthesis.

A script supplies `compute_loss(batch, generator)` and, optionally, a `Validation` and `save_result(model)`;
the names below are what scripts import (`from uldm.training import build_training_loop`).
"""

from .builders import (
    adamw_implementation, build_ema, build_lr_scheduler, build_optimizer, import_bitsandbytes, plan_steps,
    scaled_learning_rate,
)
from .config import GPU_LOGGING_STEPS, ComputeConfig, EmaConfig, LoopConfig, OptimizerConfig, TrainingConfig
from .launch import (
    RUN_ARGUMENTS_FILE, check_fsdp, configure_logging, is_fsdp, make_accelerator, refuse_independent_processes,
    refuse_to_overwrite_checkpoints, save_run_arguments, start_run, write_deepspeed_settings,
)
from .loop import (
    Schedule, TrainingLoop, Validation, ValidationRecord, ValidationResult, build_training_loop, finish_run,
)
from .records import METRICS_FILE, GracefulStop, MetricsWriter, StepRecords, read_metrics

__all__ = [
    "GPU_LOGGING_STEPS", "METRICS_FILE", "RUN_ARGUMENTS_FILE", "ComputeConfig", "EmaConfig", "GracefulStop",
    "LoopConfig", "MetricsWriter", "OptimizerConfig", "Schedule", "StepRecords", "TrainingConfig", "TrainingLoop",
    "Validation", "ValidationRecord", "ValidationResult", "adamw_implementation", "build_ema", "build_lr_scheduler",
    "build_optimizer", "build_training_loop", "check_fsdp", "configure_logging", "finish_run", "import_bitsandbytes",
    "is_fsdp", "make_accelerator", "plan_steps", "read_metrics", "refuse_independent_processes",
    "refuse_to_overwrite_checkpoints", "save_run_arguments", "scaled_learning_rate", "start_run",
    "write_deepspeed_settings",
]
