"""Crash-safe training checkpoints: `output_dir/checkpoint-<step>/`.

A checkpoint is written by every process into a hidden temporary folder and renamed into place
by the main process only once all of them have finished, so a `checkpoint-<step>` folder is
always complete. Its `training_state.json` is written last, so a folder without it (copied
by hand, cut short by a full disk) is recognised as incomplete and skipped with a warning.
Old checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from .errors import InputError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
TEMP_PREFIX = ".tmp-checkpoint-"


@dataclass
class TrainingState:
    """Where training stands; enough to continue on the exact next batch."""

    global_step: int = 0  # optimiser steps done
    micro_batches: int = 0  # batches consumed by each process (global_step * accumulation)
    samples_seen: int = 0  # images consumed by all processes together
    train_batch_size: int = 0
    gradient_accumulation_steps: int = 1
    num_processes: int = 1

    def save(self, folder: str | os.PathLike) -> None:
        path = Path(folder) / STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TrainingState":
        data = json.loads((Path(folder) / STATE_FILE).read_text())
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        return cls(**known)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def list_checkpoints(output_dir: str | os.PathLike, warn_incomplete: bool = True) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    complete = []
    for path in output_dir.iterdir():
        step = checkpoint_step(path)
        if step is None or not path.is_dir():
            continue
        if is_complete(path):
            complete.append((step, path))
        elif warn_incomplete:
            logger.warning(
                "Ignoring %s: it has no %s, so it was not written completely.", path, STATE_FILE
            )
    return [path for _, path in sorted(complete)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`latest` -> newest complete checkpoint (or None: start fresh); a path -> that checkpoint."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / resume_from_checkpoint).is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise InputError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder. "
            f"Use 'latest' or one of: {[p.name for p in list_checkpoints(output_dir)] or 'none yet'}."
        )
    if not is_complete(path):
        raise InputError(
            f"{path} is incomplete (no {STATE_FILE}); it was cut short while saving. "
            f"Resume from an earlier checkpoint or use --resume_from_checkpoint latest."
        )
    return path


def temporary_checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{TEMP_PREFIX}{step}"


def publish_checkpoint(temp_dir: Path, output_dir: str | os.PathLike, step: int) -> Path:
    """Rename a fully written temporary folder to `checkpoint-<step>` (main process only)."""
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        # Re-saving the same step (e.g. after resuming at it): replace only once the new one is whole.
        backup = final.with_name(final.name + ".old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(final, backup)
        os.replace(temp_dir, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(temp_dir, final)
    return final


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None,
                      protected: Iterable[int] | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `total_limit` and leftovers of cut-short saves.

    Checkpoints of the `protected` steps (default: those `protected_steps` reads from the output folder,
    e.g. the best one of --keep_best_checkpoint) are kept and not counted: `total_limit` recent ones stay
    besides them."""
    removed = []
    output_dir = Path(output_dir)
    for leftover in output_dir.glob(f"{TEMP_PREFIX}*"):
        logger.warning("Removing %s, left over from a save that was cut short.", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if total_limit is None or total_limit <= 0:
        return removed
    protected = set(protected_steps(output_dir) if protected is None else protected)
    checkpoints = [path for path in list_checkpoints(output_dir, warn_incomplete=False)
                   if checkpoint_step(path) not in protected]
    for path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("Removed old checkpoints: %s", ", ".join(p.name for p in removed))
    return removed


# --------------------------------------------------------------------------------------------
# Checkpoints kept whatever the limit (--keep_best_checkpoint)

PROTECTED_FILE = "best_checkpoint.json"


def protect_checkpoint(output_dir: str | os.PathLike, step: int, **why) -> Path:
    """Record checkpoint-<step> as the one pruning keeps (replacing the previous record), with why (e.g.
    fid=12.3); main process only. Deleting the file lets pruning remove it again."""
    path = Path(output_dir) / PROTECTED_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"checkpoint": f"checkpoint-{step}", "step": step, **why}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def unprotect_checkpoints(output_dir: str | os.PathLike) -> None:
    (Path(output_dir) / PROTECTED_FILE).unlink(missing_ok=True)


def protected_steps(output_dir: str | os.PathLike) -> set[int]:
    """The steps whose checkpoints pruning keeps (from best_checkpoint.json; none if it is absent or unreadable)."""
    path = Path(output_dir) / PROTECTED_FILE
    if not path.is_file():
        return set()
    try:
        return {int(json.loads(path.read_text())["step"])}
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("Ignoring %s (%s): no checkpoint is protected from pruning.", path, error)
        return set()
