"""Unconditional latent diffusion pipeline: a UNet2DModel denoises latents, a VAE decodes them.

This file is self-contained (it imports only torch, diffusers and the standard library): a copy of
it travels inside every pipeline folder that `UnconditionalLatentPipeline.save_pretrained` writes,
so that anyone can load the folder with

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

The project's own scripts load with `UnconditionalLatentPipeline.from_pretrained(folder_or_hub_id)`
instead, which reads `model_index.json` itself and never runs code found in a model folder. That
path also loads the CompVis LDM layout (`LDMPipeline` with a `vqvae`, e.g. CompVis/ldm-celebahq-256).

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
_LOAD_OPTIONS = ("subfolder", "revision", "torch_dtype", "local_files_only", "cache_dir", "token",
                 "use_safetensors", "variant", "latent_scaling_factor", "latent_shift_factor",
                 "unet", "vae", "scheduler")


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


class UnconditionalLatentPipeline(DiffusionPipeline):
    r"""Unconditional image generation with a latent diffusion model.

    Args:
        unet: `UNet2DModel` that predicts what the scheduler expects (noise, v or sample) on latents.
        vae: `AutoencoderKL`, `VQModel` or `AutoencoderTiny` that decodes latents to images in [-1, 1].
        scheduler: any diffusers scheduler (DDPM, DDIM, DPMSolverMultistep, UniPC, Euler, ...).
        latent_scaling_factor: scale of the latents the UNet sees; None resolves it from the VAE.
        latent_shift_factor: shift subtracted before scaling; None resolves it from the VAE.

    The resolved values are stored in the pipeline config, so `model_index.json` records the exact
    numbers used, and they come back to `__init__` on loading.
    """

    model_cpu_offload_seq = "unet->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet: UNet2DModel,
        vae: AutoencoderKL | VQModel | AutoencoderTiny,
        scheduler: SchedulerMixin,
        latent_scaling_factor: float | None = None,
        latent_shift_factor: float | None = None,
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
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.register_to_config(
            latent_scaling_factor=resolve_latent_scale(vae, latent_scaling_factor),
            latent_shift_factor=resolve_latent_shift(vae, latent_shift_factor),
        )

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
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in accepted:
            extra["eta"] = eta
        if "generator" in accepted:
            extra["generator"] = generator
        return extra

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
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            batch_size, num_inference_steps, generator, latents, output_type, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device
        # Timesteps first: for Euler-type schedulers init_noise_sigma depends on them (with "leading" spacing
        # the 1000-step table's sigma_max is far above the first step's sigma).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(batch_size, generator, latents, device, self.unet.dtype)
        self._num_timesteps = len(timesteps)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step_index, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                # Euler-type schedulers cast their result to the model output's dtype: under autocast that
                # would round the latents to half precision at every step.
                model_output = self.unet(model_input, t).sample.to(latents.dtype)
                latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    tensors = {name: latents for name in callback_on_step_end_tensor_inputs}
                    returned = callback_on_step_end(self, step_index, t, tensors) or {}
                    latents = returned.pop("latents", latents)
                progress_bar.update()

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

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """Save like diffusers, then make the folder load with `trust_remote_code=True` anywhere.

        model_index.json names `["pipeline_latent_uncond", "UnconditionalLatentPipeline"]` and a copy
        of this file is written next to it. With push_to_hub=True the same folder layout is uploaded.
        """
        super().save_pretrained(
            save_directory, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
        )
        index_path = Path(save_directory) / "model_index.json"
        model_index = json.loads(index_path.read_text())
        model_index["_class_name"] = [PIPELINE_MODULE_NAME, PIPELINE_CLASS_NAME]
        index_path.write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(Path(__file__), Path(save_directory) / f"{PIPELINE_MODULE_NAME}.py")
        if push_to_hub:
            # PushToHubMixin.push_to_hub saves through this method again, into a temporary folder.
            repo_id = kwargs.pop("repo_id", Path(save_directory).name)
            hub_kwargs = {k: kwargs[k] for k in ("commit_message", "private", "token", "create_pr") if k in kwargs}
            self.push_to_hub(repo_id, safe_serialization=safe_serialization, variant=variant, **hub_kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> "UnconditionalLatentPipeline":
        """Load a saved pipeline (local folder or hub id) without running any code from it.

        Reads `model_index.json`, checks that it describes an unconditional latent pipeline (ours, or
        CompVis' `LDMPipeline` layout with `vqvae`, which gets latent scale 1.0), and loads each
        component with its own diffusers class. Only classes from the `diffusers` library are accepted.
        Weights: safetensors when present; a legacy `.bin` is read by diffusers with
        `torch.load(weights_only=True)`; pass `use_safetensors=True` to refuse `.bin` files.

        Keyword options: subfolder, revision, torch_dtype, local_files_only, cache_dir, token,
        use_safetensors, variant, latent_scaling_factor, latent_shift_factor (override the saved
        values), and unet= / vae= / scheduler= to use a ready component instead of loading it.
        """
        unknown = sorted(set(kwargs) - set(_LOAD_OPTIONS))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got unexpected options {unknown}; it accepts {list(_LOAD_OPTIONS)}. "
                "(For diffusers' generic loader use DiffusionPipeline.from_pretrained(..., trust_remote_code=True).)"
            )
        source = str(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder")
        is_local = _is_local_source(source)
        hub_options = {k: kwargs[k] for k in ("revision", "local_files_only", "cache_dir", "token") if k in kwargs}

        model_index = _read_model_index(source, subfolder, is_local, hub_options)
        layout, is_compvis_ldm = _component_layout(model_index, source)

        components = {}
        for saved_name, our_name in layout.items():
            if kwargs.get(our_name) is not None:
                components[our_name] = kwargs[our_name]
                continue
            component_class = _diffusers_class_for(our_name, saved_name, model_index[saved_name], source)
            load_kwargs = dict(hub_options, subfolder=f"{subfolder}/{saved_name}" if subfolder else saved_name)
            if not issubclass(component_class, SchedulerMixin):
                load_kwargs.update({k: kwargs[k] for k in ("torch_dtype", "use_safetensors", "variant") if k in kwargs})
            with _explain_hub_errors(source, is_local):
                components[our_name] = component_class.from_pretrained(source, **load_kwargs)

        config_values = {
            "latent_scaling_factor": 1.0 if is_compvis_ldm else model_index.get("latent_scaling_factor"),
            "latent_shift_factor": 0.0 if is_compvis_ldm else model_index.get("latent_shift_factor"),
        }
        config_values.update({k: kwargs[k] for k in config_values if kwargs.get(k) is not None})
        pipeline = cls(**components, **config_values)
        pipeline.register_to_config(_name_or_path=source)
        return pipeline


# ------------------------------------------------------------------------------ loading helpers


def _is_local_source(source: str) -> bool:
    """A folder on disk, or else a hub id ('name' or 'owner/name'); anything else is a missing folder."""
    if os.path.isdir(source):
        return True
    if os.path.exists(source) or not _HUB_ID.fullmatch(source):
        raise FileNotFoundError(
            f"{source} is not a folder. Give a folder written by save_pretrained (it holds model_index.json) "
            "or a Hugging Face hub id such as 'CompVis/ldm-celebahq-256'."
        )
    return False


@contextlib.contextmanager
def _explain_hub_errors(source: str, is_local: bool):
    """Turn a hub download failure into one message that says what to do, keeping the original as cause."""
    try:
        yield
    except OSError as error:
        if is_local:
            raise
        raise OSError(
            f"'{source}' is not a local folder, and loading it as a Hugging Face hub id failed ({error}). "
            "The hub may be unreachable (this machine may be offline), the id may be wrong, or the repository may "
            "be private (pass token=...). To work offline, download the snapshot where there is network (e.g. "
            f"`hf download {source} --local-dir DIR`) and pass that folder instead of the id, or set "
            "HF_HUB_OFFLINE=1 to use a snapshot already in the Hugging Face cache."
        ) from error


def _read_model_index(source: str, subfolder: str | None, is_local: bool, hub_options: dict) -> dict:
    if is_local:
        index_path = Path(source, subfolder or "", "model_index.json")
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{index_path} does not exist: {source} is not a saved pipeline folder. Give the folder that "
                "save_pretrained wrote (it holds model_index.json and unet/, vae/, scheduler/)."
            )
        return json.loads(index_path.read_text())
    with _explain_hub_errors(source, is_local):
        # DiffusionPipeline.load_config fetches model_index.json only (config_name) and imports nothing.
        return dict(DiffusionPipeline.load_config(source, subfolder=subfolder, **hub_options))


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
