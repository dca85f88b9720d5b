"""Support for tests and debugging that the library itself does not need.

* `BatchTrace`: with ULDM_TRACE_BATCHES=PREFIX set, each process of a training run appends the item
  indices of its batches and a checksum of its weights after each optimiser step to
  PREFIX.rank<N>.jsonl (shows which process saw which images, and that all hold the same weights).
* `reset_accelerate_state`: lets several runs start one after another in one Python process.
* `force_fsdp_if_asked`: with ULDM_TEST_FORCE_FSDP=2 (or 1) set, a run on CPU processes uses accelerate's FSDP2
  (FSDP1) code, which accelerate itself selects only on GPUs (docs/fsdp_notes.md): lets the test-suite check
  FSDP on the CPU.
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


def run_script_in_this_process(module_name: str, argv) -> object:
    """A top-level script's main(argv) in this process (much faster than a subprocess), with accelerate's
    global state reset around it; returns what main returns."""
    import importlib

    reset_accelerate_state()
    try:
        return importlib.import_module(module_name).main([str(value) for value in argv])
    finally:
        reset_accelerate_state()


FORCE_FSDP_VARIABLE = "ULDM_TEST_FORCE_FSDP"


def force_fsdp_if_asked(accelerator) -> None:
    """See the module docstring; does nothing unless ULDM_TEST_FORCE_FSDP is set (to 2 or 1)."""
    version = os.environ.get(FORCE_FSDP_VARIABLE)
    if version:
        force_fsdp_on_cpu(accelerator, int(version))


def force_fsdp_on_cpu(accelerator, version: int = 2, state_dict_type: str = "SHARDED_STATE_DICT") -> None:
    """Make accelerate run FSDP (`version` 2 or 1) in CPU processes.

    accelerate (1.15) sets DistributedType.FSDP only over GPU-like devices (state.py, AcceleratorState.__init__:
    MULTI_CPU is not in the list); this sets it by hand, in PartialState's shared dict too (copied back into
    every new AcceleratorState), with the plugin configs/accelerate/fsdp.yaml describes. It relies on
    accelerate's internals, so it fails loudly rather than letting a run go on without FSDP."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    options = dict(fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
                   transformer_cls_names_to_wrap=["ResnetBlock2D", "Attention"], state_dict_type=state_dict_type)
    if version == 1:
        options["use_orig_params"] = True
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**options)
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if accelerator.distributed_type != DistributedType.FSDP:
        raise RuntimeError(f"Forcing FSDP{version}: accelerate's state did not take it ({accelerator.distributed_type}); "
                           "its internals changed.")
