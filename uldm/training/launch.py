"""Launching a run: the Accelerator and what it refuses before any work (an earlier run's checkpoints, processes
that accelerate does not join, FSDP1), DeepSpeed's settings, logging, the run's arguments on disk; and what the
engines need while training: FSDP2's gathered weights and a host-side process group for agreeing on flags."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import InputError
from . import checkpoints as ckpt
from .config import ComputeConfig, LoopConfig, TrainingConfig

logger = logging.getLogger(__name__)

RUN_ARGUMENTS_FILE = "training_args.json"


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

    from ..testing import force_fsdp_if_asked

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

# --------------------------------------------------------------------------------------------
# While training: gathering FSDP2's shards, agreeing on flags


def host_process_group(accelerator):
    """A process group whose collectives run on the host (gloo) for agreeing on flags without waiting for the
    device: the default group when it is gloo (CPU runs), else a new one (NCCL runs). None for one process;
    every process must call this (creating a group is a collective)."""
    import torch.distributed as dist

    if accelerator.num_processes < 2 or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def full_tensor(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter as a whole tensor: FSDP2's DTensor shards gathered (a collective: every process), others as they
    are; requires_grad kept (diffusers' EMA averages the parameters that require gradients, copies the others)."""
    if not hasattr(parameter, "full_tensor"):
        return parameter
    with torch.no_grad():
        full = parameter.full_tensor()
    return full.requires_grad_(parameter.requires_grad)


@contextlib.contextmanager
def unsharded(plain, sharded, device):
    """Under FSDP2: `plain`, a copy of the model made before it was sharded, on `device` holding the live weights
    of `sharded`, for the block (a sharded model must not run on the main process alone: its forward all-gathers).
    Every process calls this (gathering is a collective); the copy goes back to the CPU after."""
    plain = plain.to(device)
    with torch.no_grad():
        for (name, target), (sharded_name, source) in zip(plain.named_parameters(), sharded.named_parameters()):
            assert name == sharded_name, f"{name} != {sharded_name}: the copy is not of this model"
            target.copy_(full_tensor(source))
        for target, source in zip(plain.buffers(), sharded.buffers()):
            target.copy_(source)
    try:
        yield
    finally:
        plain.to("cpu")


def agree_on_flag(flag: bool, host_group) -> bool:
    """Whether `flag` is set on any process, the same answer on all: one all-reduce of one int over a host (gloo)
    group (`host_process_group`), which never waits for the device; `flag` itself without a group."""
    if host_group is None:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=host_group)
    return bool(value.item())
