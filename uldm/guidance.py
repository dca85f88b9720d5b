"""Guides for two-model guidance, found without training a second model where possible.

The rule lives in the pipeline (`pipeline_latent_uncond.guided_model`: each step takes `g + w * (m - g)`); this
module turns what a user names into a guide, and refuses one that does not fit before anything is sampled.

`load_guide(spec, pipeline, source)` returns what `pipeline.set_guidance(guide, w, interval)` takes, for `spec`:

* a pipeline folder or hub id (any model the trainers save, loaded as `uldm.first_stage.load_saved_model` does):
  a smaller model trained by the same trainer for a fraction of the steps (autoguidance), a post-hoc EMA
  pipeline of an early point of the run (synthesize_ema.py), another run's result -> its UNet;
* a `checkpoint-N` folder (a path, or a name inside the run folder `source`) -> a UNet of the pipeline's own
  config with the checkpoint's EMA weights when it has an EMA, else its raw weights
  (`uldm.training.checkpoints.load_checkpoint_model`);
* `base` for a DreamBooth result at `source`: a LoRA result (the pipeline loaded with its adapter, unfused) ->
  `pipeline.lora_base_guide()`, the same UNet with the adapter switched off (no second copy of the weights); a
  full fine-tune -> the base model its training_args.json names (`pretrained_model_name_or_path`).

Every guide is compared with the model it guides (`ModelSpace`, `model_space`, `check_fits`): latent shape,
prediction type, first stage (VAE class, config and a digest of its weights), latent scale and shift. A mismatch
is an InputError naming the number that disagrees (e.g. "the guide's latent scale is 0.5, the model's 0.7").

Stable for the tools built on it (the guidance-weight sweep): `load_guide`, `model_space`, `check_fits`,
`ModelSpace`, `BASE`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

BASE = "base"  # the guide spec of a DreamBooth result's base model
ADAPTER_OFF = "the UNet with its LoRA adapter switched off"  # a Guidance.guide resolved per pipeline
# VAE config entries that do not change what its latents are (the pipeline's own scale and shift are compared).
_VAE_CONFIG_IGNORED = ("scaling_factor", "shift_factor", "force_upcast")


@dataclass(frozen=True)
class ModelSpace:
    """What a guide must share with the model it guides: the samples it denoises and what its output means."""

    in_channels: int
    out_channels: int
    sample_size: tuple
    prediction_type: str
    first_stage: str  # the VAE's class, or "pixel space"
    vae_config: dict | None = None  # None in pixel space
    vae_weights: str | None = None  # uldm.vae.vae_weights_digest
    latent_scale: float | None = None
    latent_shift: float | None = None


_LABELS = {"in_channels": "UNet in_channels", "out_channels": "UNet out_channels",
           "sample_size": "latent size (sample_size)", "prediction_type": "prediction type",
           "first_stage": "first stage", "vae_weights": "VAE weights digest", "latent_scale": "latent scale",
           "latent_shift": "latent shift"}


def model_space(pipeline) -> ModelSpace:
    """The ModelSpace of a pipeline (UnconditionalLatentPipeline or PixelSampler)."""
    from .vae import vae_kind, vae_weights_digest

    config = pipeline.unet.config
    size = config.sample_size
    vae = getattr(pipeline, "vae", None)
    return ModelSpace(
        in_channels=config.in_channels, out_channels=config.out_channels,
        sample_size=(size, size) if isinstance(size, int) else tuple(size),
        prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"),
        first_stage="pixel space" if vae is None else vae_kind(vae),
        vae_config=None if vae is None else _comparable_config(vae.config),
        vae_weights=None if vae is None else vae_weights_digest(vae),
        latent_scale=getattr(pipeline, "latent_scale", None),
        latent_shift=getattr(pipeline, "latent_shift", None),
    )


def _comparable_config(config) -> dict:
    entries = {key: value for key, value in dict(config).items()
               if not key.startswith("_") and key not in _VAE_CONFIG_IGNORED}
    return json.loads(json.dumps(entries, default=str))  # tuples and lists alike, as after a save


def space_differences(guide: ModelSpace, model: ModelSpace) -> list[str]:
    """What differs, as "the guide's X is a, the model's b", in the order that explains most."""
    problems = []
    for field in fields(ModelSpace):
        ours, theirs = getattr(model, field.name), getattr(guide, field.name)
        if field.name == "vae_config":
            if ours is not None and theirs is not None:
                keys = [key for key in sorted({*ours, *theirs}) if ours.get(key) != theirs.get(key)]
                problems += [f"the guide's VAE {key} is {theirs.get(key)}, the model's {ours.get(key)}" for key in keys]
            continue
        if field.name == "vae_weights" and problems:
            continue  # another VAE: its weights differ as a matter of course
        same = (math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-9)
                if isinstance(ours, float) and isinstance(theirs, float) else ours == theirs)
        if not same:
            problems.append(f"the guide's {_LABELS[field.name]} is {theirs}, the model's {ours}")
    return problems


def check_fits(guide: ModelSpace, model: ModelSpace) -> None:
    """Refuse a guide that does not denoise the same samples in the same way as the model (InputError)."""
    problems = space_differences(guide, model)
    if problems:
        raise InputError(
            "The guide does not fit the model it guides: " + "; ".join(problems) + ". A guide must be a model of "
            "the same latent space and prediction type: an earlier checkpoint of the same run, a smaller model "
            "trained by the same trainer on the same latents, or the base of a fine-tune.")


# --------------------------------------------------------------------------------------------
# The three kinds of guide


def load_guide(spec: str | os.PathLike, pipeline, source: str | os.PathLike | None = None):
    """The guide `spec` names for `pipeline` (loaded from `source`, a folder or hub id; needed for `base` and
    for a bare `checkpoint-N` name), checked to fit; what `pipeline.set_guidance` takes. See the module docstring."""
    if str(spec).strip().lower() == BASE:
        return base_guide(pipeline, source)
    checkpoint = checkpoint_folder(spec, source)
    if checkpoint is not None:
        return checkpoint_guide(checkpoint, pipeline)
    return pipeline_guide(spec, pipeline)


def pipeline_guide(name_or_path: str | os.PathLike, pipeline) -> torch.nn.Module:
    """The UNet of a saved pipeline (folder or hub id), checked against `pipeline`."""
    from .first_stage import load_saved_model

    try:
        guide_pipeline = load_saved_model(str(name_or_path))
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"Could not load the guide '{name_or_path}': {error}\nA guide is a saved pipeline folder or "
                         f"hub id, a checkpoint-N folder, or '{BASE}' for a DreamBooth result.") from error
    check_fits(model_space(guide_pipeline), model_space(pipeline))
    logger.info("Guide: the UNet of %s", name_or_path)
    return _ready(guide_pipeline.unet, pipeline)


def checkpoint_folder(spec: str | os.PathLike, source: str | os.PathLike | None = None) -> Path | None:
    """The checkpoint folder `spec` names (a path, or a name inside `source`); None if it names no checkpoint."""
    from .training.checkpoints import checkpoint_step, is_complete

    candidates = [Path(spec)] + ([Path(source) / spec] if source is not None and Path(source).is_dir() else [])
    for folder in candidates:
        if checkpoint_step(folder) is None or not folder.is_dir():
            continue
        if not is_complete(folder):
            raise InputError(f"{folder} is an incomplete checkpoint (no training_state.json): pick a complete one.")
        return folder
    if checkpoint_step(spec) is not None and not Path(spec).exists():
        raise InputError(f"There is no checkpoint folder {spec}" + (f" (nor in {source})" if source else "") + ".")
    return None


def checkpoint_guide(folder: str | os.PathLike, pipeline) -> torch.nn.Module:
    """A UNet of `pipeline`'s config with the weights of `folder`, a checkpoint of the same run (EMA if it has
    one). The latent space is the run's; the prediction type its training_args.json records is checked."""
    from diffusers import UNet2DModel

    from .training.checkpoints import load_checkpoint_model

    guide = UNet2DModel.from_config(pipeline.unet.config)
    which = load_checkpoint_model(folder, guide)
    model = model_space(pipeline)
    recorded = _run_arguments(folder).get("prediction_type")
    check_fits(replace(model, prediction_type=recorded or model.prediction_type), model)
    logger.info("Guide: the %s weights of %s", which, folder)
    return _ready(guide, pipeline)


def base_guide(pipeline, source: str | os.PathLike | None):
    """The base of the DreamBooth result at `source`: for a LoRA result the pipeline's UNet with the adapter
    switched off (no second copy), else the base model its training_args.json names."""
    from .lora import holds_lora_adapter

    if source is None:
        raise InputError(f"'{BASE}' guides a DreamBooth result with its base model: say which result (its folder).")
    if holds_lora_adapter(source):
        try:
            return pipeline.lora_base_guide()
        except ValueError as error:
            raise InputError(f"'{BASE}' for the LoRA result {source}: {error}") from error
    base = _run_arguments(source).get("pretrained_model_name_or_path")
    if not base:
        raise InputError(f"'{BASE}' guides a fine-tune with the model it started from, but {source} records none "
                         "(no training_args.json with pretrained_model_name_or_path): give the base model's folder "
                         "or hub id as the guide instead.")
    return pipeline_guide(base, pipeline)


def _run_arguments(folder: str | os.PathLike) -> dict:
    from .training.launch import RUN_ARGUMENTS_FILE

    path = Path(folder) / RUN_ARGUMENTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _ready(guide: torch.nn.Module, pipeline) -> torch.nn.Module:
    """A guide on the model's device and dtype, frozen for sampling."""
    unet = pipeline.unet
    return guide.to(device=unet.device, dtype=unet.dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Guidance of the samples a training run draws (validation grids, FID)


@dataclass(frozen=True)
class Guidance:
    """A guide with its weight and interval, for the pipelines a run builds around its model at each validation.
    `guide` is a UNet, or ADAPTER_OFF: each pipeline's own UNet with its LoRA switched off."""

    guide: Any
    scale: float = 1.0
    interval: tuple[float, float] | None = None

    def apply(self, pipeline):
        guide = pipeline.lora_base_guide() if self.guide is ADAPTER_OFF else self.guide.to(pipeline.unet.device)
        pipeline.set_guidance(guide, self.scale, self.interval)
        return pipeline


def training_guidance(config, pipeline, base: str | None = None, lora: bool = False) -> Guidance | None:
    """The guidance of a run's validation (`config`: uldm.validation.ValidationConfig, --validation_guide ...),
    loaded once and checked against `pipeline` (the run's model as validation samples it); None without a guide.
    `base`: the model the run starts from (--validation_guide base); `lora`: the run trains a LoRA adapter, so
    its base is the same UNet with the adapter switched off."""
    spec = config.validation_guide
    if not spec:
        return None
    if str(spec).strip().lower() == BASE:
        if not base:
            raise InputError(f"--validation_guide {BASE} guides with the model the run starts from: give "
                             "--pretrained_model_name_or_path (or a guide folder).")
        guide = ADAPTER_OFF if lora else pipeline_guide(base, pipeline)
    else:
        guide = load_guide(spec, pipeline)
    interval = tuple(config.validation_guidance_interval) if config.validation_guidance_interval else None
    logger.info("Validation samples guided by %s with weight %g%s", spec, config.validation_guidance_scale,
                f", noise levels {interval}" if interval else "")
    return Guidance(guide, config.validation_guidance_scale, interval)
