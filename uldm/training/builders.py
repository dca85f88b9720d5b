"""What a run trains with, built from its configuration: the optimiser (AdamW or 8-bit AdamW), the learning-rate
schedule, the EMA, and the number of optimiser steps."""

from __future__ import annotations

import math

import torch

from ..data import EpochBatchSampler
from ..errors import InputError
from .config import EmaConfig, LoopConfig, OptimizerConfig, TrainingConfig


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


def submodule_path(model, submodule) -> str:
    """The name of `submodule` inside `model` ("" for the model itself), for finding it again after wrapping."""
    for name, module in model.named_modules():
        if module is submodule:
            return name
    raise ValueError("ema_model must be the model or one of its submodules.")
