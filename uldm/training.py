"""The training-loop core that every training script shares.

`TrainingLoop` owns what is the same in latent training, DreamBooth and VAE training: the
epochs and batches (sharded over processes, reproducible from the seed), gradient
accumulation, the optimiser and learning-rate schedule, EMA, logging, throughput, crash-safe
checkpoints, exact resume, graceful stops on SIGTERM/SIGINT and non-finite losses. A script
supplies only `compute_loss(batch, generator)` and, optionally, a validation callback.

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
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoints as ckpt
from .checkpoints import TrainingState
from .data import EpochBatchSampler
from .errors import InputError, NonFiniteLossError
from .plots import plot_loss_curve

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------------
# Set-up


def refuse_to_overwrite_checkpoints(args) -> None:
    """A new run in a folder that holds an earlier run's checkpoints would replace and prune them."""
    if getattr(args, "resume_from_checkpoint", None):
        return
    existing = ckpt.list_checkpoints(args.output_dir, warn_incomplete=False)
    if existing:
        raise InputError(
            f"--output_dir {args.output_dir} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in existing[-3:])}). Continue it with --resume_from_checkpoint latest, "
            "or choose another --output_dir (delete the checkpoints yourself to start over there)."
        )


def make_accelerator(args):
    """An Accelerator for the run; the LR schedule is stepped by the loop, once per optimiser step.

    Refuses (before any work) to start a new run over an earlier run's checkpoints."""
    refuse_to_overwrite_checkpoints(args)
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    output_dir = Path(args.output_dir)
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    report_to = None if args.report_to in (None, "", "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project_config,
        step_scheduler_with_optimizer=False,
    )
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None:
        # The loop builds its own sharded loader (not passed to prepare), so DeepSpeed cannot infer this.
        deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
        if args.max_grad_norm:
            deepspeed_plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
    if getattr(args, "allow_tf32", False) and torch.cuda.is_available():
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


def start_run(args):
    """The accelerator of a training run, with logging configured and every process seeded."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args)
    configure_logging(accelerator)
    set_seed(args.seed)
    return accelerator


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; reset them so that another run can start in this process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def save_run_arguments(args, output_dir: str | os.PathLike) -> Path:
    """The arguments of this run, as JSON, for reproducing it (also copied into the model card)."""
    path = Path(output_dir) / "training_args.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(vars(args), indent=2, sort_keys=True, default=str))
    return path


def scaled_learning_rate(args, num_processes: int) -> float:
    if args.scale_lr:
        return args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes
    return args.learning_rate


def build_optimizer(params, args, learning_rate: float):
    return torch.optim.AdamW(
        params,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def build_lr_scheduler(optimizer, args, max_train_steps: int):
    """The schedule counts optimiser steps, whatever the accumulation and number of processes
    (the loop steps it once per optimiser step; diffusers #8384)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
    )


def build_ema(model, args):
    """diffusers' EMAModel with warm-up (decay 1 - (1 + step/inv_gamma)^-power, capped)."""
    if not getattr(args, "use_ema", False):
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(
        model.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        model_cls=type(model),
        model_config=model.config,
    )


def plan_steps(num_items: int, args, num_processes: int) -> int:
    """max_train_steps, from --max_train_steps or --num_epochs."""
    batches_per_epoch = EpochBatchSampler(num_items, args.train_batch_size, num_processes).batches_per_epoch()
    if args.max_train_steps:
        return args.max_train_steps
    return math.ceil(args.num_epochs * batches_per_epoch / args.gradient_accumulation_steps)


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


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# The loop


class BatchTrace:
    """Debugging aid: with ULDM_TRACE_BATCHES=PREFIX set, each process appends the item indices of
    its batches and a checksum of its weights after each optimiser step to PREFIX.rank<N>.jsonl
    (shows which process saw which images, and that all processes hold the same weights)."""

    def __init__(self, process_index: int):
        prefix = os.environ.get("ULDM_TRACE_BATCHES")
        self.path = Path(f"{prefix}.rank{process_index}.jsonl") if prefix else None

    def record(self, batch, step: int, model=None) -> None:
        if self.path is None:
            return
        entry = {"step": step}
        if isinstance(batch, dict) and "index" in batch:
            entry["indices"] = batch["index"].tolist()
        if model is not None:
            entry["weights_checksum"] = sum(p.detach().double().abs().sum().item() for p in model.parameters())
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


class TrainingLoop:
    """Runs the optimisation; see the module docstring.

    `model`, `optimizer` must already be prepared by `accelerator.prepare`; the LR scheduler and
    EMA are registered here for checkpointing. `compute_loss(batch, generator)` returns either a
    scalar loss or (loss, {name: scalar tensor}) for extra logged values.
    """

    def __init__(self, accelerator, args, model, optimizer, lr_scheduler, dataset, max_train_steps: int,
                 ema=None):
        self.accelerator = accelerator
        self.args = args
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.ema = ema
        self.dataset = dataset
        self.max_train_steps = max_train_steps
        self.output_dir = Path(args.output_dir)
        self.state = TrainingState(
            train_batch_size=args.train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_processes=accelerator.num_processes,
        )
        self.sampler = EpochBatchSampler(
            len(dataset), args.train_batch_size, accelerator.num_processes, accelerator.process_index,
            seed=args.seed or 0,
        )
        self.stop = GracefulStop()
        self.metrics: MetricsWriter | None = None
        accelerator.register_for_checkpointing(lr_scheduler)
        if ema is not None:
            ema.to(accelerator.device)
            accelerator.register_for_checkpointing(ema)

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
        seed = ((self.args.seed or 0) * 1_000_003 + self.accelerator.process_index) * 1_000_000_007
        seed = (seed + self.state.micro_batches) % (2**63 - 1)
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    # ---- checkpoints ------------------------------------------------------------------------

    def resume(self, resume_from_checkpoint: str | None) -> None:
        """Restore the checkpoint (if any), then open metrics.jsonl at the step training goes on from."""
        self._restore(resume_from_checkpoint)
        self.metrics = MetricsWriter(self.accelerator, self.output_dir, resume_step=self.global_step)

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
            global_batch = self.args.train_batch_size * self.accelerator.num_processes
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
        return ckpt.save_checkpoint(self.accelerator, self.output_dir, self.state, self.args.checkpoints_total_limit,
                                    write_extra=lambda folder: save_run_arguments(self.args, folder))

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
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
        )

    def run(self, compute_loss: Callable, on_step_end: Callable[[int], None] | None = None) -> bool:
        """Train to `max_train_steps`. Returns False if stopped early by a signal (checkpoint saved)."""
        args, accelerator = self.args, self.accelerator
        if self.metrics is None:  # run() without resume(): a fresh start
            self.metrics = MetricsWriter(accelerator, self.output_dir, resume_step=self.global_step)
        self.stop.install()
        progress = tqdm(total=self.max_train_steps, initial=self.global_step, desc="Training",
                        disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        step_loss = []
        step_logs: dict[str, list[float]] = {}
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
                        if accelerator.sync_gradients and args.max_grad_norm:
                            accelerator.clip_grad_norm_(self._parameters(), args.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self.state.micro_batches += 1
                    step_loss.append(means[0])
                    for name, value in zip(logs, means[1:]):
                        step_logs.setdefault(name, []).append(value)
                    if not accelerator.sync_gradients:
                        continue

                    self.lr_scheduler.step()
                    if self.ema is not None:
                        self.ema.step(self.unwrapped_model.parameters())
                    self.state.global_step += 1
                    self.state.samples_seen += global_batch
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
                    checkpoint_due = bool(args.checkpointing_steps) and (
                        self.global_step % args.checkpointing_steps == 0 or done)
                    if checkpoint_due:
                        self.save_checkpoint()
                        self.metrics.plot()
                    if on_step_end is not None:
                        on_step_end(self.global_step)
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
        self.metrics.plot()
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


def build_training_loop(accelerator, args, model, train_set, tracker_name: str, parameters=None,
                        ema_model=None) -> TrainingLoop:
    """A TrainingLoop for `model` with the run's optimiser, schedule, EMA and trackers, resumed per the arguments.

    `parameters` (default: all of the model's) are optimised; `ema_model` (default: `model`) is averaged.
    The model is prepared by accelerate: train through `loop.model`.
    """
    max_train_steps = plan_steps(len(train_set), args, accelerator.num_processes)
    parameters = model.parameters() if parameters is None else parameters
    optimizer = build_optimizer(parameters, args, scaled_learning_rate(args, accelerator.num_processes))
    lr_scheduler = build_lr_scheduler(optimizer, args, max_train_steps)
    ema = build_ema(model if ema_model is None else ema_model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name or tracker_name,
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    loop = TrainingLoop(accelerator, args, model, optimizer, lr_scheduler, train_set, max_train_steps, ema=ema)
    loop.resume(args.resume_from_checkpoint)
    return loop
