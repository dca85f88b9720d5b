"""Building the denoising UNet from a preset, a config file or saved weights."""

from __future__ import annotations

from pathlib import Path

from .presets import list_presets, read_model_config
from .errors import InputError


def _unet_location(name_or_path: str) -> tuple[str, str | None]:
    """A saved pipeline keeps its UNet in unet/; a UNet folder has config.json at the top."""
    root = Path(name_or_path)
    if root.is_dir() and not (root / "config.json").is_file() and (root / "unet" / "config.json").is_file():
        return name_or_path, "unet"
    return name_or_path, None


def build_unet(model_config_name_or_path: str | None = None, pretrained_model_name_or_path: str | None = None,
               revision: str | None = None, variant: str | None = None):
    """UNet2DModel with fresh weights from a preset/config, or with the weights of a saved model."""
    from diffusers import UNet2DModel

    if pretrained_model_name_or_path:
        location, subfolder = _unet_location(pretrained_model_name_or_path)
        try:
            return UNet2DModel.from_pretrained(location, subfolder=subfolder, revision=revision, variant=variant)
        except (OSError, ValueError) as error:
            raise InputError(
                f"Could not load a UNet2DModel from '{pretrained_model_name_or_path}': {error}\n"
                "Give a folder saved by this toolkit (a pipeline or its unet/), or a hub id; if this machine "
                "is offline, download it first and pass the local folder."
            ) from error
    if not model_config_name_or_path:
        raise InputError("Give --model_config_name_or_path (a preset: " + ", ".join(list_presets("unet")) +
                         "; or a JSON file) or --pretrained_model_name_or_path.")
    location, subfolder = _unet_location(model_config_name_or_path)
    config = read_model_config(model_config_name_or_path, "unet", UNet2DModel, location, subfolder, revision)
    return UNet2DModel.from_config(config)


def saved_prediction_type(pretrained_model_name_or_path: str | None, revision: str | None = None) -> str | None:
    """The prediction type in a saved pipeline's scheduler config; None without one (a bare UNet, a preset)."""
    from diffusers import DDPMScheduler

    if not pretrained_model_name_or_path:
        return None
    try:
        config = DDPMScheduler.load_config(pretrained_model_name_or_path, subfolder="scheduler", revision=revision)
    except (OSError, ValueError):  # no scheduler there, or a hub id out of reach (build_unet then says so)
        return None
    return config.get("prediction_type", "epsilon")


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def use_xformers_if_installed(*models) -> bool:
    """--enable_xformers_memory_efficient_attention: xformers' attention in these models where xformers is
    installed (True); otherwise a warning that PyTorch's scaled_dot_product_attention, which diffusers'
    attention uses by default, is already memory-efficient (False). diffusers' examples stop instead."""
    import logging

    from diffusers.utils import is_xformers_available

    if not is_xformers_available():
        logging.getLogger(__name__).warning(
            "--enable_xformers_memory_efficient_attention: xformers is not installed, so attention runs on "
            "PyTorch's scaled_dot_product_attention, which diffusers uses already (its flash and memory-efficient "
            "kernels save the same memory). Going on without xformers.")
        return False
    for model in models:
        model.enable_xformers_memory_efficient_attention()
    return True
