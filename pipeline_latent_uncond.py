"""Unconditional latent diffusion pipeline: a UNet2DModel denoises latents, a VAE decodes them.

This file is self-contained (it imports only torch, diffusers and the standard library): a copy of
it travels inside every pipeline folder that `UnconditionalLatentPipeline.save_pretrained` writes,
so that anyone can load the folder with

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

The project's own scripts load with `UnconditionalLatentPipeline.from_pretrained(folder_or_hub_id)`
instead: it takes `DiffusionPipeline.from_pretrained`'s options and errs and logs like it, but reads
`model_index.json` itself and never runs code found in a model folder. That path also loads the
CompVis LDM layout (`LDMPipeline` with a `vqvae`, e.g. CompVis/ldm-celebahq-256).

LoRA: diffusers' `UNet2DModel` has no adapter mixin, so the pipeline carries diffusers' LoRA methods
(`load_lora_weights`, `save_lora_weights`, `fuse_lora`, ... see `UNet2DLoraLoaderMixin`), files in
diffusers' LoRA layout. At module level only torch, diffusers and the standard library are imported;
peft (LoRA only), huggingface_hub (hub downloads), safetensors and accelerate (device maps) are
imported inside the methods that need them, the last three being diffusers' own dependencies.

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

import contextlib
import importlib.util
import inspect
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

import diffusers
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline, ImagePipelineOutput, UNet2DModel, VQModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor

PIPELINE_MODULE_NAME = "pipeline_latent_uncond"
PIPELINE_CLASS_NAME = "UnconditionalLatentPipeline"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SUPPORTED_VAE_CLASSES = (AutoencoderKL, VQModel, AutoencoderTiny)

# Which diffusers classes each component of a loadable pipeline folder may have.
_COMPONENT_BASES = {"unet": (UNet2DModel,), "vae": SUPPORTED_VAE_CLASSES, "scheduler": (SchedulerMixin,)}
# model_index.json names this loader accepts, and how their components map onto ours.
_OWN_LAYOUT = {"unet": "unet", "vae": "vae", "scheduler": "scheduler"}
_COMPVIS_LDM_LAYOUT = {"unet": "unet", "vqvae": "vae", "scheduler": "scheduler"}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


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


def guided_model(unet, guide=None, guidance_scale: float = 1.0, guidance_interval=None, scheduler=None) -> Callable:
    """The model of each denoising step: `unet`, or with a guide `g + w * (m - g)`, w = guidance_scale.

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
        guiding = guide is not None and guidance_scale != 1.0
        if guiding and guidance_interval is not None:
            low, high = guidance_interval
            guiding = low < noise_level(scheduler, t) <= high
        if not guiding:
            return output(unet, model_input, t)
        guide_output = output(guide, model_input, t)
        if guidance_scale == 0.0:
            return guide_output
        return guide_output + guidance_scale * (output(unet, model_input, t) - guide_output)

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
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        low, high = self.config.guidance_interval_low, self.config.guidance_interval_high
        if guidance_interval is None and (low, high) != (None, None):
            guidance_interval = (low or 0.0, float("inf") if high is None else high)
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

            model = guided_model(self.unet, guide, guidance_scale, guidance_interval, self.scheduler)
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
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> "UnconditionalLatentPipeline":
        """Load a saved pipeline (local folder or hub id) like `DiffusionPipeline.from_pretrained`, but
        without running any code from it.

        Takes the options of `DiffusionPipeline.from_pretrained` with their meaning there: `dtype` (or
        `torch_dtype`; a torch.dtype or a dict per component with a "default" key), `device_map`
        ("balanced", "cpu" or the accelerator), `max_memory`, `offload_folder`, `offload_state_dict`,
        `low_cpu_mem_usage`, `variant`, `use_safetensors`, `disable_mmap`, `use_flashpack`,
        `quantization_config`, `cache_dir`, `revision`, `token`, `local_files_only`, `force_download`,
        `proxies`, components passed in (`unet=`, `vae=`, `scheduler=`; `vqvae=` for the CompVis layout),
        and the pipeline's own `latent_scaling_factor` / `latent_shift_factor` (override the saved
        values). Also `subfolder` (a pipeline inside a bigger repository). Errors and log messages are
        diffusers' (e.g. its error for a missing variant; "Loaded unet as UNet2DModel from `unet`
        subfolder of ..." at INFO). Other keyword arguments are ignored with diffusers' warning.

        Unlike diffusers' loader it reads `model_index.json` itself, accepts only an unconditional
        latent pipeline (ours, or CompVis' `LDMPipeline` layout with `vqvae`, which gets latent scale
        1.0) whose components are classes of the `diffusers` library, and loads each component with
        that class's `from_pretrained`: the copy of this file in the folder is never imported (a
        hub download skips `.py` files altogether), `custom_pipeline` is refused, and
        `trust_remote_code` has nothing to allow. Weights: safetensors when present; a legacy `.bin` is
        read by diffusers with `torch.load(weights_only=True)`; `use_safetensors=True` refuses `.bin`.
        """
        options = {name: kwargs.pop(name, default) for name, default in _DIFFUSERS_LOAD_OPTIONS.items()}
        subfolder = kwargs.pop("subfolder", None)
        _check_load_options(options, kwargs)
        dtype = _resolve_dtype_option(options["dtype"], options["torch_dtype"])
        source = str(pretrained_model_name_or_path)
        passed = {name: kwargs.pop(name) for name in ("unet", "vae", "scheduler", "vqvae") if name in kwargs}
        overrides = {name: kwargs.pop(name) for name in ("latent_scaling_factor", "latent_shift_factor")
                     if name in kwargs}
        if kwargs:
            _loader_logger.warning(
                f"Keyword arguments {kwargs} are not expected by {cls.__name__} and will be ignored."
            )

        if _is_local_source(source):
            folder = os.path.join(source, subfolder or "")
            model_index = _read_model_index(folder, source)
        else:
            with _explain_hub_errors(source):
                folder = _download_pipeline_snapshot(source, subfolder, options, passed)
            model_index = _read_model_index(folder, source)
        layout, is_compvis_ldm = _component_layout(model_index, source)
        if "vqvae" in passed:
            if not is_compvis_ldm or "vae" in passed:
                raise ValueError("vqvae= is the CompVis LDM layout's name for the VAE; pass the VAE once, as vae=.")
            passed["vae"] = passed.pop("vqvae")

        model_variants = _variants_to_load(folder, options["variant"], model_index)
        to_load = {saved: ours for saved, ours in layout.items() if ours not in passed}
        classes = {saved: _diffusers_class_for(ours, saved, model_index[saved], source)
                   for saved, ours in to_load.items()}
        device_maps = _component_device_maps(options, dtype, cls, layout, classes, folder)

        components = dict(passed)
        progress = {"desc": "Loading pipeline components..."}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            progress["disable"] = True
        for saved_name, our_name in diffusers_logging.tqdm(list(to_load.items()), **progress):
            component_class = classes[saved_name]
            path = os.path.join(folder, saved_name)
            if issubclass(component_class, SchedulerMixin):
                components[our_name] = component_class.from_pretrained(path)
            else:
                component_dtype = dtype
                if isinstance(dtype, dict):
                    component_dtype = dtype.get(our_name, dtype.get(saved_name, dtype.get("default", torch.float32)))
                component_options = _model_load_options(options, component_dtype, device_maps.get(our_name),
                                                        model_variants.get(saved_name), our_name)
                components[our_name] = _load_model(component_class, path, component_options)
            _loader_logger.info(
                f"Loaded {our_name} as {component_class.__name__} from `{saved_name}` subfolder of {source}."
            )

        config_values = {
            "latent_scaling_factor": 1.0 if is_compvis_ldm else model_index.get("latent_scaling_factor"),
            "latent_shift_factor": 0.0 if is_compvis_ldm else model_index.get("latent_shift_factor"),
        }
        config_values.update({name: value for name, value in overrides.items() if value is not None})
        pipeline = cls(**components, **config_values)
        pipeline.register_to_config(_name_or_path=source)
        if options["device_map"] is not None:
            pipeline.hf_device_map = device_maps.get("_final")
        if options["quantization_config"] is not None:
            pipeline.quantization_config = options["quantization_config"]
        return pipeline


# ------------------------------------------------------------------------------ loading helpers

# The records of diffusers' pipeline loader: users who set diffusers' verbosity see these messages.
_loader_logger = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")

# DiffusionPipeline.from_pretrained's options (diffusers 0.42) and their defaults there.
_DIFFUSERS_LOAD_OPTIONS = {
    "cache_dir": None, "force_download": False, "proxies": None, "local_files_only": None, "token": None,
    "revision": None, "torch_dtype": None, "dtype": None, "custom_pipeline": None, "custom_revision": None,
    "provider": None, "sess_options": None, "provider_options": None, "device_map": None, "max_memory": None,
    "offload_folder": None, "offload_state_dict": None, "low_cpu_mem_usage": None, "variant": None,
    "use_safetensors": None, "use_onnx": None, "load_connected_pipeline": False, "quantization_config": None,
    "use_flashpack": False, "disable_mmap": False, "trust_remote_code": False,
}


class NotAPipelineError(FileNotFoundError, ValueError):
    """No saved pipeline there: diffusers raises ValueError for such paths, callers of a file loader expect
    FileNotFoundError; this is both."""


class MissingWeightsError(OSError):
    """The repository lacks the weights asked for (diffusers' EnvironmentError): not a download failure."""


def _check_load_options(options: dict, kwargs: dict) -> None:
    """diffusers' checks of its loading options, with its messages."""
    if "dduf_file" in kwargs:
        raise ValueError(
            "Loading pipelines from DDUF files is no longer supported. Please save and load your pipelines using the "
            "standard Diffusers directory format instead."
        )
    if options["custom_pipeline"] is not None:
        raise ValueError(
            f"custom_pipeline={options['custom_pipeline']!r} names code to run; {PIPELINE_CLASS_NAME}.from_pretrained "
            "never runs code from elsewhere. Use DiffusionPipeline.from_pretrained(..., custom_pipeline=..., "
            "trust_remote_code=True) for that."
        )
    quantization_config = options["quantization_config"]
    if quantization_config is not None:
        from diffusers.quantizers import PipelineQuantizationConfig

        if not isinstance(quantization_config, PipelineQuantizationConfig):
            raise ValueError("`quantization_config` must be an instance of `PipelineQuantizationConfig`.")
    device_map = options["device_map"]
    if device_map is None:
        return
    from diffusers.pipelines import pipeline_utils
    from diffusers.utils import is_accelerate_available

    supported = getattr(pipeline_utils, "SUPPORTED_DEVICE_MAP", ["balanced"])
    if not is_accelerate_available():
        raise NotImplementedError(
            "Using `device_map` requires the `accelerate` library. Please install it using: `pip install accelerate`."
        )
    if not isinstance(device_map, str):
        raise ValueError("`device_map` must be a string.")
    if device_map not in supported:
        raise NotImplementedError(f"{device_map} not supported. Supported strategies are: {', '.join(supported)}")
    if options["low_cpu_mem_usage"] is False:
        raise ValueError(
            f"You cannot set `low_cpu_mem_usage` to False while using device_map={device_map} for loading and"
            " dispatching. Please make sure to set `low_cpu_mem_usage=True`."
        )


def _resolve_dtype_option(dtype, torch_dtype):
    """`dtype`, or the older name `torch_dtype` (diffusers' own resolution, with its deprecation notice, where
    the installed diffusers has one); anything but a torch.dtype or a dict becomes float32, as there."""
    from diffusers import utils as diffusers_utils

    resolve = getattr(diffusers_utils, "_resolve_dtype", None)
    if resolve is not None:
        dtype = resolve(dtype, torch_dtype)
    elif torch_dtype is not None:
        if dtype is not None:
            raise ValueError(
                "You have passed both `dtype` and `torch_dtype`. Please only pass `dtype`, `torch_dtype` is deprecated."
            )
        dtype = torch_dtype
    if dtype is not None and not isinstance(dtype, (dict, torch.dtype)):
        _loader_logger.warning(f"Passed `dtype` {dtype} is not a `torch.dtype`. Defaulting to `torch.float32`.")
        dtype = torch.float32
    return dtype


def _is_local_source(source: str) -> bool:
    """A folder on disk, or else a hub id ('name' or 'owner/name'); anything else is a missing folder."""
    if os.path.isdir(source):
        return True
    if os.path.exists(source) or not _HUB_ID.fullmatch(source):
        raise NotAPipelineError(
            f"{source} is not a folder. Give a folder written by save_pretrained (it holds model_index.json) "
            "or a Hugging Face hub id such as 'CompVis/ldm-celebahq-256'."
        )
    return False


@contextlib.contextmanager
def _explain_hub_errors(source: str):
    """Turn a hub download failure into one message that says what to do, keeping the original as cause."""
    try:
        yield
    except MissingWeightsError:
        raise
    except OSError as error:
        raise OSError(
            f"'{source}' is not a local folder, and loading it as a Hugging Face hub id failed ({error}). "
            "The hub may be unreachable (this machine may be offline), the id may be wrong, or the repository may "
            "be private (pass token=...). To work offline, download the snapshot where there is network (e.g. "
            f"`hf download {source} --local-dir DIR`) and pass that folder instead of the id, or set "
            "HF_HUB_OFFLINE=1 to use a snapshot already in the Hugging Face cache."
        ) from error


def _download_pipeline_snapshot(repo_id: str, subfolder: str | None, options: dict, passed: dict) -> str:
    """The local snapshot of a hub pipeline: model_index.json and the files of the components to load,
    chosen as diffusers chooses them (safetensors unless told otherwise, the variant where there is one),
    and never a `.py` file. Offline, or with the hub unreachable, the snapshot in the Hugging Face cache."""
    import huggingface_hub  # a dependency of diffusers itself; only loading from the hub needs it

    hub = {name: options[name] for name in ("cache_dir", "token", "revision")}
    local_only = bool(options["local_files_only"]) or huggingface_hub.constants.HF_HUB_OFFLINE
    files = None
    if not local_only:
        try:
            files = huggingface_hub.list_repo_files(repo_id, revision=hub["revision"], token=hub["token"])
        except Exception as error:  # noqa: BLE001 (network, auth, missing repo: diffusers then tries the cache)
            _loader_logger.warning(f"Couldn't connect to the Hub: {error}.\nWill try to load from local cache.")
            local_only = True
    download = {**hub, "local_files_only": local_only}
    if options["force_download"]:
        download["force_download"] = True
    index_file = huggingface_hub.hf_hub_download(repo_id, "model_index.json", subfolder=subfolder, **download)
    model_index = json.loads(Path(index_file).read_text())
    layout, _ = _component_layout(model_index, repo_id)  # refuse other pipelines before fetching their weights
    prefix = f"{subfolder}/" if subfolder else ""
    wanted = [prefix + saved for saved, ours in layout.items() if ours not in passed
              and not (ours == "vae" and "vqvae" in passed)]
    allow = [prefix + "model_index.json"] + [f"{name}/*" for name in wanted]
    if files is not None:
        allow = [prefix + "model_index.json"] + _files_to_fetch(files, wanted, options["use_safetensors"],
                                                                options["variant"])
    root = huggingface_hub.snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=["*.py", "*.pyc"],
                                             **download)
    return os.path.join(root, subfolder or "")


def _files_to_fetch(files: list[str], folders: list[str], use_safetensors: bool | None, variant: str | None) -> list:
    """The files of `folders` that diffusers' loader would fetch: configs, and the weights of one format and
    variant (its error when a variant or the safetensors asked for are missing)."""
    from diffusers.pipelines.pipeline_loading_utils import variant_compatible_siblings

    in_folders = [f for f in files if f.rpartition("/")[0] in folders and not f.endswith((".py", ".pyc"))]
    weights = [f for f in in_folders if f.endswith((".safetensors", ".bin"))]
    model_folders = {f.rpartition("/")[0] for f in weights}
    has_safetensors = all(any(f.startswith(folder + "/") and f.endswith(".safetensors") for f in weights)
                          for folder in model_folders)
    if use_safetensors and not has_safetensors:
        raise MissingWeightsError(
            f"Could not find the necessary `safetensors` weights in {weights} (variant={variant})")
    keep = ".safetensors" if (use_safetensors is not False and has_safetensors) else ".bin"
    weights = [f for f in weights if f.endswith(keep)]
    usable, _ = variant_compatible_siblings(weights, variant=variant)
    return [f for f in in_folders if f.endswith(".json")] + sorted(usable)


def _read_model_index(folder: str, source: str) -> dict:
    index_path = Path(folder, "model_index.json")
    if not index_path.is_file():
        raise NotAPipelineError(
            f"{index_path} does not exist: {source} is not a saved pipeline folder. Give the folder that "
            "save_pretrained wrote (it holds model_index.json and unet/, vae/, scheduler/)."
        )
    model_index = json.loads(index_path.read_text())
    model_index.pop("_ignore_files", None)
    return model_index


def _component_layout(model_index: dict, source: str) -> tuple[dict[str, str], bool]:
    """Which saved component names map onto unet/vae/scheduler, and whether this is CompVis' LDMPipeline."""
    class_name = model_index.get("_class_name")
    if isinstance(class_name, (list, tuple)):
        class_name = class_name[-1]
    saved = {k for k, v in model_index.items() if not k.startswith("_") and isinstance(v, (list, tuple))
             and v[0] is not None}
    if class_name == PIPELINE_CLASS_NAME:
        layout, is_compvis_ldm = _OWN_LAYOUT, False
    elif class_name == "LDMPipeline":
        layout, is_compvis_ldm = _COMPVIS_LDM_LAYOUT, True
    else:
        raise ValueError(
            f"{source} holds a {class_name} with components {sorted(saved)}, not an unconditional latent diffusion "
            f"pipeline ({PIPELINE_CLASS_NAME} with unet, vae, scheduler, or LDMPipeline with unet, vqvae, "
            "scheduler). Text-to-image or pixel-space pipelines cannot be loaded here."
        )
    if saved != set(layout):
        raise ValueError(
            f"{source}/model_index.json says {class_name} but lists components {sorted(saved)}; expected "
            f"{sorted(layout)}. The folder is incomplete or not an unconditional latent pipeline."
        )
    return layout, is_compvis_ldm


def _diffusers_class_for(our_name: str, saved_name: str, entry, source: str) -> type:
    library, class_name = entry
    component_class = getattr(diffusers, str(class_name), None) if library == "diffusers" else None
    allowed = _COMPONENT_BASES[our_name]
    if not (inspect.isclass(component_class) and issubclass(component_class, allowed)):
        raise ValueError(
            f"{source}: component '{saved_name}' is [{library!r}, {class_name!r}]; only classes from the diffusers "
            f"library that are {[c.__name__ for c in allowed]} are loaded (no code from model folders is run)."
        )
    return component_class


def _variants_to_load(folder: str, variant: str | None, model_index: dict) -> dict[str, str]:
    """The components that have files of `variant` (diffusers' rule); its error when none has."""
    if variant is None:
        return {}
    from diffusers.pipelines.pipeline_loading_utils import _identify_model_variants

    model_variants = _identify_model_variants(folder=folder, variant=variant, config=model_index)
    if not model_variants:
        raise ValueError(
            f"You are trying to load the model files of the `variant={variant}`, but no such modeling files are "
            "available."
        )
    return model_variants


def _component_device_maps(options, dtype, pipeline_class, layout, classes, folder) -> dict:
    """Per component (our name), the device_map its from_pretrained gets; "_final" is the pipeline's
    `hf_device_map`. "balanced" spreads the components over the accelerators as diffusers does."""
    device_map = options["device_map"]
    if device_map is None:
        return {}
    if device_map != "balanced":
        return {**{ours: device_map for ours in layout.values()}, "_final": device_map}
    from diffusers.pipelines.pipeline_loading_utils import _get_final_device_map

    for saved in classes:  # diffusers' helper would import such a file as the component's "library"
        if os.path.exists(os.path.join(folder, saved, "diffusers.py")):
            raise ValueError(f"{folder}/{saved}/diffusers.py would shadow the diffusers library; not loading it.")
    init_dict = {saved: ("diffusers", component_class.__name__) for saved, component_class in classes.items()}
    final = _get_final_device_map(
        device_map=device_map, pipeline_class=pipeline_class, passed_class_obj={}, init_dict=init_dict,
        library=diffusers, max_memory=options["max_memory"], dtype=dtype, cached_folder=folder,
        force_download=options["force_download"], proxies=options["proxies"],
        local_files_only=options["local_files_only"], token=options["token"], revision=options["revision"],
    )
    maps = {"_final": final}
    for saved, ours in layout.items():
        if isinstance(final, dict) and final.get(saved) is not None:
            maps[ours] = {"": final[saved]}
    return maps


def _model_load_options(options: dict, dtype, device_map, variant: str | None, name: str) -> dict:
    """What diffusers' loader hands a diffusers model's from_pretrained; options left at their default
    are left out, so that older diffusers versions are not given options they do not know."""
    load = {"torch_dtype": dtype}
    for option in ("max_memory", "offload_folder", "offload_state_dict", "use_safetensors", "low_cpu_mem_usage"):
        if options[option] is not None:
            load[option] = options[option]
    for option in ("disable_mmap", "use_flashpack"):
        if options[option]:
            load[option] = True
    if device_map is not None:
        load["device_map"] = device_map
    if variant is not None:
        load["variant"] = variant
    quantization_config = options["quantization_config"]
    if quantization_config is not None:
        component_config = quantization_config._resolve_quant_config(is_diffusers=True, module_name=name)
        if component_config is not None:
            load["quantization_config"] = component_config
    return load


def _load_model(component_class: type, path: str, load: dict):
    model = component_class.from_pretrained(path, **load)
    device_map = load.get("device_map")
    if isinstance(device_map, dict) and not load.get("use_flashpack"):
        # As diffusers' load_sub_model: dispatch with hooks, so inputs follow the component to its device.
        from accelerate import dispatch_model
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(model, recurse=True)
        skip_keys = getattr(model, "_skip_keys", None)
        if device_map[""] == "cpu":
            dispatch_model(model, state_dict=model.state_dict(), device_map=device_map, force_hooks=True,
                           main_device=0, skip_keys=skip_keys)
        else:
            dispatch_model(model, device_map=device_map, force_hooks=True, skip_keys=skip_keys)
    return model
