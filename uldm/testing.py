"""Support for tests and debugging that the library itself does not need.

* `BatchTrace`: with ULDM_TRACE_BATCHES=PREFIX set, each process of a training run appends the item
  indices of its batches and a checksum of its weights after each optimiser step to
  PREFIX.rank<N>.jsonl (shows which process saw which images, and that all hold the same weights).
* `reset_accelerate_state`: lets several runs start one after another in one Python process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class BatchTrace:
    """See the module docstring; does nothing unless ULDM_TRACE_BATCHES is set."""

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


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; reset them so that another run can start in this process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
