"""Saving that survives a full disk: nothing half-written stays behind, and every process stops together.

A save that fails (ENOSPC, EDQUOT, any OSError, or the RuntimeError/SafetensorError that torch and
safetensors raise instead of one) removes what it had written at once, leaves what was saved
before untouched, and stops the run with one `SaveError`: what was being written, where, how much
it needs, how much is free, and what to do. The scripts print it and exit with status 2.

Under several processes a rank that fails must not leave the others waiting in a barrier:
`processes_stop_together` wraps the writing of every rank and ends with one gather of each rank's
outcome (which is also the barrier), so either all ranks go on or all raise the same message.

`save_pretrained_atomically` writes a model or pipeline into a hidden folder beside its files and
moves the files into place only once all are written, so a failed save never leaves a half-written
`unet/` over a good one.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import shutil
import traceback
from pathlib import Path
from typing import Callable, Iterator, Union

from .errors import SaveError
from .images import _temporary_path

logger = logging.getLogger(__name__)

TEMP_SAVE_NAME = ".tmp-save"  # inside the destination folder: same disk, so moving the files is a rename
OLD_PREFIX = ".old-"

Needed = Union[int, None, Callable[[], Union[int, None]]]
# What to do after a failed save; a callable is asked only when a save fails (it may look at the disk).
Remedy = Union[str, Callable[[], str]]


# --------------------------------------------------------------------------------------------
# Sizes and free space


def folder_size(path: str | os.PathLike) -> int:
    """Bytes in the files under `path` (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def free_space(path: str | os.PathLike) -> int:
    """Bytes free for this user on the disk that holds `path` (or would, once it is created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "an unknown amount"
    size = float(num_bytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def estimated_save_size(obj) -> int | None:
    """Bytes of the weights of a torch module or of a pipeline's modules: what save_pretrained writes, roughly."""
    import torch

    if isinstance(obj, torch.nn.Module):
        modules = [obj]
    else:
        modules = [c for c in getattr(obj, "components", {}).values() if isinstance(c, torch.nn.Module)]
    tensors = itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules)
    total = sum(t.numel() * t.element_size() for t in tensors)
    return total or None


def warn_if_low_on_space(where: str | os.PathLike, expected: int | None, what: str, basis: str = "",
                         hint: str = "Free some space there.") -> bool:
    """Warn (and return True) when the disk of `where` has less than twice `expected` bytes free."""
    if not expected:
        return False
    free = free_space(where)
    if free >= 2 * expected:
        return False
    logger.warning(
        "Only %s free on the disk of %s, less than twice the %s %s needs%s: saving may fail. %s",
        human_size(free), where, human_size(expected), what, f" ({basis})" if basis else "", hint,
    )
    return True


# --------------------------------------------------------------------------------------------
# Failures and their message


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_write_failure(error: BaseException) -> bool:
    """Whether `error` says that writing a file failed (rather than a bug): an OSError, or what torch's
    zip writer (RuntimeError "... unexpected pos ...") and safetensors raise when the disk is full."""
    for cause in _causes(error):
        if isinstance(cause, OSError):
            return True
        text = str(cause)
        if type(cause).__name__ == "SafetensorError" and ("serializ" in text or "I/O error" in text):
            return True
        if isinstance(cause, RuntimeError) and any(
                marker in text for marker in ("inline_container", "PytorchStreamWriter", "unexpected pos",
                                              "file write failed")):
            return True
    return False


def _os_error(error: BaseException) -> OSError | None:
    return next((cause for cause in _causes(error) if isinstance(cause, OSError)), None)


def describe_cause(error: BaseException, free: int, needed: int | None) -> str:
    os_error = _os_error(error)
    if os_error is not None and os_error.errno == errno.ENOSPC:
        return "the disk is full (No space left on device)"
    if os_error is not None and os_error.errno == getattr(errno, "EDQUOT", -1):
        return "the disk quota is exceeded (Disk quota exceeded)"
    if os_error is not None:
        name = f" ({os_error.filename})" if os_error.filename else ""
        return f"{os_error.strerror or os_error}{name}"
    text = " ".join(str(cause) for cause in _causes(error))
    if "No space left on device" in text or "os error 28" in text:  # safetensors' words for ENOSPC
        return "the disk is full (No space left on device)"
    if "Disk quota exceeded" in text or "os error 122" in text:
        return "the disk quota is exceeded (Disk quota exceeded)"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if free < (needed or 0) or free < 64 * 1024**2:  # torch's writer says only that its position is off
        return f"the disk is full ({human_size(free)} were free when the write failed: {first_line})"
    return f"the write failed ({first_line})"


def save_failure_message(what: str, where: str | os.PathLike, error: BaseException | str, *, needed: int | None = None,
                         basis: str = "", written: int | None = None, kept: str = "", remedy: Remedy = "") -> str:
    """One message for a failed save: what, where, why, how much it needs, how much is free, what to do.

    `error` is the exception or its description by `describe_cause` (taken when it happened: the
    free space then tells a full disk). The free space given is measured now, after the clean-up."""
    free = free_space(where)
    cause = error if isinstance(error, str) else describe_cause(error, free, needed)
    if needed:
        need = f"It needs about {human_size(needed)}" + (f" ({basis})" if basis else "")
    elif written:
        need = f"It needs more than the {human_size(written)} it had written"
    else:
        need = "It needs more space than that"
    parts = [
        f"Could not write {what} to {where}: {cause}.",
        f"{need}; {human_size(free)} are free on that disk.",
        kept,
        (remedy() if callable(remedy) else remedy) or "Free some space there (or choose a bigger disk) and run again.",
    ]
    return " ".join(part for part in parts if part)


def final_save_remedy(output_dir: str | os.PathLike) -> str:
    """What to do when the trained model could not be written at the end of a run: resume from the newest
    checkpoint (at the end of a run with --checkpointing_steps, that of the last step: nothing is trained again)."""
    from .training.checkpoints import latest_checkpoint  # checkpoints save through this module

    latest = latest_checkpoint(output_dir)
    if latest is not None:
        return (f"Free some space there, then run the same command plus --resume_from_checkpoint latest: it loads "
                f"{latest.name} and writes the model again (training only the steps after it, if any).")
    return ("Free some space there and run again (without --checkpointing_steps there is no checkpoint "
            "to write the model from).")


# --------------------------------------------------------------------------------------------
# Every process stops together


def decided_by_main_process(accelerator, decide: Callable[[], object]):
    """`decide()` on the main process only; every process gets its result (so all take the same branch)."""
    if accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    result = [decide() if accelerator.is_main_process else None]
    return broadcast_object_list(result, from_process=0)[0]


def agree_on_failures(accelerator, failure) -> list[tuple[int, object]]:
    """(rank, report) of every process whose `failure` (a small picklable report, e.g. a message) is
    not None. A collective: every process must call it, so it is also a barrier (one small gather)."""
    if accelerator.num_processes == 1:
        reports = [failure]
    else:
        from accelerate.utils import gather_object

        reports = gather_object([failure])
    return [(rank, text) for rank, text in enumerate(reports) if text is not None]


def release_open_files(error: BaseException) -> None:
    """Drop the locals of the frames of a failed write: a writer object torch left open there would keep its
    deleted file's space in use (and the free space reported too low)."""
    import gc

    for cause in _causes(error):
        traceback.clear_frames(cause.__traceback__)
    gc.collect()


@contextlib.contextmanager
def processes_stop_together(accelerator, what: str, where: str | os.PathLike, *, needed: Needed = None,
                            basis: str = "", kept: str = "", remedy: Remedy = "",
                            on_failure: Callable[[], None] | None = None):
    """Run the block on every process (it may do nothing on some); if it fails on any, every process
    raises SaveError with the failing process' message, after `on_failure` (cleanup) ran.

    A write failure becomes that clear message; a SaveError raised inside is passed on as it is; any
    other exception (a bug) is re-raised as it is on its own process (with its traceback), and the
    other processes stop with a SaveError that points to it. `needed` may be a callable, evaluated
    only on failure."""
    own: Exception | None = None
    try:
        yield
    except Exception as error:  # noqa: BLE001 - reported to the other processes, then raised again
        own = error
    report = None  # (finished message, None) or (None, (cause, needed)): the message is made after the clean-up
    if isinstance(own, SaveError):
        report = (str(own), None)
    elif own is not None and is_write_failure(own):
        estimate = needed() if callable(needed) else needed
        report = (None, (describe_cause(own, free_space(where), estimate), estimate))
    elif own is not None:
        report = (f"Could not write {what} to {where}: {type(own).__name__}: {own}. This is not a disk problem; "
                  "see the traceback of that process.", None)
    failures = agree_on_failures(accelerator, report)
    if not failures:
        return
    if own is not None and is_write_failure(own):
        release_open_files(own)
    if on_failure is not None:
        on_failure()
    if own is not None and not isinstance(own, SaveError) and not is_write_failure(own):
        raise own
    rank, (text, write_failure) = failures[0]
    if text is None:
        cause, estimate = write_failure
        text = save_failure_message(what, where, cause, needed=estimate, basis=basis, kept=kept, remedy=remedy)
    if accelerator.num_processes > 1:
        text += f" [process {rank} of {accelerator.num_processes} failed; all processes stopped]"
    raise SaveError(text) from own


# --------------------------------------------------------------------------------------------
# Atomic folders


def write_json_atomically(path: str | os.PathLike, content, end: str = "") -> None:
    """json.dumps(content, indent=2) + end into `path` through a hidden temporary file: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    temporary = _temporary_path(path)
    temporary.write_text(json.dumps(content, indent=2) + end)
    os.replace(temporary, path)


def save_safetensors_atomically(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file through a hidden temporary file, flushed to disk and renamed: a reader never sees
    half a file, and a failed write (a full disk) leaves nothing behind."""
    from safetensors.torch import save_file

    path = Path(path)
    temporary = _temporary_path(path)
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _order_of_moves(entry: Path) -> tuple[int, str]:
    # The index files last: a folder whose model_index.json / config.json is new has all its new parts.
    return (entry.name in ("model_index.json", "config.json"), entry.name)


def move_into_place(source: Path, destination: Path) -> list[Path]:
    """Move every entry of `source` into `destination` (same disk: renames), replacing what is there;
    a replaced folder is renamed aside first and deleted only once the new one is in place."""
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
                           needed: int | None = None, basis: str = "", remedy: Remedy = "") -> list[Path]:
    """`write(folder)` into a hidden folder inside `destination`, then move its files into place.

    On any failure the hidden folder is removed at once and `destination` is left as it was; a write
    failure (full disk...) raises SaveError. Call it on one process (wrap it in
    `processes_stop_together` when the others wait for it). Returns the paths put in place."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    temporary = destination / TEMP_SAVE_NAME
    shutil.rmtree(temporary, ignore_errors=True)
    warn_if_low_on_space(destination, needed, what, basis)
    try:
        write(temporary)
    except Exception as error:
        if not is_write_failure(error):
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        cause = describe_cause(error, free_space(destination), needed)
        written = folder_size(temporary)
        release_open_files(error)
        shutil.rmtree(temporary, ignore_errors=True)
        raise SaveError(save_failure_message(
            what, destination, cause, needed=needed, basis=basis, written=written,
            kept=f"The unfinished files were removed; what {destination} held before is unchanged.",
            remedy=remedy,
        )) from error
    return move_into_place(temporary, destination)


def save_pretrained_atomically(obj, destination: str | os.PathLike, what: str | None = None, *, remedy: Remedy = "",
                               **save_kwargs) -> list[Path]:
    """`obj.save_pretrained(destination, **save_kwargs)` (a pipeline, model or adapter), atomically:
    see `save_folder_atomically`. The weights' size is the estimate of the space needed."""
    what = what or f"the {type(obj).__name__}"
    return save_folder_atomically(lambda folder: obj.save_pretrained(folder, **save_kwargs), destination, what,
                                  needed=estimated_save_size(obj), basis="the size of its weights", remedy=remedy)
