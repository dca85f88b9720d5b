"""Saving a model folder so that a reader never finds it half-written.

`save_folder_atomically(write, destination, what)` lets `write(folder)` fill a hidden folder inside
`destination` (same disk, so moving is a rename) and then moves its entries into place, replacing
what is there, the index files (model_index.json, config.json) last; a replaced sub-folder is renamed
aside first and deleted only once the new one is in place. A failing `write` leaves `destination` as
it was. Used for the --save_model_epochs saves, which replace the model of an earlier epoch.

(Another branch adds the same function, with the same signature, plus full-disk diagnostics; that
version replaces this one.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

TEMP_SAVE_NAME = ".tmp-save"  # hidden: never uploaded to the Hub, never taken for a model
OLD_PREFIX = ".old-"


def _order_of_moves(entry: Path) -> tuple[bool, str]:
    # The index files last: once model_index.json / config.json is new, every part it names is new too.
    return entry.name in ("model_index.json", "config.json"), entry.name


def move_into_place(source: Path, destination: Path) -> list[Path]:
    """Move every entry of `source` into `destination`, replacing what is there; remove `source`."""
    moved = []
    for entry in sorted(source.iterdir(), key=_order_of_moves):
        target = destination / entry.name
        if target.is_dir() and not target.is_symlink():
            old = destination / f"{OLD_PREFIX}{entry.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(entry, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if entry.is_dir() and target.exists():
                target.unlink()
            os.replace(entry, target)
        moved.append(target)
    source.rmdir()
    return moved


def save_folder_atomically(write: Callable[[Path], None], destination: str | os.PathLike, what: str, *,
                           needed: int | None = None, basis: str = "", remedy: str = "") -> list[Path]:
    """`write(folder)` into a hidden folder inside `destination`, then move its entries into place (see the
    module docstring). Call it on one process. Returns the paths put in place. (`what`, `needed`, `basis`
    and `remedy` describe the save for error messages.)"""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    temporary = destination / TEMP_SAVE_NAME
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        write(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return move_into_place(temporary, destination)
