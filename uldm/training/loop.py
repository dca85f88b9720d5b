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
import gc
import logging
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

from ..data import EpochBatchSampler
from ..errors import NonFiniteLossError
from ..saving import final_save_remedy, processes_stop_together
from ..testing import BatchTrace
from ..validation import log_image_grid
from . import checkpoints as ckpt
from .builders import build_ema, build_lr_scheduler, build_optimizer, plan_steps, scaled_learning_rate, submodule_path
from .checkpoints import BestCheckpoint, CheckpointContents, TrainingState
from .config import GPU_LOGGING_STEPS, LoopConfig, TrainingConfig
from .launch import RUN_ARGUMENTS_FILE, agree_on_flag, full_tensor, host_process_group, is_fsdp, unsharded
from .posthoc_ema import build_posthoc_ema
from .records import GracefulStop, MetricsWriter, StepRecords

logger = logging.getLogger(__name__)


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

    `model`, `optimizer` must already be prepared by `accelerate.prepare`; everything the checkpoints hold
    (`checkpoint`: the training state, the LR scheduler, the EMAs...) is registered here. `compute_loss(batch,
    generator)` returns either a scalar loss or (loss, {name: scalar tensor}) for extra logged values.

    The losses stay on the device and are read back every `logging_steps` optimiser steps and before
    anything is written (checkpoint, validation, result, post-hoc EMA snapshot, stop); a non-finite one
    then stops the run, so nothing trained from it is ever saved. `averaged_path` names the submodule of
    the model that the EMAs average ("" the whole model). Under FSDP2, `unsharded_copy` is a plain copy
    of the model made before it was sharded: validation and the result get it with the gathered weights.
    """

    def __init__(self, accelerator, config: LoopConfig, model, optimizer, checkpoint: CheckpointContents, dataset,
                 max_train_steps: int, validation: Validation | None = None,
                 save_result: Callable[[Any], None] | None = None, save_schedule: Schedule = Schedule(),
                 averaged_path: str = "", unsharded_copy=None):
        self.accelerator = accelerator
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.checkpoint = checkpoint
        self.state, self.lr_scheduler = checkpoint.state, checkpoint.lr_scheduler
        self.ema, self.posthoc_ema = checkpoint.ema, checkpoint.posthoc_ema
        self.dataset = dataset
        self.max_train_steps = max_train_steps
        self.validation = validation
        self.save_result_with = save_result
        self.save_schedule = save_schedule
        self.last_validation = ValidationRecord()
        self.output_dir = Path(config.output_dir)
        self.keep_best = BestCheckpoint(validation.keep_best if validation is not None else None,
                                        self.output_dir, config.checkpoints_total_limit)
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
        if self.ema is not None:
            self.ema.to(accelerator.device)
        checkpoint.register(accelerator)

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
        return [full_tensor(p) for p in self.unwrapped_model.get_submodule(self.averaged_path).parameters()]

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
        if self.accelerator.is_main_process:
            self.keep_best.find(self.global_step)

    def _restore(self, resume_from_checkpoint: str | None) -> None:
        path = ckpt.restore_checkpoint(self.accelerator, resume_from_checkpoint, self.output_dir)
        if path is None:
            if resume_from_checkpoint:
                logger.info("No complete checkpoint in %s yet; starting a new run.", self.output_dir)
            return
        logger.info("Resuming from %s", path)
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        self.state.go_on_from(TrainingState.load(path), path.name)
        # accelerate decides when to sync gradients from its own micro-step counter.
        self.accelerator.step = self.state.micro_batches

    def save_checkpoint(self) -> Path:
        """Every process writes into a temporary folder; the main one publishes it when all are done.
        A failed write (full disk) on any process raises SaveError on all of them (see uldm.training.checkpoints)."""
        return self.checkpoint.save(self.accelerator, self.output_dir, self.config.checkpoints_total_limit)

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, value) of Validation.keep_best's best so far."""
        return self.keep_best.best

    def _keep_if_best(self, step: int) -> None:
        """After a validation (every process): its value of keep_best may protect this step's checkpoint."""
        metrics = self.last_validation.metrics if self.last_validation.step == step else None
        self.keep_best.after_validation(self.accelerator, step, metrics, self.save_checkpoint)

    @property
    def epochs_completed(self) -> int:
        """Whole passes over the data so far (e.g. for naming a --save_model_epochs save)."""
        return self.state.micro_batches // self.sampler.batches_per_epoch()

    @property
    def finished(self) -> bool:
        return self.global_step >= self.max_train_steps

    # ---- EMA and the result -----------------------------------------------------------------

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

    def _unsharded(self):
        """Under FSDP2: the unsharded copy holding the live weights, for the block (see `launch.unsharded`)."""
        if not self.fsdp:
            return contextlib.nullcontext()
        return unsharded(self.unsharded_copy, self.unwrapped_model, self.accelerator.device)

    def save_result(self) -> None:
        """`save_result(model)` of the script, with the EMA weights swapped in, on every process (it writes on
        the main one): at the end of training and on the save schedule (e.g. --save_model_epochs)."""
        if self.save_result_with is None:
            return
        with self._unsharded(), self.ema_weights() as model, processes_stop_together(
                self.accelerator, "the trained model", self.output_dir, remedy=partial(final_save_remedy, self.output_dir)):
            self.save_result_with(model)

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
                    stop_requested = agree_on_flag(self.stop.requested, self._host_group)

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
                        save_schedule: Schedule = Schedule(), checkpoint_model_hooks=None) -> TrainingLoop:
    """A TrainingLoop for `model` with the run's optimiser, schedule, EMA and trackers, resumed per the config.

    `parameters` (default: all of the model's) are optimised; `ema_model` (default: `model`) is averaged.
    `save_result(model)` writes the run's result (called with the EMA weights swapped in, on every process,
    at the end and on `save_schedule`). `checkpoint_model_hooks`: see CheckpointContents.model_hooks (e.g.
    `uldm.lora.adapter_only_checkpoint_hooks`). The model is prepared by accelerate: train through `loop.model`.
    """
    max_train_steps = plan_steps(len(train_set), config.loop, accelerator.num_processes)
    parameters = model.parameters() if parameters is None else parameters
    optimizer = build_optimizer(parameters, config.optimizer, scaled_learning_rate(config, accelerator.num_processes),
                                accelerator.device)
    averaged = model if ema_model is None else ema_model
    averaged_path = submodule_path(model, averaged)
    loop_config = config.loop
    checkpoint = CheckpointContents(
        state=TrainingState(train_batch_size=loop_config.train_batch_size, num_processes=accelerator.num_processes,
                            gradient_accumulation_steps=loop_config.gradient_accumulation_steps),
        lr_scheduler=build_lr_scheduler(optimizer, config.optimizer, max_train_steps),
        # Built before prepare, so that under FSDP2 the EMAs hold whole tensors, the same on every process.
        ema=build_ema(averaged, config.ema),
        posthoc_ema=build_posthoc_ema(averaged, config.posthoc_ema, accelerator, max_train_steps, loop_config.output_dir),
        model_hooks=checkpoint_model_hooks,
        extra_files=(Path(loop_config.output_dir) / RUN_ARGUMENTS_FILE,),
    )
    unsharded_copy = copy.deepcopy(model).to("cpu") if is_fsdp(accelerator) else None
    model, optimizer = accelerator.prepare(model, optimizer)  # compiles the model too with --torch_compile
    if accelerator.is_main_process:
        accelerator.init_trackers(
            loop_config.tracker_project_name or tracker_name,
            config={k: v for k, v in config.arguments.items() if isinstance(v, (int, float, str, bool))},
        )
    loop = TrainingLoop(accelerator, loop_config, model, optimizer, checkpoint, train_set, max_train_steps,
                        validation=validation, save_result=save_result, save_schedule=save_schedule,
                        averaged_path=averaged_path, unsharded_copy=unsharded_copy)
    loop.resume()
    logger.info(
        "Training %d steps from step %d: %d items, batch %d x %d processes x %d accumulation",
        max_train_steps, loop.global_step, len(train_set), loop_config.train_batch_size, accelerator.num_processes,
        loop_config.gradient_accumulation_steps,
    )
    return loop


def finish_run(loop: TrainingLoop) -> None:
    """The end of every training run: every process waits for the others, then the trackers close and the process
    groups go while the interpreter is fully alive. destroy_process_group only drops torch's own references: a gloo
    group still referenced (the loop's host group) was destroyed at interpreter shutdown instead, where its worker
    threads can abort the process ("terminate called without an active exception", SIGABRT, seen once in a
    two-process run on a loaded machine)."""
    loop.accelerator.wait_for_everyone()
    loop._host_group = None
    loop.accelerator.end_training()
    gc.collect()  # the loop's reference cycles may hold more of them
