"""Model presets: JSON files under configs/<kind>/ (UNet and VAE configurations), a JSON file, or a model folder."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"

def list_presets(kind: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / kind).glob("*.json"))


def read_json_preset(name_or_path: str, kind: str) -> dict | None:
    """A preset name from configs/<kind>/ or a path to a JSON file; None if it is neither.

    Keys starting with "_" (comments) are dropped."""
    candidates = [Path(name_or_path), CONFIG_DIR / kind / f"{name_or_path}.json", CONFIG_DIR / kind / name_or_path]
    for path in candidates:
        if path.is_file() and path.suffix == ".json":
            config = json.loads(path.read_text())
            return {key: value for key, value in config.items() if not key.startswith("_")}
    return None


def read_model_config(name_or_path: str, kind: str, model_class, location: str | None = None,
                      subfolder: str | None = None, revision: str | None = None) -> dict:
    """The config for a fresh model: a preset of configs/<kind>/, a JSON file, or the config of a model folder
    or hub id (`location`/`subfolder`, default `name_or_path` itself) read with `model_class.load_config`."""
    config = read_json_preset(name_or_path, kind)
    if config is not None:
        return config
    try:
        return model_class.load_config(location or name_or_path, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--model_config_name_or_path {name_or_path!r} is neither a preset ("
            + ", ".join(list_presets(kind)) + f"), a JSON file, nor a model folder: {error}"
        ) from error
