"""LoRA for the unconditional UNet: the adapter a run trains (peft), checkpoints that hold only the
adapter, and the result in diffusers' LoRA layout.

The result is written by the pipeline's `save_lora_weights` (`pytorch_lora_weights.safetensors`, keys
`unet.<module>.lora_A.weight`, the adapter's LoraConfig in the file's metadata, including the base model
it was trained on), so it loads the way diffusers users load LoRA:

    pipe = DiffusionPipeline.from_pretrained(base, trust_remote_code=True)  # here: pipeline_loading.load_pipeline(base)
    pipe.load_lora_weights(output_dir)

diffusers 0.42's UNet2DModel has no adapter mixin; the pipeline provides that API
(`pipeline_latent_uncond.UNet2DLoraLoaderMixin`), and this module only adds what training needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from pipeline_latent_uncond import (
    LORA_WEIGHT_NAME,
    LORA_WEIGHT_NAME_SAFE,
    PEFT_ADAPTER_CONFIG,
    UnconditionalLatentPipeline,
)

from .errors import InputError
from .pipeline_loading import load_pipeline

# The adapter a training run injects (peft's default name); checkpoints and the result refer to it.
ADAPTER_NAME = "default"
# "attention" is what diffusers' DreamBooth LoRA adapts (there, through the text cross-attention). An
# unconditional UNet has no text pathway to carry the subject, so the default also adapts the ResNet
# convolutions, where most of its weights are.
LORA_TARGET_PRESETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention+conv": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
}


def lora_target_modules(spec: str) -> list[str]:
    """A preset name (attention, attention+conv) or a comma-separated list of module names."""
    if spec in LORA_TARGET_PRESETS:
        return list(LORA_TARGET_PRESETS[spec])
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise InputError(f"--lora_target_modules must be one of {list(LORA_TARGET_PRESETS)} or module names.")
    return names


def add_lora_adapter(unet, rank: int, alpha: float | None, target_modules: Sequence[str], dropout: float = 0.0):
    """Freeze the UNet and inject a trainable LoRA adapter (named ADAPTER_NAME); returns its LoraConfig."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise InputError(f"--rank must be at least 1, not {rank}.")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=list(target_modules))
    unet.requires_grad_(False)
    try:
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    except ValueError as error:
        raise InputError(f"Cannot add LoRA to the UNet: {error}. Check --lora_target_modules.") from error
    return config


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def save_lora_result(unet, output_dir: str | os.PathLike, base_model: str) -> Path:
    """The trained adapter of `unet`, in diffusers' LoRA layout, with `base_model` in its metadata."""
    from peft import get_peft_model_state_dict

    layers = {key: value.detach().to("cpu", torch.float32).contiguous()
              for key, value in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    metadata["base_model_name_or_path"] = base_model
    UnconditionalLatentPipeline.save_lora_weights(output_dir, unet_lora_layers=layers,
                                                  unet_lora_adapter_metadata=metadata)
    return Path(output_dir) / LORA_WEIGHT_NAME_SAFE


def holds_lora_adapter(path: str | os.PathLike) -> bool:
    """A folder with LoRA weights: diffusers' layout, or peft's (what earlier DreamBooth runs wrote)."""
    return any((Path(path) / name).is_file() for name in (LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME, PEFT_ADAPTER_CONFIG))


def lora_base_model(path: str | os.PathLike) -> str | None:
    """The base model an adapter folder says it was trained on (its metadata's base_model_name_or_path)."""
    _, _, metadata = UnconditionalLatentPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    return (metadata or {}).get("unet.base_model_name_or_path")


def load_pipeline_or_adapter(path: str | os.PathLike, fuse_lora: bool = False,
                             **options) -> UnconditionalLatentPipeline:
    """A DreamBooth result: a pipeline folder, or a LoRA adapter folder (its base model is loaded, then the
    adapter; fuse_lora=True folds it in and removes the LoRA layers, leaving a plain pipeline that saves and
    loads without peft). `options` go to `uldm.pipeline_loading.load_pipeline`."""
    if not holds_lora_adapter(path):
        return load_pipeline(path, **options)
    base = lora_base_model(path)
    if not base:
        raise InputError(f"The LoRA adapter in {path} does not name its base model (base_model_name_or_path); load "
                         "the base with load_pipeline and call load_lora_weights on it.")
    pipeline = load_pipeline(base, **options)
    pipeline.load_lora_weights(str(path))
    scheduler = adapter_scheduler(path)
    if scheduler is not None:  # a few-step student's adapter (distill.py --use_lora) samples with its own
        pipeline.scheduler = scheduler
    if fuse_lora:
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    return pipeline


def adapter_scheduler(path: str | os.PathLike):
    """The scheduler saved beside an adapter (scheduler/scheduler_config.json, a distilled student's), else None."""
    import diffusers

    folder = Path(path) / "scheduler"
    if not (folder / "scheduler_config.json").is_file():
        return None
    name = json.loads((folder / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(str(folder))


def adapter_only_checkpoint_hooks(accelerator) -> tuple:
    """accelerate's (save_state, load_state) pre-hooks with which checkpoints of a LoRA run keep only the adapter
    weights of the model (MBs instead of the whole UNet); loading restores them exactly and leaves the frozen base
    weights as loaded. For `build_training_loop(checkpoint_model_hooks=...)`. Not under FSDP, whose checkpoints
    bypass these hooks (a LoRA run needs no sharding: DDP)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise InputError("--use_lora does not work with FSDP (its adapter-only checkpoints could not be resumed); "
                         "train the adapter with DDP (configs/accelerate/multi_gpu.yaml): it is a few MB.")

    def keep_only_adapter(models, weights, output_dir):
        for index, state in enumerate(weights):
            weights[index] = {key: value for key, value in state.items() if is_lora_key(key)}

    def load_adapter(models, input_dir):
        from safetensors.torch import load_file

        for index in range(len(models)):
            model = models.pop(0)
            name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
            state = load_file(os.path.join(input_dir, name), device=str(next(model.parameters()).device))
            result = model.load_state_dict(state, strict=False)
            missing = [key for key in result.missing_keys if is_lora_key(key)]
            if result.unexpected_keys or missing or not state:
                raise InputError(
                    f"{input_dir} is not a checkpoint of this LoRA run (unexpected keys "
                    f"{list(result.unexpected_keys)[:3]}, missing adapter keys {missing[:3]}). "
                    "Resume with the same --use_lora/--rank/--lora_target_modules it was saved with."
                )

    return keep_only_adapter, load_adapter
