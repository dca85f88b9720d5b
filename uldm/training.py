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
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
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
            "or choose another --output_dir (delete the checkpoints yourself to start over there)."
        )


def make_accelerator(config: LoopConfig):
    """An Accelerator for the run; the LR schedule is stepped by the loop, once per optimiser step.

    Refuses (before any work) to start a new run over an earlier run's checkpoints."""
    refuse_to_overwrite_checkpoints(config.output_dir, config.resume_from_checkpoint)
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    output_dir = Path(config.output_dir)
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    report_to = None if config.report_to in (None, "", "none") else config.report_to
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        mixed_precision=config.mixed_precision,
        log_with=report_to,
        project_config=project_config,
        step_scheduler_with_optimizer=False,
    )
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None:
        # The loop builds its own sharded loader (not passed to prepare), so DeepSpeed cannot infer this.
        deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
        if config.max_grad_norm:
            deepspeed_plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


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

    accelerator = make_accelerator(config.loop)
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


def build_optimizer(params, config: OptimizerConfig, learning_rate: float):
    optimizer_class = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError:
            raise InputError("--use_8bit_adam needs bitsandbytes (a CUDA GPU): `pip install bitsandbytes`, or "
                             "leave the flag out (AdamW in 32 bits).") from None
        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(
        params,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
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
    """

    def __init__(self, accelerator, config: LoopConfig, model, optimizer, lr_scheduler, dataset,
                 max_train_steps: int, ema=None, validation: Validation | None = None,
                 save_result: Callable[[Any], None] | None = None, save_schedule: Schedule = Schedule(),
                 posthoc_ema=None):
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
        return self.accelerator.unwrap_model(self.model)

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
        path = ckpt.resolve_resume_path(resume_from_checkpoint, self.output_dir)
        if path is None:
            if resume_from_checkpoint:
                logger.info("No complete checkpoint in %s yet; starting a new run.", self.output_dir)
            return
        logger.info("Resuming from %s", path)
        self.accelerator.load_state(str(path))
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
        """Every process writes into a temporary folder; the main one publishes it when all are done."""
        accelerator = self.accelerator
        temp_dir = ckpt.temporary_checkpoint_dir(self.output_dir, self.global_step)
        if accelerator.is_main_process and temp_dir.exists():
            shutil.rmtree(temp_dir)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temp_dir))
        accelerator.wait_for_everyone()
        final = self.output_dir / f"checkpoint-{self.global_step}"
        if accelerator.is_main_process:
            arguments = self.output_dir / RUN_ARGUMENTS_FILE
            if arguments.is_file():
                shutil.copyfile(arguments, temp_dir / arguments.name)
            self.state.save(temp_dir)  # written last: marks the checkpoint complete
            final = ckpt.publish_checkpoint(temp_dir, self.output_dir, self.global_step)
            ckpt.prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
            logger.info("Saved %s", final)
        accelerator.wait_for_everyone()
        return final

    # ---- EMA --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the EMA weights into the model for the block; the live weights always come back."""
        if self.ema is None:
            yield self.unwrapped_model
            return
        parameters = list(self.unwrapped_model.parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield self.unwrapped_model
        finally:
            self.ema.restore(parameters)

    # ---- the result -------------------------------------------------------------------------

    def save_result(self) -> None:
        """`save_result(model)` of the script, with the EMA weights swapped in, on every process (it writes on
        the main one): at the end of training and on the save schedule (e.g. --save_model_epochs)."""
        if self.save_result_with is None:
            return
        with self.ema_weights() as model:
            self.save_result_with(model)
        self.accelerator.wait_for_everyone()

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
        decision = [False, False]
        if self.accelerator.is_main_process:
            value = self.last_validation.metrics.get(key) if self.last_validation.step == step else None
            new_best = value is not None and math.isfinite(value) and (self.best is None or value < self.best[1])
            decision = [new_best, (self.output_dir / f"checkpoint-{step}").is_dir()]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            decision = broadcast_object_list(decision)
        new_best, has_checkpoint = decision
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
        result = self.validation.run(step) if self.validation is not None else None
        if result is not None and self.accelerator.is_main_process:
            grids = {tag: log_image_grid(self.accelerator, images, step, self.output_dir, tag=tag)
                     for tag, images in result.images.items()}
            if result.metrics:
                self.metrics.log(dict(result.metrics), step=step)
            self.last_validation = ValidationRecord(step, grids, dict(result.metrics))
        return self.last_validation

    # ---- the loop ---------------------------------------------------------------------------

    def _agree_on_flags(self, loss: torch.Tensor, logs: dict) -> tuple[bool, bool, list[float]]:
        """One all-reduce and one device-to-host copy: (any rank non-finite, any rank asked to stop,
        mean [loss, *logs] over the ranks)."""
        values = [loss.detach().float().reshape(-1)] + [
            torch.as_tensor(v).detach().float().to(loss.device).reshape(-1) for v in logs.values()
        ]
        nonfinite = torch.stack([(~torch.isfinite(v)).any() for v in values]).any().float()
        stop = torch.tensor(float(self.stop.requested), device=loss.device)
        flags = torch.stack([nonfinite, stop] + [torch.nan_to_num(v.mean()) for v in values])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        host = flags.tolist()
        means = [value / self.accelerator.num_processes for value in host[2:]]
        return host[0] > 0, host[1] > 0, means

    def _loader(self) -> DataLoader:
        batches_per_epoch = self.sampler.batches_per_epoch()
        epoch, start = divmod(self.state.micro_batches, batches_per_epoch)
        self.sampler.set_position(epoch, start)
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = epoch
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.config.dataloader_num_workers,
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
        global_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        step_loss = []
        step_logs: dict[str, list[float]] = {}
        micro_batches_this_step = 0
        trace = BatchTrace(accelerator.process_index)
        last_time = time.perf_counter()
        try:
            while self.global_step < self.max_train_steps:
                for batch in self._loader():
                    trace.record(batch, self.global_step + 1)
                    batch = send_to_device(batch, accelerator.device, non_blocking=True)
                    generator = self.step_generator()
                    with accelerator.accumulate(self.model):
                        result = compute_loss(batch, generator)
                        loss, logs = result if isinstance(result, tuple) else (result, {})
                        nonfinite, stop_requested, means = self._agree_on_flags(loss, logs)
                        if nonfinite:
                            raise NonFiniteLossError(self._nonfinite_message())
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and config.max_grad_norm:
                            accelerator.clip_grad_norm_(self._parameters(), config.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self.state.micro_batches += 1
                    micro_batches_this_step += 1
                    step_loss.append(means[0])
                    for name, value in zip(logs, means[1:]):
                        step_logs.setdefault(name, []).append(value)
                    if not accelerator.sync_gradients:
                        continue

                    self.lr_scheduler.step()
                    if self.ema is not None:
                        self.ema.step(self.unwrapped_model.parameters())
                    epochs_before = (self.state.micro_batches - micro_batches_this_step) // self.sampler.batches_per_epoch()
                    micro_batches_this_step = 0
                    epochs_ended = range(epochs_before + 1, self.state.micro_batches // self.sampler.batches_per_epoch() + 1)
                    self.state.global_step += 1
                    self.state.samples_seen += global_batch
                    if self.posthoc_ema is not None:
                        self.posthoc_ema.step(self.unwrapped_model.parameters(), self.global_step)
                    trace.record(None, self.global_step, self.model)
                    now = time.perf_counter()
                    values = {
                        "loss": sum(step_loss) / len(step_loss),
                        "lr": self.lr_scheduler.get_last_lr()[0],
                        "images_per_sec": global_batch / max(now - last_time, 1e-9),
                        "epoch": self.state.micro_batches / self.sampler.batches_per_epoch(),
                        **{name: sum(v) / len(v) for name, v in step_logs.items()},
                    }
                    if self.ema is not None:
                        values["ema_decay"] = float(self.ema.cur_decay_value or 0.0)
                    last_time = now
                    step_loss, step_logs = [], {}
                    self.metrics.log(values, step=self.global_step)
                    progress.update(1)
                    progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")

                    done = self.global_step >= self.max_train_steps
                    checkpoint_due = bool(config.checkpointing_steps) and (
                        self.global_step % config.checkpointing_steps == 0 or done)
                    if done and self.posthoc_ema is not None:
                        self.posthoc_ema.save_snapshots()
                    if checkpoint_due:
                        self.save_checkpoint()
                        self.metrics.plot()
                    if self.validation is not None and self.validation.schedule.due(
                            self.global_step, epochs_ended, self.max_train_steps):
                        self.validate(self.global_step)
                        self._keep_if_best(self.global_step)
                    if self.save_schedule.due(self.global_step, epochs_ended, self.max_train_steps):
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

    def _nonfinite_message(self) -> str:
        latest = ckpt.latest_checkpoint(self.output_dir)
        where = f"The last checkpoint, {latest}, is intact" if latest else "No checkpoint had been saved yet"
        return (
            f"The loss became NaN or infinite at step {self.global_step + 1} "
            f"(micro-batch {self.state.micro_batches + 1}); the weights were not updated with it. {where}. "
            "Try a lower --learning_rate, --max_grad_norm 1.0, or --mixed_precision bf16/no instead of fp16, "
            "then resume with --resume_from_checkpoint latest."
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
    optimizer = build_optimizer(parameters, config.optimizer, scaled_learning_rate(config, accelerator.num_processes))
    lr_scheduler = build_lr_scheduler(optimizer, config.optimizer, max_train_steps)
    averaged = model if ema_model is None else ema_model
    ema = build_ema(averaged, config.ema)
    posthoc_ema = build_posthoc_ema(averaged, config.posthoc_ema, accelerator, max_train_steps, config.loop.output_dir)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            config.loop.tracker_project_name or tracker_name,
            config={k: v for k, v in config.arguments.items() if isinstance(v, (int, float, str, bool))},
        )
    loop = TrainingLoop(accelerator, config.loop, model, optimizer, lr_scheduler, train_set, max_train_steps,
                        ema=ema, validation=validation, save_result=save_result, save_schedule=save_schedule,
                        posthoc_ema=posthoc_ema)
    loop.resume()
    logger.info(
        "Training %d steps from step %d: %d items, batch %d x %d processes x %d accumulation",
        max_train_steps, loop.global_step, len(train_set), config.loop.train_batch_size, accelerator.num_processes,
        config.loop.gradient_accumulation_steps,
    )
    return loop


def finish_run(loop: TrainingLoop) -> None:
    """The end of every training run: every process waits for the others, then the trackers close."""
    loop.accelerator.wait_for_everyone()
    loop.accelerator.end_training()
