"""What a run records as it goes: graceful stops on SIGTERM/SIGINT, metrics.jsonl and the trackers, and the losses
kept on the device between read-backs (so that training never waits for them)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path

import torch

from ..plots import plot_loss_curve

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


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
