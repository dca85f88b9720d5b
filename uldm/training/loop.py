"""The training-loop core that every training script shares.

`TrainingLoop` owns what is the same in latent training, DreamBooth and VAE training: the
epochs and batches (sharded over processes, reproducible from the seed), gradient
accumulation, the optimiser and learning-rate schedule, EMA, logging, throughput, crash-safe
checkpoints, exact resume, graceful stops on SIGTERM/SIGINT and non-finite losses. A script
supplies only `compute_loss(batch, generator)` and, optionally, a `Validation`: a callback with
its schedule, whose sample grids and metrics the loop writes (PNG, TensorBoard, metrics.jsonl).
The loop is configured by small dataclasses (`LoopConfig`, `OptimizerConfig`, `EmaConfig`), which
the scripts build from their parsed arguments (`uldm.args.training_config`).

Exact resume rests on three rules: every random draw of a step comes from a generator seeded
by (seed, process, micro-batch number); the order of the data is a function of (seed, epoch);
and checkpoints are taken only at optimiser-step boundaries, where the micro-batch counter
says exactly which batch comes next.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoints as ckpt
from .checkpoints import TrainingState
from .data import EpochBatchSampler
from .errors import InputError, NonFiniteLossError
from .plots import plot_loss_curve
from .posthoc_ema import PosthocEmaConfig, build_posthoc_ema
from .saving import decided_by_main_process, processes_stop_together
from .testing import BatchTrace
from .validation import log_image_grid

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_ARGUMENTS_FILE = "training_args.json"


# --------------------------------------------------------------------------------------------
# Configuration


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


# --------------------------------------------------------------------------------------------
# Set-up


def refuse_to_overwrite_checkpoints(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> None:
    """A new run in a folder that holds an earlier run's checkpoints would replace and prune them."""
    if resume_from_checkpoint:
        return
    existing = ckpt.list_checkpoints(output_dir, warn_incomplete=False)
    if existing:
        raise InputError(
            f"--output_dir {output_dir} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in existing[-3:])}). Continue it with --resume_from_checkpoint latest, "
            "choose another --output_dir, or start over there with --overwrite_output_dir (which moves the earlier "
            "run's files aside, deleting nothing)."
        )


def make_accelerator(config: LoopConfig, compute: ComputeConfig = ComputeConfig()):
    """An Accelerator for the run; the LR schedule is stepped by the loop, once per optimiser step.

    Refuses (before any work) to start a new run over an earlier run's checkpoints (or, with
    `overwrite_output_dir`, moves that run's files aside: main process, the others wait), processes that
    accelerate does not join (torchrun without ACCELERATE_USE_CPU=1 on a machine without GPUs) and FSDP1."""
    if not config.overwrite_output_dir:
        refuse_to_overwrite_checkpoints(config.output_dir, config.resume_from_checkpoint)
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    from .testing import force_fsdp_if_asked

    output_dir = Path(config.output_dir)
    logging_dir = output_dir / config.logging_dir  # an absolute logging_dir stays as it is
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir))
    report_to = None if config.report_to in (None, "", "none") else config.report_to
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        mixed_precision=config.mixed_precision,
        log_with=report_to,
        project_config=project_config,
        step_scheduler_with_optimizer=False,
        # None leaves it to accelerate's config (ACCELERATE_DYNAMO_BACKEND); the loop handles a compiled model either way.
        dynamo_backend="inductor" if compute.torch_compile else None,
    )
    refuse_independent_processes(accelerator)
    force_fsdp_if_asked(accelerator)  # tests only (ULDM_TEST_FORCE_FSDP)
    check_fsdp(accelerator)
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None:
        write_deepspeed_settings(deepspeed_plugin.deepspeed_config, config)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.overwrite_output_dir and not config.resume_from_checkpoint:
        if accelerator.is_main_process:
            ckpt.set_aside_earlier_run(output_dir, logging_dir)
        accelerator.wait_for_everyone()
    return accelerator


def refuse_independent_processes(accelerator) -> None:
    """torchrun (or `accelerate launch --num_processes N` without --cpu) on a machine without GPUs: accelerate
    runs each process alone, so N "main" processes would train the same data into the same --output_dir."""
    world_size = int(os.environ.get("WORLD_SIZE") or 1)
    if world_size > 1 and accelerator.num_processes != world_size:
        raise InputError(
            f"{world_size} processes were started (WORLD_SIZE={world_size}), but accelerate runs each one alone "
            f"({accelerator.distributed_type}): without a GPU it needs ACCELERATE_USE_CPU=1 to join them, and "
            "otherwise every process would train on its own and write the same --output_dir. On CPUs: "
            "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N ...; on GPUs, check that torch sees them "
            "(python -c 'import torch; print(torch.cuda.device_count())')."
        )


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp(accelerator) -> None:
    """FSDP2 only (FSDP1's resume was not exact and its flat parameters break EMA and clipping of a subset:
    docs/fsdp_notes.md); say so when FSDP was asked for and accelerate quietly runs without it (on CPUs)."""
    if is_fsdp(accelerator) and not accelerator.is_fsdp2:
        raise InputError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config "
                         "(configs/accelerate/fsdp.yaml does), or use DDP (configs/accelerate/multi_gpu.yaml).")
    if not is_fsdp(accelerator) and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1"):
        logger.warning("FSDP was asked for (ACCELERATE_USE_FSDP=%s), but accelerate runs %s: it uses FSDP only "
                       "on GPUs, so this run trains without sharding.", os.environ["ACCELERATE_USE_FSDP"],
                       accelerator.distributed_type)


def write_deepspeed_settings(deepspeed_config: dict, config: LoopConfig) -> None:
    """What DeepSpeed cannot infer: the loop builds its own sharded loader (not passed to prepare), and the
    clipping threshold always (accelerate fills "auto" with 1.0 at prepare; DeepSpeed clips only above 0, so
    --max_grad_norm 0 must reach it as 0.0)."""
    deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
    deepspeed_config["gradient_clipping"] = float(config.max_grad_norm or 0.0)


def configure_logging(accelerator) -> None:
    import datasets
    import diffusers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        logging.getLogger().setLevel(logging.ERROR)
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def start_run(config: TrainingConfig):
    """The accelerator of a training run, with logging configured, every process seeded and the run's
    arguments saved (main process)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config.loop, config.compute)
    configure_logging(accelerator)
    set_seed(config.loop.seed)
    if accelerator.is_main_process:
        save_run_arguments(config.arguments, config.loop.output_dir)
    return accelerator


def save_run_arguments(arguments: dict, output_dir: str | os.PathLike) -> Path:
    """The arguments of this run, as JSON, for reproducing it (also copied into the model card)."""
    path = Path(output_dir) / RUN_ARGUMENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(arguments, indent=2, sort_keys=True, default=str))
    return path


def scaled_learning_rate(config: TrainingConfig, num_processes: int) -> float:
    optimizer, loop = config.optimizer, config.loop
    if optimizer.scale_lr:
        return optimizer.learning_rate * loop.gradient_accumulation_steps * loop.train_batch_size * num_processes
    return optimizer.learning_rate


def adamw_implementation(device: torch.device | str) -> dict:
    """AdamW's fastest exact implementation for parameters on `device`: fused (one kernel for all parameters)
    where torch has it for the device, else foreach (one kernel per operation over all of them). Both compute
    what the single-tensor loop does, up to rounding (bench/bench_compile.py --parts optimizer compares them)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        fused_devices = _get_fused_kernels_supported_devices()
    except ImportError:  # a private helper: if it moves, the always-supported choice
        fused_devices = []
    return {"fused": True} if torch.device(device).type in fused_devices else {"foreach": True}


def import_bitsandbytes():
    """bitsandbytes for --use_8bit_adam; checked again before anything is written (`uldm.args.check_common_args`)."""
    try:
        import bitsandbytes
    except ImportError:
        raise InputError("--use_8bit_adam needs bitsandbytes (a CUDA GPU): `pip install bitsandbytes`, or "
                         "leave the flag out (AdamW in 32 bits).") from None
    return bitsandbytes


def build_optimizer(params, config: OptimizerConfig, learning_rate: float, device: torch.device | str = "cpu"):
    """AdamW (fused or foreach for parameters on `device`, where training runs), or bitsandbytes' 8-bit AdamW."""
    optimizer_class, implementation = torch.optim.AdamW, None
    if config.use_8bit_adam:
        optimizer_class = import_bitsandbytes().optim.AdamW8bit
    else:
        implementation = adamw_implementation(device)
    return optimizer_class(
        params,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        **(implementation or {}),
    )


def build_lr_scheduler(optimizer, config: OptimizerConfig, max_train_steps: int):
    """The schedule counts optimiser steps, whatever the accumulation and number of processes
    (the loop steps it once per optimiser step; diffusers #8384)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_train_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )


def build_ema(model, config: EmaConfig | None):
    """diffusers' EMAModel with warm-up (decay 1 - (1 + step/inv_gamma)^-power, capped); None without EMA."""
    if config is None:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(
        model.parameters(),
        decay=config.ema_max_decay,
        use_ema_warmup=True,
        foreach=True,  # one kernel per operation over all tensors; the default loop's arithmetic up to rounding
        inv_gamma=config.ema_inv_gamma,
        power=config.ema_power,
        model_cls=type(model),
        model_config=model.config,
    )


def plan_steps(num_items: int, config: LoopConfig, num_processes: int) -> int:
    """max_train_steps, from --max_train_steps or --num_epochs."""
    if config.max_train_steps:
        return config.max_train_steps
    batches_per_epoch = EpochBatchSampler(num_items, config.train_batch_size, num_processes).batches_per_epoch()
    return math.ceil(config.num_epochs * batches_per_epoch / config.gradient_accumulation_steps)


# --------------------------------------------------------------------------------------------
# Signals


class GracefulStop:
    """First SIGTERM/SIGINT: finish the step, save a checkpoint and exit. Second: stop at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt(f"Second {signal.Signals(signum).name}: stopping at once.")
        self.requested = True
        logger.warning(
            "Received %s: saving a checkpoint at the end of this step, then stopping. "
            "Send it again to stop at once (without saving).",
            signal.Signals(signum).name,
        )

    def install(self) -> "GracefulStop":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners): no handler
            self._previous = {}
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# --------------------------------------------------------------------------------------------
# Metrics


class MetricsWriter:
    """Writes each logged step to the trackers (TensorBoard/wandb) and to metrics.jsonl (main only)."""

    def __init__(self, accelerator, output_dir: str | os.PathLike, resume_step: int = 0):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self.output_dir = Path(output_dir)
        self._lines_written = 0
        self._lines_plotted = -1
        if accelerator.is_main_process and self.path.exists():
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """On resume (or restart) drop lines logged after `step`: they would be logged again."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, values: dict, step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
            self._lines_written += 1

    def plot(self) -> Path | None:
        """Redraw loss_curve.png from metrics.jsonl; nothing to do when nothing was logged since the last time."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return None
        curve = self.output_dir / "loss_curve.png"
        if self._lines_plotted == self._lines_written and curve.exists():
            return curve
        self._lines_plotted = self._lines_written
        return plot_loss_curve(self.path, curve)


def read_metrics(output_dir: str | os.PathLike, having: str | None = None) -> list[dict]:
    """The rows of metrics.jsonl, oldest first; only those with the key `having` if given (e.g. "loss": the
    training steps, not the validation rows)."""
    path = Path(output_dir) / METRICS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if having is None or having in row]


# --------------------------------------------------------------------------------------------
# Losses kept on the device between read-backs


def _device_scalar(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean().to(device)
    # non_blocking: a blocking copy to a GPU waits for the queued work (PyTorch synchronises after it)
    return torch.tensor(float(value)).to(device, non_blocking=True)


class StepRecords:
    """The loss and logged values of every micro-batch since the last read-back, kept on the device so that
    training never waits for them; `read_back` fetches them all at once (after one all-reduce over the
    processes) and gives one row per optimiser step, and the first micro-batch whose values were not finite."""

    def __init__(self):
        self.names: list[str] | None = None
        self._rows: list[torch.Tensor] = []
        self._where: list[tuple[int, int]] = []  # (optimiser step, micro-batch number) of each row
        self._steps: list[dict] = []  # host values of each finished step

    def add(self, loss: torch.Tensor, logs: dict, step: int, micro_batch: int) -> None:
        names = list(logs)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"compute_loss returned the logged values {names}, earlier {self.names}: keep them the same.")
        values = [loss.detach().float().mean()] + [_device_scalar(value, loss.device) for value in logs.values()]
        self._rows.append(torch.stack(values))
        self._where.append((step, micro_batch))

    def end_step(self, step: int, **host_values) -> None:
        self._steps.append({"step": step, **host_values})

    def __len__(self) -> int:
        return len(self._steps)

    def read_back(self, accelerator) -> tuple[list[dict], tuple[int, int] | None]:
        """(rows {"step", "loss", logged means over the step's micro-batches and the processes, host values},
        (step, micro-batch) of the first non-finite value on any process, or None). Every process calls it at
        the same step: the all-reduce is a collective."""
        if not self._rows:
            return [], None
        values = torch.stack(self._rows)
        values = accelerator.reduce(values, reduction="mean")  # NaN anywhere stays NaN
        host = values.tolist()  # the one device-to-host copy of the interval
        first_bad = next((where for where, row in zip(self._where, host) if not all(map(math.isfinite, row))), None)
        per_step: dict[int, list[list[float]]] = {}
        for (step, _), row in zip(self._where, host):
            per_step.setdefault(step, []).append(row)
        rows = []
        for values_of_step in self._steps:
            micro_batches = per_step[values_of_step["step"]]
            means = [sum(column) / len(column) for column in zip(*micro_batches)]
            rows.append({"step": values_of_step["step"], "loss": means[0], **values_of_step,
                         **dict(zip(self.names or [], means[1:]))})
        self._rows, self._where, self._steps = [], [], []
        return rows, first_bad


def host_process_group(accelerator):
    """A process group whose collectives run on the host (gloo) for agreeing on flags without waiting for the
    device: the default group when it is gloo (CPU runs), else a new one (NCCL runs). None for one process;
    every process must call this (creating a group is a collective)."""
    import torch.distributed as dist

    if accelerator.num_processes < 2 or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _full_tensor(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter as a whole tensor: FSDP2's DTensor shards gathered (a collective: every process), others as they
    are; requires_grad kept (diffusers' EMA averages the parameters that require gradients, copies the others)."""
    if not hasattr(parameter, "full_tensor"):
        return parameter
    with torch.no_grad():
        full = parameter.full_tensor()
    return full.requires_grad_(parameter.requires_grad)


# --------------------------------------------------------------------------------------------
# Validation


@dataclass
class ValidationResult:
    """What a validation returns on the main process: sample grids (tag -> NHWC floats in [0, 1], written as
    samples/<tag>_<step>.png and to the trackers) and numbers (logged to metrics.jsonl and the trackers)."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Schedule:
    """Every `every_steps` optimiser steps and/or at the end of every `every_epochs`-th epoch (0: never);
    the end of training is handled apart."""

    every_steps: int = 0
    every_epochs: int = 0

    def due(self, step: int, epochs_ended: range, max_train_steps: int) -> bool:
        if step >= max_train_steps:
            return False
        by_step = bool(self.every_steps) and step % self.every_steps == 0
        return by_step or (bool(self.every_epochs) and any(e % self.every_epochs == 0 for e in epochs_ended))


@dataclass
class Validation:
    """`run(step)` on its `schedule` and when training finishes; with `at_start`, also before the first step
    of a fresh run (e.g. the base model of a fine-tune). It is called on every process (so it may share work
    between them) and returns a ValidationResult on the main one."""

    run: Callable[[int], ValidationResult | None]
    schedule: Schedule = Schedule()
    at_start: bool = False
    # A metric of the results, lower is better (e.g. "fid"): the checkpoint of its best step is kept safe from
    # --checkpoints_total_limit (saved at that step if none was due there).
    keep_best: str | None = None


@dataclass
class ValidationRecord:
    """The newest validation's files and numbers (for model cards); grids of earlier steps stay on disk."""

    step: int = -1
    grids: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The loop


class TrainingLoop:
    """Runs the optimisation; see the module docstring.

    `model`, `optimizer` must already be prepared by `accelerator.prepare`; the LR scheduler and
    EMA are registered here for checkpointing. `compute_loss(batch, generator)` returns either a
    scalar loss or (loss, {name: scalar tensor}) for extra logged values.

    The losses stay on the device and are read back every `logging_steps` optimiser steps and before
    anything is written (checkpoint, validation, result, post-hoc EMA snapshot, stop); a non-finite one
    then stops the run, so nothing trained from it is ever saved. `averaged_path` names the submodule of
    the model that the EMAs average ("" the whole model). Under FSDP2, `unsharded_copy` is a plain copy
    of the model made before it was sharded: validation and the result get it with the gathered weights.
    """

    def __init__(self, accelerator, config: LoopConfig, model, optimizer, lr_scheduler, dataset,
                 max_train_steps: int, ema=None, validation: Validation | None = None,
                 save_result: Callable[[Any], None] | None = None, save_schedule: Schedule = Schedule(),
                 posthoc_ema=None, averaged_path: str = "", unsharded_copy=None):
        self.accelerator = accelerator
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.ema = ema
        self.dataset = dataset
        self.max_train_steps = max_train_steps
        self.validation = validation
        self.save_result_with = save_result
        self.save_schedule = save_schedule
        self.posthoc_ema = posthoc_ema
        self.last_validation = ValidationRecord()
        self.best: tuple[int, float] | None = None  # (step, value) of Validation.keep_best's best so far
        self.output_dir = Path(config.output_dir)
        self.state = TrainingState(
            train_batch_size=config.train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            num_processes=accelerator.num_processes,
        )
        self.sampler = EpochBatchSampler(
            len(dataset), config.train_batch_size, accelerator.num_processes, accelerator.process_index,
            seed=config.seed,
        )
        self.stop = GracefulStop()
        self.metrics: MetricsWriter | None = None
        self.averaged_path = averaged_path
        self.fsdp = is_fsdp(accelerator)
        self.unsharded_copy = unsharded_copy
        if self.fsdp and unsharded_copy is None:
            raise ValueError("Under FSDP the loop needs an unsharded copy of the model (build_training_loop makes it).")
        self.logging_steps = config.logging_steps or (1 if accelerator.device.type == "cpu" else GPU_LOGGING_STEPS)
        # Images per optimiser step, all processes together.
        self.global_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        self.num_workers = self._loader_workers()
        self._host_group = host_process_group(accelerator)
        accelerator.register_for_checkpointing(lr_scheduler)
        if ema is not None:
            ema.to(accelerator.device)
            accelerator.register_for_checkpointing(ema)
        if posthoc_ema is not None:
            accelerator.register_for_checkpointing(posthoc_ema)

    # ---- properties -------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def unwrapped_model(self):
        """The trained module itself (under FSDP2: its sharded parameters are DTensors), never torch.compile's wrapper."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _averaged_parameters(self) -> list[torch.Tensor]:
        """The parameters the EMAs average, whole (gathered under FSDP2: every process must call this)."""
        return [_full_tensor(p) for p in self.unwrapped_model.get_submodule(self.averaged_path).parameters()]

    def _parameters(self):
        return [p for p in self.unwrapped_model.parameters() if p.requires_grad]

    # ---- randomness -------------------------------------------------------------------------

    def step_generator(self) -> torch.Generator:
        """Generator for this micro-batch's noise, timesteps, flips: seeded by (seed, rank, micro-batch)."""
        seed = (self.config.seed * 1_000_003 + self.accelerator.process_index) * 1_000_000_007
        seed = (seed + self.state.micro_batches) % (2**63 - 1)
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    # ---- checkpoints ------------------------------------------------------------------------

    def resume(self) -> None:
        """Restore the checkpoint that --resume_from_checkpoint names (if any), then open metrics.jsonl at the
        step training goes on from (lines logged after it are dropped: they are logged again)."""
        self._restore(self.config.resume_from_checkpoint)
        self.metrics = MetricsWriter(self.accelerator, self.output_dir, resume_step=self.global_step)
        self._find_best_checkpoint()

    def _restore(self, resume_from_checkpoint: str | None) -> None:
        path = ckpt.restore_checkpoint(self.accelerator, resume_from_checkpoint, self.output_dir)
        if path is None:
            if resume_from_checkpoint:
                logger.info("No complete checkpoint in %s yet; starting a new run.", self.output_dir)
            return
        logger.info("Resuming from %s", path)
        saved = TrainingState.load(path)
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        self.state.global_step = saved.global_step
        self.state.samples_seen = saved.samples_seen
        same_layout = (saved.train_batch_size, saved.gradient_accumulation_steps, saved.num_processes) == (
            self.state.train_batch_size, self.state.gradient_accumulation_steps, self.state.num_processes
        )
        if same_layout:
            self.state.micro_batches = saved.micro_batches
        else:
            global_batch = self.config.train_batch_size * self.accelerator.num_processes
            self.state.micro_batches = math.ceil(saved.samples_seen / global_batch)
            logger.warning(
                "The batch size, accumulation or number of processes changed since %s; training goes on "
                "from the same number of images seen, but the batches will not be the ones an "
                "uninterrupted run would have seen.", path.name,
            )
        # accelerate decides when to sync gradients from its own micro-step counter.
        self.accelerator.step = self.state.micro_batches

    def save_checkpoint(self) -> Path:
        """Every process writes into a temporary folder; the main one publishes it when all are done.
        A failed write (full disk) on any process raises SaveError on all of them (see uldm.checkpoints)."""
        arguments = self.output_dir / RUN_ARGUMENTS_FILE

        def copy_run_arguments(folder: Path) -> None:
            if arguments.is_file():
                shutil.copyfile(arguments, folder / arguments.name)

        return ckpt.save_checkpoint(self.accelerator, self.output_dir, self.state,
                                    self.config.checkpoints_total_limit, write_extra=copy_run_arguments)

    @property
    def epochs_completed(self) -> int:
        """Whole passes over the data so far (e.g. for naming a --save_model_epochs save)."""
        return self.state.micro_batches // self.sampler.batches_per_epoch()

    @property
    def finished(self) -> bool:
        return self.global_step >= self.max_train_steps

    # ---- EMA --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def ema_weights(self):
        """The model with the EMA weights swapped in for the block; the live weights always come back. Under
        FSDP2 the unsharded copy (filled by validate()/save_result(), which call the callbacks using this)."""
        model = self.unsharded_copy if self.fsdp else self.unwrapped_model
        if self.ema is None:
            yield model
            return
        parameters = list(model.get_submodule(self.averaged_path).parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield model
        finally:
            self.ema.restore(parameters)

    @contextlib.contextmanager
    def _unsharded(self):
        """Under FSDP2: the unsharded copy on the device holding the live weights, for the block (a sharded model
        must not run on the main process alone: its forward all-gathers). Every process calls this (gathering is
        a collective); the copy goes back to the CPU after."""
        if not self.fsdp:
            yield
            return
        plain, sharded = self.unsharded_copy.to(self.accelerator.device), self.unwrapped_model
        with torch.no_grad():
            for (name, target), (sharded_name, source) in zip(plain.named_parameters(), sharded.named_parameters()):
                assert name == sharded_name, f"{name} != {sharded_name}: the copy is not of this model"
                target.copy_(_full_tensor(source))
            for target, source in zip(plain.buffers(), sharded.buffers()):
                target.copy_(source)
        try:
            yield
        finally:
            self.unsharded_copy.to("cpu")

    # ---- the result -------------------------------------------------------------------------

    def save_result(self) -> None:
        """`save_result(model)` of the script, with the EMA weights swapped in, on every process (it writes on
        the main one): at the end of training and on the save schedule (e.g. --save_model_epochs)."""
        if self.save_result_with is None:
            return
        with self._unsharded(), self.ema_weights() as model, processes_stop_together(
                self.accelerator, "the trained model", self.output_dir, remedy=partial(ckpt.final_save_remedy, self.output_dir)):
            self.save_result_with(model)

    # ---- the best checkpoint (Validation.keep_best) ------------------------------------------

    def _find_best_checkpoint(self) -> None:
        """On (re)start: the best validation so far, among the steps up to where training goes on whose
        checkpoint exists; its record is rewritten to match (main process)."""
        key = self.validation.keep_best if self.validation is not None else None
        if key is None or not self.accelerator.is_main_process:
            return
        rows = read_metrics(self.output_dir, having=key) if self.metrics.path.exists() else []
        rows = [row for row in rows if 0 < row["step"] <= self.global_step and isinstance(row[key], (int, float))
                and math.isfinite(row[key])
                and (self.output_dir / f"checkpoint-{row['step']}").is_dir()]
        if rows:
            row = min(rows, key=lambda row: row[key])
            self.best = (row["step"], row[key])
            ckpt.protect_checkpoint(self.output_dir, row["step"], **{key: row[key]})
        else:
            ckpt.unprotect_checkpoints(self.output_dir)

    def _keep_if_best(self, step: int) -> None:
        """After a validation: a new best value of `keep_best` protects this step's checkpoint from pruning
        (saving one first if none was due at this step). Every process takes part (the save is collective)."""
        key = self.validation.keep_best
        if key is None or step == 0:
            return

        def decide() -> tuple[bool, bool, float | None]:
            value = self.last_validation.metrics.get(key) if self.last_validation.step == step else None
            new_best = value is not None and math.isfinite(value) and (self.best is None or value < self.best[1])
            return new_best, (self.output_dir / f"checkpoint-{step}").is_dir(), value

        new_best, has_checkpoint, value = decided_by_main_process(self.accelerator, decide)
        if not new_best:
            return
        if not has_checkpoint:
            self.save_checkpoint()
        if self.accelerator.is_main_process:
            self.best = (step, value)
            ckpt.protect_checkpoint(self.output_dir, step, **{key: value})
            ckpt.prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit)  # the previous best may go now
            logger.info("Best %s so far (%.4g) at step %d: checkpoint-%d is kept from pruning.", key, value, step, step)

    # ---- validation -------------------------------------------------------------------------

    def validate(self, step: int) -> ValidationRecord:
        """Run the validation callback on every process and write what it returns (main process)."""
        with self._unsharded():
            result = self.validation.run(step) if self.validation is not None else None
        if result is not None and self.accelerator.is_main_process:
            grids = {tag: log_image_grid(self.accelerator, images, step, self.output_dir, tag=tag)
                     for tag, images in result.images.items()}
            grids = {tag: path for tag, path in grids.items() if path is not None}  # None: not written (full disk)
            if result.metrics:
                self.metrics.log(dict(result.metrics), step=step)
            self.last_validation = ValidationRecord(step, grids, dict(result.metrics))
        return self.last_validation

    # ---- the loop ---------------------------------------------------------------------------

    def _agree_on_stop(self) -> bool:
        """Whether any process was asked to stop (SIGTERM/SIGINT), the same answer on all: one all-reduce of one
        int per optimiser step over a host (gloo) group, which never waits for the device."""
        if self._host_group is None:
            return self.stop.requested
        import torch.distributed as dist

        flag = torch.tensor([int(self.stop.requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host_group)
        return bool(flag.item())

    def _read_back(self, records: StepRecords, progress) -> None:
        """Log the steps since the last read-back (one metrics row each); stop on a non-finite value."""
        now = time.perf_counter()
        images_per_sec = self.global_batch * len(records) / max(now - self._interval_start, 1e-9)
        self._interval_start = now
        rows, first_bad = records.read_back(self.accelerator)
        for row in rows:
            if first_bad is not None and row["step"] >= first_bad[0]:
                break
            step = row.pop("step")
            values = {"loss": row.pop("loss"), "lr": row.pop("lr"), "images_per_sec": images_per_sec, **row}
            self.metrics.log(values, step=step)
            progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        if first_bad is not None:
            raise NonFiniteLossError(self._nonfinite_message(*first_bad))

    def _loader_workers(self) -> int:
        """--dataloader_num_workers, except for a latent cache read in whole batches (`gather`): copying its
        batches between processes costs more than reading them (bench/bench_data.py: 72k latents/s in the
        training process, 16-22k with 1-2 workers), so it is read in the training process."""
        if self.config.dataloader_num_workers and hasattr(self.dataset, "gather"):
            logger.info("Reading the latent cache in the training process (--dataloader_num_workers %d is for "
                        "decoding images; cached latents are faster without workers).",
                        self.config.dataloader_num_workers)
            return 0
        return self.config.dataloader_num_workers

    def _loader(self) -> DataLoader:
        batches_per_epoch = self.sampler.batches_per_epoch()
        epoch, start = divmod(self.state.micro_batches, batches_per_epoch)
        self.sampler.set_position(epoch, start)
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = epoch
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
        )

    def run(self, compute_loss: Callable) -> bool:
        """Train to `max_train_steps`, validating and saving the result as scheduled. Returns False if stopped
        early by a signal (checkpoint saved; no final validation or result), True when training finished (final
        validation done, result saved)."""
        config, accelerator = self.config, self.accelerator
        if self.metrics is None:
            raise RuntimeError("TrainingLoop.resume() must be called before run().")
        if self.validation is not None and self.validation.at_start and self.global_step == 0:
            self.validate(0)
        self.stop.install()
        progress = tqdm(total=self.max_train_steps, initial=self.global_step, desc="Training",
                        disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        records = StepRecords()
        micro_batches_this_step = 0
        trace = BatchTrace(accelerator.process_index)
        self._interval_start = time.perf_counter()
        try:
            while self.global_step < self.max_train_steps:
                for batch in self._loader():
                    trace.record(batch, self.global_step + 1)
                    batch = send_to_device(batch, accelerator.device, non_blocking=True)
                    generator = self.step_generator()
                    with accelerator.accumulate(self.model):
                        result = compute_loss(batch, generator)
                        loss, logs = result if isinstance(result, tuple) else (result, {})
                        records.add(loss, logs, self.global_step + 1, self.state.micro_batches + 1)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and config.max_grad_norm:
                            accelerator.clip_grad_norm_(self._parameters(), config.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self.state.micro_batches += 1
                    micro_batches_this_step += 1
                    if not accelerator.sync_gradients:
                        continue

                    self.lr_scheduler.step()
                    averaged = self._averaged_parameters() if self.ema or self.posthoc_ema else None
                    if self.ema is not None:
                        self.ema.step(averaged)
                    epochs_before = (self.state.micro_batches - micro_batches_this_step) // self.sampler.batches_per_epoch()
                    micro_batches_this_step = 0
                    epochs_ended = range(epochs_before + 1, self.state.micro_batches // self.sampler.batches_per_epoch() + 1)
                    self.state.global_step += 1
                    self.state.samples_seen += self.global_batch
                    trace.record(None, self.global_step, self.model)
                    records.end_step(self.global_step, lr=self.lr_scheduler.get_last_lr()[0],
                                     epoch=self.state.micro_batches / self.sampler.batches_per_epoch(),
                                     **({"ema_decay": float(self.ema.cur_decay_value or 0.0)} if self.ema else {}))
                    progress.update(1)
                    stop_requested = self._agree_on_stop()

                    done = self.global_step >= self.max_train_steps
                    checkpoint_due = bool(config.checkpointing_steps) and (
                        self.global_step % config.checkpointing_steps == 0 or done)
                    validation_due = self.validation is not None and self.validation.schedule.due(
                        self.global_step, epochs_ended, self.max_train_steps)
                    save_due = self.save_schedule.due(self.global_step, epochs_ended, self.max_train_steps)
                    snapshot_due = self.posthoc_ema is not None and (
                        done or self.posthoc_ema.snapshot_due(self.global_step))
                    # Nothing is written from weights that a non-finite loss may have touched: read the losses
                    # back (and stop on one) before any checkpoint, validation, result or snapshot.
                    if (self.global_step % self.logging_steps == 0 or done or stop_requested or checkpoint_due
                            or validation_due or save_due or snapshot_due):
                        self._read_back(records, progress)
                    if self.posthoc_ema is not None:
                        self.posthoc_ema.step(averaged, self.global_step)  # writes the snapshots when due
                        if done:
                            self.posthoc_ema.save_snapshots()
                    if checkpoint_due:
                        self.save_checkpoint()
                        self.metrics.plot()
                    if validation_due:
                        self.validate(self.global_step)
                        self._keep_if_best(self.global_step)
                    if save_due:
                        self.save_result()
                    if stop_requested:
                        if not checkpoint_due:
                            self.save_checkpoint()
                        self.metrics.plot()
                        if accelerator.is_main_process:
                            logger.warning(
                                "Stopped at step %d on request. Resume with the same command plus "
                                "--resume_from_checkpoint latest", self.global_step,
                            )
                        return False
                    if done:
                        break
        finally:
            progress.close()
            self.stop.uninstall()
        if self.validation is not None:
            self.validate(self.global_step)
            self._keep_if_best(self.global_step)
        self.metrics.plot()
        self.save_result()
        return True

    def _nonfinite_message(self, step: int, micro_batch: int) -> str:
        latest = ckpt.latest_checkpoint(self.output_dir)
        where = f"The last checkpoint, {latest}, is intact" if latest else "No checkpoint had been saved yet"
        return (
            f"The loss became NaN or infinite at step {step} (micro-batch {micro_batch}); the run stopped before "
            f"saving anything trained from it. {where}. Try a lower --learning_rate, --max_grad_norm 1.0, "
            "--mixed_precision bf16/no instead of fp16 or --vae_precision fp32, then resume with "
            "--resume_from_checkpoint latest."
        )


def build_training_loop(accelerator, config: TrainingConfig, model, train_set, tracker_name: str,
                        parameters=None, ema_model=None, validation: Validation | None = None,
                        save_result: Callable[[Any], None] | None = None,
                        save_schedule: Schedule = Schedule()) -> TrainingLoop:
    """A TrainingLoop for `model` with the run's optimiser, schedule, EMA and trackers, resumed per the config.

    `parameters` (default: all of the model's) are optimised; `ema_model` (default: `model`) is averaged.
    `save_result(model)` writes the run's result (called with the EMA weights swapped in, on every process,
    at the end and on `save_schedule`). The model is prepared by accelerate: train through `loop.model`.
    """
    max_train_steps = plan_steps(len(train_set), config.loop, accelerator.num_processes)
    parameters = model.parameters() if parameters is None else parameters
    optimizer = build_optimizer(parameters, config.optimizer, scaled_learning_rate(config, accelerator.num_processes),
                                accelerator.device)
    lr_scheduler = build_lr_scheduler(optimizer, config.optimizer, max_train_steps)
    averaged = model if ema_model is None else ema_model
    averaged_path = submodule_path(model, averaged)
    # Built before prepare, so that under FSDP2 the EMAs hold whole tensors, the same on every process.
    ema = build_ema(averaged, config.ema)
    posthoc_ema = build_posthoc_ema(averaged, config.posthoc_ema, accelerator, max_train_steps, config.loop.output_dir)
    unsharded_copy = copy.deepcopy(model).to("cpu") if is_fsdp(accelerator) else None
    model, optimizer = accelerator.prepare(model, optimizer)  # compiles the model too with --torch_compile
    if accelerator.is_main_process:
        accelerator.init_trackers(
            config.loop.tracker_project_name or tracker_name,
            config={k: v for k, v in config.arguments.items() if isinstance(v, (int, float, str, bool))},
        )
    loop = TrainingLoop(accelerator, config.loop, model, optimizer, lr_scheduler, train_set, max_train_steps,
                        ema=ema, validation=validation, save_result=save_result, save_schedule=save_schedule,
                        posthoc_ema=posthoc_ema, averaged_path=averaged_path, unsharded_copy=unsharded_copy)
    loop.resume()
    logger.info(
        "Training %d steps from step %d: %d items, batch %d x %d processes x %d accumulation",
        max_train_steps, loop.global_step, len(train_set), config.loop.train_batch_size, accelerator.num_processes,
        config.loop.gradient_accumulation_steps,
    )
    return loop


def submodule_path(model, submodule) -> str:
    """The name of `submodule` inside `model` ("" for the model itself), for finding it again after wrapping."""
    for name, module in model.named_modules():
        if module is submodule:
            return name
    raise ValueError("ema_model must be the model or one of its submodules.")


def finish_run(loop: TrainingLoop) -> None:
    """The end of every training run: every process waits for the others, then the trackers close."""
    loop.accelerator.wait_for_everyone()
    loop.accelerator.end_training()
