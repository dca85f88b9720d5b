"""Crash-safe training checkpoints: `output_dir/checkpoint-<step>/`.

A checkpoint is written by every process into a hidden temporary folder and renamed into place
by the main process only once all of them have finished, so a `checkpoint-<step>` folder is
always complete. Its `training_state.json` is written last, so a folder without it (copied
by hand, cut short by a full disk) is recognised as incomplete and skipped with a warning.
Old checkpoints are pruned only after the new one is in place.

Faults (see also `uldm.saving`):
* A save that fails (full disk, quota, any write error) on any process removes the temporary folder
  at once and stops every process with one `SaveError`; the previous checkpoint stays as it was.
* `training_state.json` records each file's size and SHA-256 (computed once the files are written,
  about 1 s per GB on one CPU core). Resuming verifies them: `latest` skips a damaged checkpoint with
  a warning naming the file and takes the newest intact one; an explicit path that is damaged is an
  InputError naming the file. Checkpoints from before the checksums are checked as far as their
  formats allow (safetensors headers and sizes, the CRCs of torch's zip files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from .errors import InputError
from .saving import (
    decided_by_main_process, folder_size, human_size, processes_stop_together, warn_if_low_on_space,
    write_json_atomically,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
TEMP_PREFIX = ".tmp-checkpoint-"
FILES_KEY = "files"  # in training_state.json: {relative path: {"size": bytes, "sha256": hex}}
CHECKSUM = "sha256"  # hardware-accelerated on most CPUs; `sha256sum` checks a file by hand


@dataclass
class TrainingState:
    """Where training stands; enough to continue on the exact next batch."""

    global_step: int = 0  # optimiser steps done
    micro_batches: int = 0  # batches consumed by each process (global_step * accumulation)
    samples_seen: int = 0  # images consumed by all processes together
    train_batch_size: int = 0
    gradient_accumulation_steps: int = 1
    num_processes: int = 1

    def save(self, folder: str | os.PathLike, files: dict | None = None) -> None:
        """Write training_state.json, with the manifest `files` of the checkpoint's other files if given."""
        data = asdict(self) if files is None else {**asdict(self), FILES_KEY: files}
        write_json_atomically(Path(folder) / STATE_FILE, data)

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


# --------------------------------------------------------------------------------------------
# Starting over in the same folder (--overwrite_output_dir)

PREVIOUS_RUN_PREFIX = "previous_run_"
# What a run writes into its output folder that a new run would mix with (grids, metrics, TensorBoard
# events, post-hoc EMA snapshots) or prune (checkpoints). The saved model itself is replaced by the new run's first
# save; the latent cache and class images stay (they are keyed by their contents and reused).
RUN_RECORDS = ("samples", "metrics.jsonl", "loss_curve.png", "training_args.json")


def set_aside_earlier_run(output_dir: str | os.PathLike, logging_dir: str | os.PathLike | None = None) -> Path | None:
    """Move an earlier run's checkpoints and records into `output_dir/previous_run_<date-time>/` (nothing
    is deleted); returns that folder, or None when there was nothing to move. Main process only."""
    import time

    from .posthoc_ema import SNAPSHOT_DIR_NAME

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    records = (*RUN_RECORDS, SNAPSHOT_DIR_NAME)
    names = [p.name for p in output_dir.iterdir()
             if checkpoint_step(p) is not None or p.name.startswith(TEMP_PREFIX) or p.name in records]
    if logging_dir is not None:
        logs = Path(os.path.abspath(logging_dir))
        if logs.parent == Path(os.path.abspath(output_dir)) and logs.exists():
            names.append(logs.name)
    if not names:
        return None
    archive = output_dir / f"{PREVIOUS_RUN_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    while archive.exists():  # two starts within a second
        archive = archive.with_name(archive.name + "_")
    archive.mkdir()
    for name in sorted(set(names)):
        os.replace(output_dir / name, archive / name)
    logger.warning("--overwrite_output_dir: moved the earlier run's %s into %s (delete it yourself when it is no "
                   "longer needed).", ", ".join(sorted(set(names))), archive)
    return archive


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
        try:
            os.replace(temp_dir, final)
        except OSError:
            os.replace(backup, final)
            raise
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
# File manifest and verification


def file_checksum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.new(CHECKSUM)
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    return digest.hexdigest()


def file_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file in a checkpoint folder but training_state.json."""
    folder = Path(folder)
    manifest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative in (STATE_FILE, f"{STATE_FILE}.tmp"):
            continue
        manifest[relative] = {"size": path.stat().st_size, CHECKSUM: file_checksum(path)}
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, dict] | None:
    """The recorded manifest, or None for a checkpoint written before manifests existed."""
    return json.loads((Path(folder) / STATE_FILE).read_text()).get(FILES_KEY)


def _format_problem(path: Path) -> str | None:
    """What can be checked without a checksum: a safetensors header that covers the whole file; the
    CRCs of a torch zip archive (torch.save's format); other files only exist."""
    name = path.name
    try:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"{name} is damaged (its part {bad} fails its CRC)"
        elif path.suffix in (".bin", ".pkl", ".pt", ".pth") and path.stat().st_size == 0:
            return f"{name} is empty"
    except Exception as error:  # noqa: BLE001 - any failure to parse is the verdict
        return f"{name} cannot be read ({type(error).__name__}: {error})"
    return None


def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """What is wrong with a complete checkpoint folder, each naming the file; [] when it is intact.

    With a manifest: every recorded file exists, has its size and its checksum. Without one (older
    checkpoints): the model weights exist and every file parses as far as its format can be checked."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as error:
        return [f"{STATE_FILE} cannot be read ({error})"]
    if manifest is None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != STATE_FILE)
        problems = [problem for problem in map(_format_problem, files) if problem]
        if not any(p.name.startswith(("model", "pytorch_model")) for p in files):
            problems.append("the model weights (model.safetensors) are missing")
        return problems
    problems = []
    for relative, record in manifest.items():
        path = folder / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
            continue
        size = path.stat().st_size
        if size != record["size"]:
            change = "truncated" if size < record["size"] else "longer than when it was saved"
            problems.append(f"{relative} is {change} ({size} bytes; {record['size']} when saved)")
        elif record.get(CHECKSUM) and file_checksum(path) != record[CHECKSUM]:
            problems.append(f"{relative} does not match its {CHECKSUM} checksum (changed or damaged since it was saved)")
    return problems


def checkpoint_size(folder: str | os.PathLike | None) -> int | None:
    return folder_size(folder) if folder is not None and Path(folder).is_dir() else None


# --------------------------------------------------------------------------------------------
# Guarded save and verified restore (the two entry points of TrainingLoop)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: TrainingState,
                    total_limit: int | None = None, write_extra=None) -> Path:
    """Write `checkpoint-<state.global_step>` crash-safe and disk-full-safe; every process must call it.

    Every process writes its part with `accelerator.save_state` into the temporary folder; the main
    one then adds `write_extra(folder)`'s files and training_state.json with the manifest, publishes
    and prunes. A failure on any process (full disk...) removes the temporary folder at once and
    raises the same SaveError on every process; the previous checkpoint is untouched. Warns first when
    the disk has less than twice the previous checkpoint's size free."""
    output_dir = Path(output_dir)
    step = state.global_step
    temp_dir = temporary_checkpoint_dir(output_dir, step)
    what = f"checkpoint-{step}"
    complete = list_checkpoints(output_dir, warn_incomplete=False)
    previous = complete[-1] if complete else None
    needed = checkpoint_size(previous)
    basis = f"the size of {previous.name}" if previous is not None else ""
    if accelerator.is_main_process:
        if temp_dir.exists():
            shutil.rmtree(temp_dir)
        warn_if_low_on_space(output_dir, needed, what, basis,
                             hint="Free some space there (or lower --checkpoints_total_limit).")

    def remove_temp_dir():
        if accelerator.is_main_process:
            shutil.rmtree(temp_dir, ignore_errors=True)

    guard = dict(
        needed=lambda: needed or folder_size(temp_dir) or None,
        basis=basis or "at least what it had written",
        kept=(f"The unfinished {temp_dir.name} was removed; "
              + (f"{previous.name} is intact." if previous is not None else "no earlier checkpoint existed.")),
        remedy="Free some space there (or lower --checkpoints_total_limit, or move --output_dir to a bigger disk), "
               "then continue with the same command plus --resume_from_checkpoint latest.",
        on_failure=remove_temp_dir,
    )
    accelerator.wait_for_everyone()  # the old temporary folder is gone before anyone writes
    with processes_stop_together(accelerator, what, output_dir, **guard):
        accelerator.save_state(str(temp_dir))
    with processes_stop_together(accelerator, what, output_dir, **guard):
        if accelerator.is_main_process:
            if write_extra is not None:
                write_extra(temp_dir)
            state.save(temp_dir, files=file_manifest(temp_dir))  # written last: marks the checkpoint complete
            final = publish_checkpoint(temp_dir, output_dir, step)
            prune_checkpoints(output_dir, total_limit)
            logger.info("Saved %s (%s)", final, human_size(folder_size(final)))
    return output_dir / what


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def unloadable_file(folder: str | os.PathLike) -> str | None:
    """The first file of a checkpoint that does not load on its own, as "name does not load (error)";
    None if all load.

    Used only after accelerate.load_state failed, to tell a damaged file (which checksums cannot see in
    older checkpoints) from a checkpoint that does not fit this run's model or optimiser."""
    import torch

    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix != ".json"):
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                load_file(str(path))
            else:
                torch.load(path, map_location="cpu", weights_only=False)  # as accelerate loads them
        except Exception as error:  # noqa: BLE001 - the verdict
            return f"{path.name} does not load ({_first_line(error)})"
    return None


def _load_on_every_process(accelerator, path: Path) -> list[tuple[int, tuple[str, str]]]:
    """accelerate.load_state on every process; [(rank, (kind, text))] of those that failed, where kind
    is "damaged" (a file does not load) or "mismatch" (the files load, but not into this run)."""
    from .saving import agree_on_failures

    try:
        accelerator.load_state(str(path))
        failure = None
    except Exception as error:  # noqa: BLE001 - reported; the caller decides
        bad_file = unloadable_file(path)
        failure = ("damaged", bad_file) if bad_file else ("mismatch", _first_line(error))
    return agree_on_failures(accelerator, failure)


def restore_checkpoint(accelerator, resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Load the checkpoint to resume from into the accelerator's registered objects; returns its path.

    `latest`: the newest complete checkpoint that is intact (verified on the main process) and loads
    on every process; each one skipped is named with its damaged file in a warning. None when there is
    no checkpoint yet; an InputError when every checkpoint is damaged. An explicit path that is damaged
    is an InputError naming the file. A checkpoint whose files are sound but do not load into this
    run's model or optimiser (other settings) is an InputError too: the older ones would not fit either.
    Every process must call it."""
    if not resume_from_checkpoint:
        return None
    explicit = resume_from_checkpoint != "latest"
    if explicit:
        candidates = [resolve_resume_path(resume_from_checkpoint, output_dir)]
    else:
        candidates = list(reversed(list_checkpoints(output_dir, warn_incomplete=accelerator.is_main_process)))
    multi = accelerator.num_processes > 1
    skipped = []
    for path in candidates:
        problems = decided_by_main_process(accelerator, lambda: checkpoint_problems(path))
        if not problems:
            failures = _load_on_every_process(accelerator, path)
            if not failures:
                if skipped and accelerator.is_main_process:
                    logger.warning("Resuming from %s, the newest intact checkpoint.", path)
                return path
            texts = [f"process {rank}: {text}" if multi else text for rank, (_, text) in failures]
            if any(kind == "mismatch" for _, (kind, _) in failures):
                raise InputError(
                    f"{path} does not fit this run ({'; '.join(texts)}); its files are intact. Resume with the "
                    "model, optimiser and EMA settings it was written with, or choose another --output_dir."
                )
            problems = texts
        if explicit:
            others = [p.name for p in list_checkpoints(output_dir, warn_incomplete=False) if p != path]
            raise InputError(
                f"{path} is damaged: {'; '.join(problems)}. Resume from another checkpoint"
                + (f" ({', '.join(others[-3:])}), or use --resume_from_checkpoint latest, which takes the newest "
                   "intact one" if others else "; there is no other one in the output folder")
                + "."
            )
        skipped.append(f"{path.name}: {'; '.join(problems)}")
        if accelerator.is_main_process:
            logger.warning("Skipping %s, it is damaged: %s. Trying the checkpoint before it.", path, "; ".join(problems))
    if skipped:
        raise InputError(
            f"No intact checkpoint in {output_dir} to resume from: " + " | ".join(skipped) + ". "
            "Starting over there would replace them: move them aside (or choose another --output_dir) to start afresh."
        )
    return None


def final_save_remedy(output_dir: str | os.PathLike) -> str:
    """What to do when the trained model could not be written at the end of a run: resume from the newest
    checkpoint (at the end of a run with --checkpointing_steps, that of the last step: nothing is trained again)."""
    latest = latest_checkpoint(output_dir)
    if latest is not None:
        return (f"Free some space there, then run the same command plus --resume_from_checkpoint latest: it loads "
                f"{latest.name} and writes the model again (training only the steps after it, if any).")
    return ("Free some space there and run again (without --checkpointing_steps there is no checkpoint "
            "to write the model from).")


# --------------------------------------------------------------------------------------------
# Checkpoints kept whatever the limit (--keep_best_checkpoint)

PROTECTED_FILE = "best_checkpoint.json"


def protect_checkpoint(output_dir: str | os.PathLike, step: int, **why) -> Path:
    """Record checkpoint-<step> as the one pruning keeps (replacing the previous record), with why (e.g.
    fid=12.3); main process only. Deleting the file lets pruning remove it again."""
    path = Path(output_dir) / PROTECTED_FILE
    write_json_atomically(path, {"checkpoint": f"checkpoint-{step}", "step": step, **why}, end="\n")
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
