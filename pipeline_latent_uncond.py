"""Unconditional latent diffusion pipeline: a UNet2DModel denoises latents, a VAE decodes them.

This file is self-contained (it imports only torch, diffusers and the standard library): a copy of
it travels inside every pipeline folder that `UnconditionalLatentPipeline.save_pretrained` writes,
so that anyone can load the folder with

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

It holds what such a receiver runs: the pipeline class, the latent-scale rule, the denoising loop and
the LoRA methods. Loading is diffusers' own; `UnconditionalLatentPipeline.from_pretrained(folder)` on a
folder this class saved loads it as this class (see `load_config`). The toolkit's scripts load with
`uldm.pipeline_loading.load_pipeline`, which never runs code from a model folder and also reads the
CompVis LDM layout (`LDMPipeline` with a `vqvae`, e.g. CompVis/ldm-celebahq-256).

LoRA: diffusers' `UNet2DModel` has no adapter mixin, so the pipeline carries diffusers' LoRA methods
(`load_lora_weights`, `save_lora_weights`, `fuse_lora`, ... see `UNet2DLoraLoaderMixin`), files in
diffusers' LoRA layout. At module level only torch, diffusers and the standard library are imported;
peft (LoRA only) and safetensors (a dependency of diffusers) are imported inside the methods that need
them.

Latent scaling. The UNet works on `z = (vae_latent - shift) * scale`; decoding uses
`vae.decode(z / scale + shift)`. When no scale is given it is resolved from the VAE by
`configured_latent_scaling`, the project's one rule (the training code imports it from here):
1.0 for a `VQModel` (diffusers issue #6725), otherwise the `scaling_factor`/`shift_factor` that the
VAE's config file sets; diffusers' filled-in default 0.18215 does not count as set.

VQ latents, as in CompVis LDM: the diffusion model lives on the *pre-quantisation* latents,
`vae.encode(x).latents` (see `encode_images`), and decoding goes through the codebook
(`VQModel.decode` quantises by default, `force_not_quantize=False`), so every sample decodes from
valid codebook entries, exactly like CompVis' `decode_first_stage` and diffusers' `LDMPipeline`.
"""

import importlib.util
import inspect
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline, ImagePipelineOutput, UNet2DModel, VQModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor

PIPELINE_MODULE_NAME = "pipeline_latent_uncond"
PIPELINE_CLASS_NAME = "UnconditionalLatentPipeline"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SUPPORTED_VAE_CLASSES = (AutoencoderKL, VQModel, AutoencoderTiny)


def configured_latent_scaling(vae) -> tuple[float | None, float]:
    """(scale, shift) that the VAE itself sets: the one latent-scale rule of this project.

    * `VQModel`: (1.0, 0.0) always. CompVis VQ-f4 latents are already near unit variance, and
      diffusers' `VQModel` reports `scaling_factor=0.18215` when its config lacks the key, which
      `LDMPipeline` then divides by (diffusers issue #6725).
    * `AutoencoderKL` / `AutoencoderTiny`: the config's `scaling_factor` and `shift_factor` where
      the config file sets them. diffusers fills a missing `scaling_factor` with 0.18215 and records
      that in `_use_default_values`; such a default is not a measured scale, so it gives None (the
      caller must measure or be told the scale). A missing or null shift is 0.
    """
    if isinstance(vae, VQModel):
        return 1.0, 0.0
    defaults = set(getattr(vae.config, "_use_default_values", None) or [])
    scale = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    if "scaling_factor" in defaults:
        scale = None
    if "shift_factor" in defaults or shift is None:
        shift = 0.0
    return (None if scale is None else float(scale)), float(shift)


def check_latent_scale(scale) -> float:
    scale = float(scale)
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"latent_scaling_factor must be a positive finite number, got {scale}.")
    return scale


def resolve_latent_scale(vae, latent_scaling_factor: float | None = None) -> float:
    """The factor that multiplies VAE latents before diffusion: the given one, else the VAE's own."""
    if latent_scaling_factor is not None:
        return check_latent_scale(latent_scaling_factor)
    scale, _ = configured_latent_scaling(vae)
    if scale is None:
        raise ValueError(
            f"Cannot tell the latent scale of a {type(vae).__name__}: its config sets no scaling_factor "
            "(diffusers' default 0.18215 is not a measured scale). Pass latent_scaling_factor=... "
            "(e.g. 1/std of its latents)."
        )
    return scale


def resolve_latent_shift(vae, latent_shift_factor: float | None = None) -> float:
    """The value subtracted from VAE latents before scaling; 0 unless the VAE (or the caller) sets one."""
    if latent_shift_factor is not None:
        return float(latent_shift_factor)
    return configured_latent_scaling(vae)[1]


def scale_latents(vae_latents: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    """VAE latents -> the latents the UNet is trained on: (z - shift) * scale."""
    return (vae_latents - shift) * scale


def unscale_latents(latents: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    """UNet latents -> VAE latents: z / scale + shift."""
    return latents / scale + shift


def vae_latent_channels(vae) -> int:
    """Channels of the latents the VAE decodes (a VQModel decodes vq_embed_dim channels)."""
    if isinstance(vae, VQModel):
        return vae.config.vq_embed_dim or vae.config.latent_channels
    return vae.config.latent_channels


# ------------------------------------------------------------------------------------------- LoRA

LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file names
LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig in the file
PEFT_ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's own layout, written by earlier DreamBooth runs
PEFT_ADAPTER_CONFIG = "adapter_config.json"


def scheduler_step_kwargs(scheduler, generator, eta: float) -> dict[str, Any]:
    """eta and the generator, for the schedulers whose step() takes them."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    return {name: value for name, value in (("eta", eta), ("generator", generator)) if name in accepted}


def noise_level(scheduler, t) -> float:
    """The noise level sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) of training timestep t (EDM's sigma)."""
    alpha_bar = scheduler.alphas_cumprod[int(t)].double()
    return float(((1 - alpha_bar) / alpha_bar).sqrt())


def in_interval(scheduler, t, guidance_interval) -> torch.Tensor:
    """Whether timestep t's noise level lies in (low, high]: a boolean tensor, one per sample for a batch of
    timesteps (e.g. a distillation's)."""
    low, high = guidance_interval
    t = torch.as_tensor(t)
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t.long()].double()
    levels = ((1 - alpha_bar) / alpha_bar).sqrt()
    return (low < levels) & (levels <= high)


def check_guide(unet, guide) -> None:
    """A guide must denoise the same samples: the same latent channels and size as the UNet it guides."""
    if guide is None or not hasattr(guide, "config"):  # a callable (e.g. the UNet with its LoRA switched off)
        return
    for name in ("in_channels", "out_channels", "sample_size"):
        ours, theirs = unet.config.get(name), guide.config.get(name)
        if ours != theirs:
            raise ValueError(f"The guide's UNet has {name} {theirs}, the guided UNet {ours}: a guide must be a "
                             "model of the same latent space (an earlier checkpoint, a smaller model trained on "
                             "the same latents, or the base of a fine-tune).")


def guided_model(unet, guide=None, guidance_scale: float | Callable[[], float] = 1.0, guidance_interval=None,
                 scheduler=None) -> Callable:
    """The model of each denoising step: `unet`, or with a guide `g + w * (m - g)`, w = guidance_scale (a number,
    or a function read at every step, so that a step-end callback may change it as diffusers' pipelines allow).

    Autoguidance (Karras et al. 2024) guides a model with a weaker version of itself (an earlier checkpoint,
    a smaller model); guiding a fine-tune with its base (domain guidance) makes the subject's strength a dial.
    The rule is the same for noise, v and sample predictions (each is linear in the denoiser's output at a
    fixed x_t and t). w = 1 is the model alone and never runs the guide; w = 0 is the guide alone.
    `guidance_interval=(lo, hi)` guides only steps whose noise level (see `noise_level`) lies in (lo, hi]
    (Kynkäänniemi et al. 2024); the others use the model alone.
    """
    def output(model, model_input, t):
        result = model(model_input, t)
        return result.sample if hasattr(result, "sample") else result

    def guided(model_input, t):
        weight = guidance_scale() if callable(guidance_scale) else guidance_scale
        if guide is None or weight == 1.0:
            return output(unet, model_input, t)
        inside = torch.tensor(True) if guidance_interval is None else in_interval(scheduler, t, guidance_interval)
        if not inside.any():
            return output(unet, model_input, t)
        guide_output = output(guide, model_input, t)
        if weight == 0.0 and inside.all():
            return guide_output
        model_output = output(unet, model_input, t)
        result = guide_output + weight * (model_output - guide_output)
        if inside.all():
            return result
        # A batch of timesteps, some outside the interval: those samples get the model alone.
        return torch.where(inside.reshape(-1, *[1] * (result.ndim - 1)), result, model_output)

    return guided


def denoise(model: Callable, scheduler, noise: torch.Tensor, step_kwargs: dict,
            on_step: Callable | None = None) -> torch.Tensor:
    """Run `scheduler.timesteps` (set before) from `noise` (already times init_noise_sigma); returns the final
    sample. `model(x, t)` gives the model output (see `guided_model`); `on_step(step_index, t, sample)` runs
    after each step and may return a replacement sample."""
    sample = noise
    for step_index, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(sample, t)
        # Euler-type schedulers cast their result to the model output's dtype: under autocast that
        # would round the latents to half precision at every step.
        model_output = model(model_input, t).to(sample.dtype)
        sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample
        if on_step is not None:
            replaced = on_step(step_index, t, sample)
            sample = sample if replaced is None else replaced
    return sample


def _require_peft(method: str) -> None:
    if importlib.util.find_spec("peft") is None:
        raise ValueError(f"PEFT backend is required for `{method}()`: pip install peft.")


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


class UNet2DLoraLoaderMixin:
    """diffusers' LoRA API (as on its Stable Diffusion pipelines) for a pipeline with a `UNet2DModel`.

    diffusers' `UNet2DModel` has no adapter mixin, so the pipeline provides `load_lora_weights`,
    `lora_state_dict`, `save_lora_weights`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights`,
    `set_adapters`, `disable_lora`/`enable_lora`, `delete_adapters`, `get_active_adapters` and
    `get_list_adapters`, with diffusers' names, arguments and errors. Files are in diffusers' layout:
    `pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A.weight` (peft format), the adapter's
    LoraConfig in the file's `lora_adapter_metadata`, so that rank, alpha and target modules come back.
    peft's own layout (`adapter_model.safetensors` + `adapter_config.json`) loads as well.
    peft is imported only here: without it, the pipeline still loads and samples.
    """

    _lora_loadable_modules = ["unet"]
    unet_name = "unet"
    _merged_adapters = frozenset()

    @property
    def num_fused_loras(self) -> int:
        return len(self._merged_adapters)

    @property
    def fused_loras(self) -> set:
        return set(self._merged_adapters)

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        """(state_dict, network_alphas), plus the adapter metadata with `return_lora_metadata=True`.

        A dict, a folder, a file or a hub id; options `weight_name`, `subfolder`, `use_safetensors`,
        `cache_dir`, `force_download`, `proxies`, `local_files_only`, `token`, `revision` as in diffusers.
        A folder in peft's layout gives its weights under the `unet.` prefix and its adapter_config.json
        as metadata. network_alphas is None: this layout keeps alpha in the metadata.
        """
        hub = {name: kwargs.pop(name, None) for name in ("cache_dir", "proxies", "local_files_only", "token",
                                                          "revision", "subfolder")}
        force_download = kwargs.pop("force_download", False)
        weight_name = kwargs.pop("weight_name", None)
        use_safetensors = kwargs.pop("use_safetensors", None)
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        kwargs.pop("unet_config", None)

        source = pretrained_model_name_or_path_or_dict
        peft_folder = None
        if not isinstance(source, dict) and os.path.isdir(os.path.join(str(source), hub["subfolder"] or "")):
            folder = os.path.join(str(source), hub["subfolder"] or "")
            has_diffusers_file = any(os.path.isfile(os.path.join(folder, name))
                                     for name in (LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME))
            if os.path.isfile(os.path.join(folder, PEFT_ADAPTER_CONFIG)) and (
                    weight_name in (None, PEFT_ADAPTER_WEIGHTS) and not (weight_name is None and has_diffusers_file)):
                peft_folder = folder
        if isinstance(source, dict):
            state_dict, metadata = dict(source), None
        elif peft_folder is not None:
            state_dict, metadata = _read_peft_adapter_folder(peft_folder)
        else:
            from diffusers.loaders.lora_base import _fetch_state_dict

            allow_pickle = use_safetensors is None
            state_dict, metadata = _fetch_state_dict(
                pretrained_model_name_or_path_or_dict=source, weight_name=weight_name,
                use_safetensors=True if use_safetensors is None else use_safetensors,
                local_files_only=hub["local_files_only"], cache_dir=hub["cache_dir"], force_download=force_download,
                proxies=hub["proxies"], token=hub["token"], revision=hub["revision"], subfolder=hub["subfolder"],
                user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"}, allow_pickle=allow_pickle,
            )
        return (state_dict, None, metadata) if return_lora_metadata else (state_dict, None)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs):
        """Put a LoRA adapter (see `lora_state_dict` for where from) onto `self.unet`, as diffusers does.

        adapter_name: defaults to `default_<n>`; hotswap=True replaces the weights of the loaded adapter of
        that name in place (same targets; see peft's hotswap). low_cpu_mem_usage is passed to peft.
        """
        _require_peft("load_lora_weights")
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        kwargs["return_lora_metadata"] = True
        state_dict, network_alphas, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        if not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint. Make sure all LoRA param names contain `'lora'` substring.")
        self.load_lora_into_unet(state_dict, network_alphas, self.unet, adapter_name=adapter_name, _pipeline=self,
                                 low_cpu_mem_usage=low_cpu_mem_usage, hotswap=hotswap, metadata=metadata)

    @classmethod
    def load_lora_into_unet(cls, state_dict, network_alphas, unet, adapter_name=None, _pipeline=None,
                            low_cpu_mem_usage=False, hotswap: bool = False, metadata=None):
        """Inject the `unet.`-prefixed LoRA layers of `state_dict` into `unet` (a UNet2DModel)."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from diffusers.utils.peft_utils import get_adapter_name, get_peft_kwargs
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        prefix = f"{cls.unet_name}."
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if metadata is not None:
            metadata = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)} or None
        if not state_dict:
            _lora_logger.warning(
                f"No LoRA keys associated to {type(unet).__name__} found with the prefix='{cls.unet_name}'. This is "
                "safe to ignore if LoRA state dict didn't originally have any "
                f"{type(unet).__name__} related params."
            )
            return
        loaded = getattr(unet, "peft_config", {})
        if adapter_name in loaded and not hotswap:
            raise ValueError(
                f"Adapter name {adapter_name} already in use in the model - please select a new adapter name."
            )
        if hotswap and adapter_name not in loaded:
            raise ValueError(
                f"Trying to hotswap LoRA adapter '{adapter_name}' but there is no existing adapter by that name. "
                "Please choose an existing adapter name or set `hotswap=False` to prevent hotswapping."
            )
        adapter_name = adapter_name or get_adapter_name(unet)
        if "lora_A" not in next(iter(state_dict)):
            state_dict = convert_unet_state_dict_to_peft(state_dict)  # the older diffusers key names
        if metadata is not None:
            config = LoraConfig(**_lora_config_fields(metadata))
        else:
            ranks = {f"^{key}": value.shape[1] for key, value in state_dict.items()
                     if "lora_B" in key and value.ndim > 1}
            config = LoraConfig(**get_peft_kwargs(ranks, network_alphas, state_dict, is_unet=True))

        offloaded = _disable_offloading(_pipeline)
        try:
            if hotswap:
                from peft.utils.hotswap import check_hotswap_configs_compatible, hotswap_adapter_from_state_dict

                check_hotswap_configs_compatible(unet.peft_config[adapter_name], config)
                named = {re.sub(r"\.(lora_[AB])\.(weight|bias)$", rf".\1.{adapter_name}.\2", k): v
                         for k, v in state_dict.items()}
                hotswap_adapter_from_state_dict(model=unet, state_dict=named, adapter_name=adapter_name, config=config)
                incompatible = None
            else:
                inject_options = {"adapter_name": adapter_name, "low_cpu_mem_usage": low_cpu_mem_usage}
                if "state_dict" in inspect.signature(inject_adapter_in_model).parameters:
                    inject_options["state_dict"] = state_dict  # the targets are the file's modules
                inject_adapter_in_model(config, unet, **inject_options)
                incompatible = set_peft_model_state_dict(unet, state_dict, adapter_name,
                                                         low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception:
            if adapter_name in getattr(unet, "peft_config", {}) and not hotswap:
                _delete_adapter(unet, adapter_name)
            raise
        finally:
            _restore_offloading(_pipeline, offloaded)
        unexpected = [k for k in getattr(incompatible, "unexpected_keys", None) or [] if ".lora_" in k]
        missing = [k for k in getattr(incompatible, "missing_keys", None) or [] if ".lora_" in k and adapter_name in k]
        if unexpected or missing:
            _lora_logger.warning(
                f"Loading adapter weights from state_dict led to unexpected keys {unexpected} and missing keys "
                f"{missing} in the model."
            )

    @classmethod
    def save_lora_weights(cls, save_directory: str | os.PathLike, unet_lora_layers=None, is_main_process: bool = True,
                          weight_name: str | None = None, save_function: Callable | None = None,
                          safe_serialization: bool = True, unet_lora_adapter_metadata: dict | None = None):
        """Write `unet_lora_layers` (a state dict of peft keys, or a module) in diffusers' LoRA layout:
        `pytorch_lora_weights.safetensors` with keys `unet.<key>`, and `unet_lora_adapter_metadata` (the
        adapter's `LoraConfig.to_dict()`) in the file's metadata, as diffusers >= 0.33 stores it."""
        if not unet_lora_layers:
            raise ValueError("You must pass `unet_lora_layers`.")
        if unet_lora_adapter_metadata and not safe_serialization:
            raise ValueError("`lora_adapter_metadata` cannot be specified when not using `safe_serialization`.")
        if unet_lora_adapter_metadata is not None and not isinstance(unet_lora_adapter_metadata, dict):
            raise TypeError("`lora_adapter_metadata` must be of type `dict`.")
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        layers = unet_lora_layers.state_dict() if isinstance(unet_lora_layers, torch.nn.Module) else unet_lora_layers
        state_dict = {f"{cls.unet_name}.{key}": value for key, value in layers.items()}
        if not is_main_process:
            return
        if save_function is None:
            if safe_serialization:
                from safetensors.torch import save_file  # a dependency of diffusers itself

                file_metadata = {"format": "pt"}
                if unet_lora_adapter_metadata:
                    packed = {f"{cls.unet_name}.{key}": sorted(value) if isinstance(value, set) else value
                              for key, value in unet_lora_adapter_metadata.items()}
                    file_metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)

                def save_function(weights, filename):
                    return save_file({k: v.contiguous() for k, v in weights.items()}, filename, metadata=file_metadata)
            else:
                save_function = torch.save
        os.makedirs(save_directory, exist_ok=True)
        weight_name = weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME)
        save_path = Path(save_directory, weight_name).as_posix()
        save_function(state_dict, save_path)
        _lora_logger.info(f"Model weights saved in {save_path}")

    def _lora_components(self, components) -> list:
        components = list(self._lora_loadable_modules if components is None else components)
        if not components:
            raise ValueError("`components` cannot be an empty list.")
        for name in components:
            if name not in self._lora_loadable_modules:
                raise ValueError(f"{name} is not found in self._lora_loadable_modules={self._lora_loadable_modules}.")
        return [getattr(self, name) for name in components]

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None, **kwargs):
        """Fold the (active, or the named) LoRA adapters into the UNet's weights, scaled by lora_scale.
        `unload_lora_weights()` afterwards leaves a plain UNet that saves and loads without peft."""
        _require_peft("fuse_lora")
        merged = set()
        for model in self._lora_components(components):
            for module in _tuner_layers(model):
                if lora_scale != 1.0:
                    module.scale_layer(lora_scale)
                module.merge(safe_merge=safe_fusing, adapter_names=adapter_names)
                merged.update(module.merged_adapters)
        self._merged_adapters = set(self._merged_adapters) | merged

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        """Take fused LoRA weights out of the UNet's weights again (the adapters stay loaded)."""
        _require_peft("unfuse_lora")
        for model in self._lora_components(components):
            for module in _tuner_layers(model):
                module.unmerge()
        self._merged_adapters = set()

    def unload_lora_weights(self):
        """Remove every LoRA layer from the UNet (fused weights stay in it)."""
        if getattr(self.unet, "peft_config", None) is None:
            return
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(self.unet)
        del self.unet.peft_config
        self._merged_adapters = set()

    def set_adapters(self, adapter_names: list[str] | str, adapter_weights: float | list[float] | None = None):
        """Make these adapters the active ones, each with its weight (the LoRA scale; default 1.0)."""
        _require_peft("set_adapters")
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(
                f"Length of adapter names {len(names)} is not equal to the length of their weights {len(weights)}."
            )
        present = set(self.get_list_adapters().get(self.unet_name, []))
        missing = [name for name in names if name not in present]
        if missing:
            raise ValueError(f"Adapter name(s) {set(missing)} not in the list of present adapters: {present}.")
        weights = [1.0 if weight is None else weight for weight in weights]
        set_weights_and_activate_adapters(self.unet, names, weights)

    def disable_lora(self):
        """Sample as if no adapter were loaded (they stay loaded)."""
        _require_peft("disable_lora")
        from diffusers.utils.peft_utils import set_adapter_layers

        set_adapter_layers(self.unet, enabled=False)

    def enable_lora(self):
        _require_peft("enable_lora")
        from diffusers.utils.peft_utils import set_adapter_layers

        set_adapter_layers(self.unet, enabled=True)

    def lora_base_guide(self) -> Callable:
        """The UNet with its LoRA switched off, as a guide: `pipe(guide=pipe.lora_base_guide(), guidance_scale=w)`
        samples the fine-tune guided by its base (w > 1 more subject, w < 1 more of the base's variety) while
        one copy of the weights is held."""
        _require_peft("lora_base_guide")
        if not _tuner_layers(self.unet):
            raise ValueError("lora_base_guide() needs a LoRA loaded into the UNet (load_lora_weights first).")
        if self.num_fused_loras:
            raise ValueError(f"The LoRA {sorted(self.fused_loras)} is fused into the UNet's weights, so it cannot be "
                             "switched off: unfuse_lora() first.")

        def base_model(model_input, t):
            self.disable_lora()
            try:
                return self.unet(model_input, t).sample
            finally:
                self.enable_lora()

        return base_model

    def delete_adapters(self, adapter_names: list[str] | str):
        _require_peft("delete_adapters")
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            _delete_adapter(self.unet, name)

    def get_active_adapters(self) -> list[str]:
        if getattr(self.unet, "peft_config", None) is None:
            return []
        layers = _tuner_layers(self.unet)
        return list(layers[0].active_adapters) if layers else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        loaded = getattr(self.unet, "peft_config", None)
        return {self.unet_name: list(loaded)} if loaded else {}


_lora_logger = diffusers_logging.get_logger("diffusers.loaders.lora_base")


def _read_peft_adapter_folder(folder: str) -> tuple[dict, dict]:
    """peft's layout as diffusers' LoRA layout: weights and config under the `unet.` prefix."""
    from safetensors.torch import load_file  # a dependency of diffusers itself

    weights = os.path.join(folder, PEFT_ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{folder} has {PEFT_ADAPTER_CONFIG} but no {PEFT_ADAPTER_WEIGHTS}.")
    config = json.loads(Path(folder, PEFT_ADAPTER_CONFIG).read_text())
    state_dict = {f"unet.{key}": value for key, value in load_file(weights).items()}
    return state_dict, {f"unet.{key}": value for key, value in config.items()}


def _lora_config_fields(metadata: dict) -> dict:
    """The metadata keys that this peft's LoraConfig knows (files from other peft versions carry others)."""
    from dataclasses import fields

    from peft import LoraConfig

    known = {field.name for field in fields(LoraConfig)}
    unknown = sorted(set(metadata) - known)
    if unknown:
        _lora_logger.warning(f"Ignoring LoRA metadata fields this peft version does not know: {unknown}.")
    return {key: value for key, value in metadata.items() if key in known}


def _delete_adapter(unet, adapter_name: str) -> None:
    from diffusers.utils.peft_utils import delete_adapter_layers

    delete_adapter_layers(unet, adapter_name)
    loaded = getattr(unet, "peft_config", None)
    if loaded is not None:
        loaded.pop(adapter_name, None)
        if not loaded:
            del unet.peft_config


def _disable_offloading(pipeline):
    """Take accelerate's CPU-offload hooks off while adapters are injected (diffusers' helper), returning
    which kind was on."""
    if pipeline is None:
        return None
    from diffusers.loaders.lora_base import _func_optionally_disable_offloading

    return _func_optionally_disable_offloading(_pipeline=pipeline)


def _restore_offloading(pipeline, offloaded) -> None:
    if not offloaded:
        return
    if offloaded[0]:
        pipeline.enable_model_cpu_offload()
    elif offloaded[1]:
        pipeline.enable_sequential_cpu_offload()


class UnconditionalLatentPipeline(DiffusionPipeline, UNet2DLoraLoaderMixin):
    r"""Unconditional image generation with a latent diffusion model.

    Args:
        unet: `UNet2DModel` that predicts what the scheduler expects (noise, v or sample) on latents.
        vae: `AutoencoderKL`, `VQModel` or `AutoencoderTiny` that decodes latents to images in [-1, 1].
        scheduler: any diffusers scheduler (DDPM, DDIM, DPMSolverMultistep, UniPC, Euler, ...).
        latent_scaling_factor: scale of the latents the UNet sees; None resolves it from the VAE.
        latent_shift_factor: shift subtracted before scaling; None resolves it from the VAE.
        guide: optional `UNet2DModel` that guides the UNet at sampling time (see `guided_model`): a weaker
            version of the same model (autoguidance) or the base of a fine-tune. Saved as a component.
        guidance_scale: the default guidance weight of `__call__` (1.0: unguided).
        guidance_interval_low, guidance_interval_high: the default guidance interval of `__call__` (noise levels;
            None: every step). Two numbers rather than a pair, since diffusers reads pairs in model_index.json
            as components.

    The resolved values are stored in the pipeline config, so `model_index.json` records the exact
    numbers used, and they come back to `__init__` on loading.
    """

    model_cpu_offload_seq = "unet->guide->vae"
    _optional_components = ["guide"]
    _callback_tensor_inputs = ["latents"]
    _guide_function = None  # a guide that is no component (set_guidance with a callable)

    def __init__(
        self,
        unet: UNet2DModel,
        vae: AutoencoderKL | VQModel | AutoencoderTiny,
        scheduler: SchedulerMixin,
        latent_scaling_factor: float | None = None,
        latent_shift_factor: float | None = None,
        guide: UNet2DModel | None = None,
        guidance_scale: float = 1.0,
        guidance_interval_low: float | None = None,
        guidance_interval_high: float | None = None,
    ):
        super().__init__()
        if not isinstance(vae, SUPPORTED_VAE_CLASSES):
            raise TypeError(
                f"vae must be one of {[c.__name__ for c in SUPPORTED_VAE_CLASSES]}, got {type(vae).__name__}."
            )
        if unet.config.in_channels != vae_latent_channels(vae):
            raise ValueError(
                f"The UNet takes {unet.config.in_channels}-channel latents but the {type(vae).__name__} "
                f"decodes {vae_latent_channels(vae)}-channel latents: they were not trained together."
            )
        check_guide(unet, guide)
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, guide=guide)
        self.register_to_config(
            latent_scaling_factor=resolve_latent_scale(vae, latent_scaling_factor),
            latent_shift_factor=resolve_latent_shift(vae, latent_shift_factor),
            guidance_scale=float(guidance_scale),
            guidance_interval_low=guidance_interval_low,
            guidance_interval_high=guidance_interval_high,
        )

    def set_guidance(self, guide: UNet2DModel | Callable | None, guidance_scale: float = 1.0,
                     guidance_interval: tuple[float, float] | None = None) -> None:
        """Make later calls guided by default: a `UNet2DModel` guide becomes the `guide` component (saved with
        the pipeline, with the weight and interval in its config); a callable such as `lora_base_guide()` is
        used by this pipeline object only. `set_guidance(None)` switches guidance off."""
        check_guide(self.unet, guide)
        is_component = guide is None or isinstance(guide, UNet2DModel)
        self.register_modules(guide=guide if is_component else None)
        self._guide_function = None if is_component else guide
        low, high = (None, None) if guidance_interval is None else guidance_interval
        self.register_to_config(guidance_scale=float(guidance_scale) if guide is not None else 1.0,
                                guidance_interval_low=low, guidance_interval_high=high)

    @property
    def default_guidance_interval(self) -> tuple[float, float] | None:
        """The config's guidance interval (guidance_interval_low/_high) as `__call__` takes it; None: every step."""
        low, high = self.config.guidance_interval_low, self.config.guidance_interval_high
        if (low, high) == (None, None):
            return None
        return (low or 0.0, float("inf") if high is None else high)

    # ----------------------------------------------------------------------------------------- latents

    @property
    def latent_scale(self) -> float:
        return float(self.config.latent_scaling_factor)

    @property
    def latent_shift(self) -> float:
        return float(self.config.latent_shift_factor)

    def scale_latents(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the latents the UNet is trained on: (z - shift) * scale."""
        return scale_latents(vae_latents, self.latent_scale, self.latent_shift)

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents -> VAE latents: z / scale + shift."""
        return unscale_latents(latents, self.latent_scale, self.latent_shift)

    @torch.no_grad()
    def encode_images(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sample_posterior: bool = True,
    ) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) -> scaled latents, as the UNet is trained on them.

        AutoencoderKL: a posterior sample (or its mode with sample_posterior=False).
        VQModel: the pre-quantisation latents `vae.encode(x).latents` (CompVis LDM convention).
        AutoencoderTiny: its deterministic latents.
        """
        encoded = self.vae.encode(images.to(device=self.vae.device, dtype=self.vae.dtype))
        if isinstance(self.vae, AutoencoderKL):
            posterior = encoded.latent_dist
            vae_latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        else:
            vae_latents = encoded.latents
        return self.scale_latents(vae_latents.float())

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 images (N, 3, H, W) in [0, 1]; decoding runs in the VAE's dtype."""
        vae_latents = self.unscale_latents(latents.float()).to(self.vae.dtype)
        # VQModel.decode quantises through the codebook by default; see the module docstring.
        images = self.vae.decode(vae_latents).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -------------------------------------------------------------------------------------- sampling

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, height, width)

    def check_inputs(self, batch_size, num_inference_steps, generator, latents, output_type, tensor_inputs):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for batch_size={batch_size}: give one generator per "
                "image (a list as long as batch_size) or a single generator for the whole batch."
            )
        if latents is not None and tuple(latents.shape) != self.latent_shape(batch_size):
            raise ValueError(
                f"latents has shape {tuple(latents.shape)}, but this UNet samples (batch_size, channels, height, "
                f"width) = {self.latent_shape(batch_size)}. Give noise of that shape, or set batch_size to match."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {unknown}."
            )

    def prepare_latents(self, batch_size, generator, latents, device, dtype) -> torch.Tensor:
        if latents is None:
            latents = randn_tensor(self.latent_shape(batch_size), generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        # Euler-type schedulers start from noise with the first step's sigma, not 1 (set_timesteps comes first).
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        """Pass eta and the generator only to schedulers whose step() takes them."""
        return scheduler_step_kwargs(self.scheduler, generator, eta)

    @property
    def guidance_scale(self) -> float:
        """The guidance weight of the call under way or last made (diffusers' convention: a step-end callback
        may change `_guidance_scale`); before any call, the pipeline's default (`config.guidance_scale`)."""
        return getattr(self, "_guidance_scale", self.config.guidance_scale)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        guide: UNet2DModel | Callable | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size: number of images.
            num_inference_steps: denoising steps.
            generator: one torch.Generator for the batch, or a list with one per image (then image i
                depends only on generator[i]).
            eta: DDIM's eta; passed only to schedulers whose `step` accepts it.
            latents: initial noise of shape (batch_size, C, H, W); drawn with `generator` when None.
            output_type: "pil" (list of PIL images), "np" (float32 N×H×W×3 in [0, 1]), "pt" (float32
                N×3×H×W in [0, 1]) or "latent" (the final scaled latents, not decoded).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.
            callback_on_step_end: called as `fn(pipe, step, timestep, {"latents": ...})` after each
                step; a "latents" entry in the dict it returns replaces the latents.
            callback_on_step_end_tensor_inputs: tensors handed to the callback (only "latents").
            guide: a model that guides this one: each step takes `g + w * (m - g)` (see `guided_model`); a
                `UNet2DModel` of the same latent space, or a callable `(x, t) -> output` such as
                `self.lora_base_guide()`. Default: the pipeline's own `guide` component, if any.
            guidance_scale: w; 1.0 is unguided (the guide never runs), 0.0 the guide alone. Default: the
                pipeline's `guidance_scale` config.
            guidance_interval: `(low, high)`: guide only the steps whose noise level lies in (low, high].
                Default: the pipeline's `guidance_interval_low`/`_high` config (None: every step).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            batch_size, num_inference_steps, generator, latents, output_type, callback_on_step_end_tensor_inputs
        )
        guide = guide if guide is not None else self.guide if self.guide is not None else self._guide_function
        self._guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        guidance_interval = self.default_guidance_interval if guidance_interval is None else guidance_interval
        check_guide(self.unet, guide)
        device = self._execution_device
        # Timesteps first: for Euler-type schedulers init_noise_sigma depends on them (with "leading" spacing
        # the 1000-step table's sigma_max is far above the first step's sigma).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(batch_size, generator, latents, device, self.unet.dtype)
        self._num_timesteps = len(timesteps)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        with self.progress_bar(total=len(timesteps)) as progress_bar:

            def on_step(step_index, t, latents):
                if callback_on_step_end is not None:
                    tensors = {name: latents for name in callback_on_step_end_tensor_inputs}
                    returned = callback_on_step_end(self, step_index, t, tensors) or {}
                    latents = returned.pop("latents", latents)
                progress_bar.update()
                return latents

            model = guided_model(self.unet, guide, lambda: self._guidance_scale, guidance_interval, self.scheduler)
            latents = denoise(model, self.scheduler, latents, extra_step_kwargs, on_step)

        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ------------------------------------------------------------------------------- saving, loading

    def to_json_string(self) -> str:
        """model_index.json names this file and class, so the folder loads with `trust_remote_code=True`."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = [PIPELINE_MODULE_NAME, PIPELINE_CLASS_NAME]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Write model_index.json (see `to_json_string`) with a copy of this file next to it.

        `DiffusionPipeline.save_pretrained` calls this after saving the components and before any
        upload, so `save_pretrained` takes all of diffusers' options (safe_serialization, variant,
        max_shard_size, push_to_hub with repo_id/token/private/create_pr/commit_message, ...) and a
        pushed repository holds the file too.
        """
        os.makedirs(save_directory, exist_ok=True)
        shutil.copyfile(Path(__file__), Path(save_directory) / f"{PIPELINE_MODULE_NAME}.py")
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """diffusers' `save_pretrained` (same options), refused while LoRA layers sit unfused in the UNet:
        the saved UNet would hold peft's layer names, which no loader reads."""
        if getattr(self.unet, "peft_config", None):
            raise ValueError(
                f"The UNet carries LoRA adapters {sorted(self.unet.peft_config)}. Save them with "
                "save_lora_weights(...), or fold them in first (pipe.fuse_lora(); pipe.unload_lora_weights()) to save "
                "a plain pipeline."
            )
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' reader of model_index.json, which `from_pretrained` asks of the class it is called on.

        A folder this class saved names it as [this file, this class] (see `to_json_string`). Asked of this
        class, that reads as the class itself, so `UnconditionalLatentPipeline.from_pretrained(folder)` loads
        with the class at hand, as diffusers' own pipelines do, rather than importing the folder's copy of
        this file (which diffusers refuses without trust_remote_code=True). `DiffusionPipeline.from_pretrained`
        reads the folder through its own load_config and still uses the copy.
        """
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if config.get("_class_name") == [PIPELINE_MODULE_NAME, PIPELINE_CLASS_NAME]:
            config["_class_name"] = PIPELINE_CLASS_NAME
        return loaded
