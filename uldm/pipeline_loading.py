"""Loading a saved pipeline without running code from it: the project's own loader.

Every saved pipeline folder carries a copy of `pipeline_latent_uncond.py` and names it in
`model_index.json`, so that receivers load it with `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`. diffusers' loader imports that copy. The toolkit's scripts load with
`load_pipeline(folder_or_hub_id)` instead: it takes `DiffusionPipeline.from_pretrained`'s options and errs
and logs like it, but reads `model_index.json` itself, accepts only an unconditional latent pipeline (ours,
or CompVis' `LDMPipeline` layout with a `vqvae`, e.g. CompVis/ldm-celebahq-256) whose components are
classes of the `diffusers` library, and loads each with that class's `from_pretrained`. The folder's code is
never imported, and a hub download skips `.py` files altogether.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging as diffusers_logging

from pipeline_latent_uncond import PIPELINE_CLASS_NAME, SUPPORTED_VAE_CLASSES, UnconditionalLatentPipeline

# Which diffusers classes each component of a loadable pipeline folder may have.
_COMPONENT_BASES = {"unet": (UNet2DModel,), "vae": SUPPORTED_VAE_CLASSES, "scheduler": (SchedulerMixin,),
                    "guide": (UNet2DModel,)}
# model_index.json names this loader accepts, and how their components map onto ours.
_OWN_LAYOUT = {"unet": "unet", "vae": "vae", "scheduler": "scheduler"}
_COMPVIS_LDM_LAYOUT = {"unet": "unet", "vqvae": "vae", "scheduler": "scheduler"}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_PASSABLE_COMPONENTS = ("unet", "vae", "scheduler", "vqvae", "guide")
_OPTIONAL_COMPONENTS = {"guide": "guide"}  # saved only when the pipeline carries one (a guiding UNet)
_CONFIG_OVERRIDES = ("latent_scaling_factor", "latent_shift_factor")
_GUIDANCE_CONFIG = ("guidance_scale", "guidance_interval_low", "guidance_interval_high")  # with a saved guide

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


def load_pipeline(pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> UnconditionalLatentPipeline:
    """Load a saved pipeline (local folder or hub id) like `DiffusionPipeline.from_pretrained`, but without
    running any code from it.

    Takes the options of `DiffusionPipeline.from_pretrained` with their meaning there: `dtype` (or
    `torch_dtype`; a torch.dtype or a dict per component with a "default" key), `device_map` ("balanced",
    "cpu" or the accelerator), `max_memory`, `offload_folder`, `offload_state_dict`, `low_cpu_mem_usage`,
    `variant`, `use_safetensors`, `disable_mmap`, `use_flashpack`, `quantization_config`, `cache_dir`,
    `revision`, `token`, `local_files_only`, `force_download`, `proxies`, components passed in (`unet=`,
    `vae=`, `scheduler=`; `vqvae=` for the CompVis layout), and the pipeline's own `latent_scaling_factor` /
    `latent_shift_factor` (override the saved values). Also `subfolder` (a pipeline inside a bigger
    repository). Errors and log messages are diffusers' (e.g. its error for a missing variant; "Loaded unet
    as UNet2DModel from `unet` subfolder of ..." at INFO). Other keyword arguments are ignored with
    diffusers' warning.

    The CompVis `LDMPipeline` layout gets latent scale 1.0. `custom_pipeline` is refused, and
    `trust_remote_code` has nothing to allow. Weights: safetensors when present; a legacy `.bin` is read by
    diffusers with `torch.load(weights_only=True)`; `use_safetensors=True` refuses `.bin`.
    """
    options = {name: kwargs.pop(name, default) for name, default in _DIFFUSERS_LOAD_OPTIONS.items()}
    subfolder = kwargs.pop("subfolder", None)
    _check_load_options(options, kwargs)
    dtype = _resolve_dtype_option(options["dtype"], options["torch_dtype"])
    source = str(pretrained_model_name_or_path)
    passed = {name: kwargs.pop(name) for name in _PASSABLE_COMPONENTS if name in kwargs}
    overrides = {name: kwargs.pop(name) for name in _CONFIG_OVERRIDES if name in kwargs}
    if kwargs:
        _loader_logger.warning(
            f"Keyword arguments {kwargs} are not expected by {PIPELINE_CLASS_NAME} and will be ignored."
        )

    folder = _pipeline_folder(source, subfolder, options, passed)
    model_index = _read_model_index(folder, source)
    layout, is_compvis_ldm = _component_layout(model_index, source)
    if "vqvae" in passed:
        if not is_compvis_ldm or "vae" in passed:
            raise ValueError("vqvae= is the CompVis LDM layout's name for the VAE; pass the VAE once, as vae=.")
        passed["vae"] = passed.pop("vqvae")
    loaded, final_device_map = _load_components(folder, source, model_index, layout, passed, options, dtype)

    config_values = {
        "latent_scaling_factor": 1.0 if is_compvis_ldm else model_index.get("latent_scaling_factor"),
        "latent_shift_factor": 0.0 if is_compvis_ldm else model_index.get("latent_shift_factor"),
    }
    config_values.update({name: model_index[name] for name in _GUIDANCE_CONFIG if name in model_index})
    config_values.update({name: value for name, value in overrides.items() if value is not None})
    pipeline = UnconditionalLatentPipeline(**passed, **loaded, **config_values)
    pipeline.register_to_config(_name_or_path=source)
    if options["device_map"] is not None:
        pipeline.hf_device_map = final_device_map
    if options["quantization_config"] is not None:
        pipeline.quantization_config = options["quantization_config"]
    return pipeline


def _pipeline_folder(source: str, subfolder: str | None, options: dict, passed: dict) -> str:
    """The local folder that holds the pipeline: `source` itself, or its hub snapshot."""
    if _is_local_source(source):
        return os.path.join(source, subfolder or "")
    with _explain_hub_errors(source):
        return _download_pipeline_snapshot(source, subfolder, options, passed)


def _load_components(folder, source, model_index, layout, passed, options, dtype) -> tuple[dict, object]:
    """The components not passed in, each loaded with its diffusers class; and the pipeline's hf_device_map."""
    model_variants = _variants_to_load(folder, options["variant"], model_index)
    to_load = {saved: ours for saved, ours in layout.items() if ours not in passed}
    classes = {saved: _diffusers_class_for(ours, saved, model_index[saved], source)
               for saved, ours in to_load.items()}
    device_maps = _component_device_maps(options, dtype, layout, classes, folder)
    progress = {"desc": "Loading pipeline components..."}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        progress["disable"] = True
    components = {}
    for saved_name, our_name in diffusers_logging.tqdm(list(to_load.items()), **progress):
        component_class = classes[saved_name]
        path = os.path.join(folder, saved_name)
        if issubclass(component_class, SchedulerMixin):
            components[our_name] = component_class.from_pretrained(path)
        else:
            load = _model_load_options(options, _component_dtype(dtype, our_name, saved_name),
                                       device_maps.get(our_name), model_variants.get(saved_name), our_name)
            components[our_name] = _load_model(component_class, path, load)
        _loader_logger.info(
            f"Loaded {our_name} as {component_class.__name__} from `{saved_name}` subfolder of {source}."
        )
    return components, device_maps.get("_final")


def _component_dtype(dtype, our_name: str, saved_name: str):
    """A dict of dtypes gives each component its own (by either name), else its "default", else float32."""
    if not isinstance(dtype, dict):
        return dtype
    return dtype.get(our_name, dtype.get(saved_name, dtype.get("default", torch.float32)))


def _check_load_options(options: dict, kwargs: dict) -> None:
    """diffusers' checks of its loading options, with its messages."""
    if "dduf_file" in kwargs:
        raise ValueError(
            "Loading pipelines from DDUF files is no longer supported. Please save and load your pipelines using the "
            "standard Diffusers directory format instead."
        )
    if options["custom_pipeline"] is not None:
        raise ValueError(
            f"custom_pipeline={options['custom_pipeline']!r} names code to run; uldm.pipeline_loading.load_pipeline "
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
        optional = {name: ours for name, ours in _OPTIONAL_COMPONENTS.items() if name in saved}
        layout, is_compvis_ldm = {**_OWN_LAYOUT, **optional}, False
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


def _component_device_maps(options, dtype, layout, classes, folder) -> dict:
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
        device_map=device_map, pipeline_class=UnconditionalLatentPipeline, passed_class_obj={}, init_dict=init_dict,
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
