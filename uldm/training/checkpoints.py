"""Crash-safe training checkpoints: `output_dir/checkpoint-<step>/`.

A checkpoint is written by every process into a hidden temporary folder and renamed into place
by the main process only once all of them have finished, so a `checkpoint-<step>` folder is
always complete. Its `training_state.json` is written last, so a folder without it (copied
by hand, cut short by a full disk) is recognised as incomplete and skipped with a warning.
Old checkpoints are pruned only after the new one is in place.

Faults (see also `uldm.saving`):
* A save that fails (full disk, quota, any write error) on any process removes the temporary folder
  at once and stops every process with one `SaveError`; the previous checkpoint stays as it was.
* `training_state.json` records each file's size and SHA-256 (computed once the files are written;
  its cost is in docs/benchmarks.md), and a SHA-256 of its own content; its global_step must be the step
  of the folder's name. Resuming verifies them: `latest` skips a damaged checkpoint with
  a warning naming the file and takes the newest intact one; an explicit path that is damaged is an
  InputError naming the file. Checkpoints from before the checksums are checked as far as their
  formats allow (safetensors headers and sizes, the CRCs of torch's zip files, the step in the name).

What a checkpoint holds is named in one place, `CheckpointContents`; the keep-best policy
(`BestCheckpoint`, --keep_best_checkpoint) decides which one pruning spares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..errors import InputError
from ..saving import (
    decided_by_main_process, folder_size, human_size, processes_stop_together, warn_if_low_on_space,
    write_json_atomically,
)
from .records import METRICS_FILE, read_metrics

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
TEMP_PREFIX = ".tmp-checkpoint-"
FILES_KEY = "files"  # in training_state.json: {relative path: {"size": bytes, "sha256": hex}}
STATE_CHECKSUM_KEY = "state_sha256"  # in training_state.json: `state_checksum` of the rest of it
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
        """Write training_state.json, with the manifest `files` of the checkpoint's other files if given, and the
        checksum of all that (so that an edited digit reads as damage, not as another place to resume from)."""
        data = asdict(self) if files is None else {**asdict(self), FILES_KEY: files}
        write_json_atomically(Path(folder) / STATE_FILE, {**data, STATE_CHECKSUM_KEY: state_checksum(data)})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TrainingState":
        data = json.loads((Path(folder) / STATE_FILE).read_text())
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        return cls(**known)

    def go_on_from(self, saved: "TrainingState", name: str) -> None:
        """Continue from `saved` (the state of checkpoint `name`): at its exact next batch when the batch size,
        accumulation and number of processes are this run's, else from the same number of images seen."""
        self.global_step = saved.global_step
        self.samples_seen = saved.samples_seen
        if self._layout() == saved._layout():
            self.micro_batches = saved.micro_batches
            return
        self.micro_batches = math.ceil(saved.samples_seen / (self.train_batch_size * self.num_processes))
        logger.warning(
            "The batch size, accumulation or number of processes changed since %s; training goes on "
            "from the same number of images seen, but the batches will not be the ones an "
            "uninterrupted run would have seen.", name,
        )

    def _layout(self) -> tuple[int, int, int]:
        return self.train_batch_size, self.gradient_accumulation_steps, self.num_processes


def state_checksum(data: dict) -> str:
    """SHA-256 of training_state.json's content but the checksum itself, as canonical JSON (sorted keys, no
    spaces): independent of how the file is indented."""
    content = {key: value for key, value in data.items() if key != STATE_CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class CheckpointContents:
    """Everything a checkpoint holds, named in one place (the loop registers it with `register` and saves
    it with `save`).

    accelerate's save_state writes the prepared model(s) and optimiser(s) (their weights passing through
    `model_hooks`, if given: LoRA keeps only the adapter), the RNG states, and the `registered()` objects,
    numbered in that order (custom_checkpoint_<i>.pkl). The main process then copies in `extra_files`
    and writes `state` last (training_state.json, with the manifest and checksums).

    To add a field: a number saying where training stands becomes a field of `TrainingState` (older
    checkpoints load with its default). An object with state_dict()/load_state_dict() becomes a field here,
    appended to `registered()` after the others (so earlier checkpoints keep their file numbers; they lack
    the new file and do not resume into a run that has it), and is given by `build_training_loop`, where the
    other objects are built. A file becomes one more of `extra_files`.
    """

    state: TrainingState
    lr_scheduler: Any
    ema: Any = None  # diffusers' EMAModel, or None
    posthoc_ema: Any = None  # uldm.training.posthoc_ema.PowerFunctionEMA, or None
    model_hooks: tuple[Callable, Callable] | None = None  # (save_state pre-hook, load_state pre-hook)
    extra_files: tuple[Path, ...] = ()  # copied in as they are, when they exist (the run's arguments)

    def registered(self) -> list:
        return [obj for obj in (self.lr_scheduler, self.ema, self.posthoc_ema) if obj is not None]

    def register(self, accelerator) -> None:
        for obj in self.registered():
            accelerator.register_for_checkpointing(obj)
        if self.model_hooks is not None:
            save_hook, load_hook = self.model_hooks
            accelerator.register_save_state_pre_hook(save_hook)
            accelerator.register_load_state_pre_hook(load_hook)

    def copy_extra_files(self, folder: Path) -> None:
        for path in self.extra_files:
            if path.is_file():
                shutil.copyfile(path, folder / path.name)

    def save(self, accelerator, output_dir: str | os.PathLike, total_limit: int | None) -> Path:
        """`save_checkpoint` of all of it; every process must call it."""
        return save_checkpoint(accelerator, output_dir, self.state, total_limit, write_extra=self.copy_extra_files)


MODEL_WEIGHTS_FILE = "model.safetensors"  # accelerate's name for the (first) prepared model's weights
EMA_STATE_KEY = "shadow_params"  # what tells diffusers' EMAModel state among the registered objects' files


def load_checkpoint_model(folder: str | os.PathLike, model) -> str:
    """Load into `model` (a module of the run's own config) the weights a checkpoint holds: its EMA's when it has
    one (the weights the run samples and saves), else the raw model's. Returns which: "EMA" or "model".

    The reader of what `CheckpointContents.save` writes: the model's weights file and, among the registered
    objects' files, the EMA's. A LoRA run's checkpoint holds only the adapter (`model_hooks`): it is refused."""
    from safetensors.torch import load_file

    from ..lora import is_lora_key

    folder = Path(folder)
    if not (folder / MODEL_WEIGHTS_FILE).is_file():
        raise InputError(f"{folder} holds no model weights ({MODEL_WEIGHTS_FILE}): not a checkpoint of "
                         "train_unconditional_latent.py or train_dreambooth_unconditional.py (or one sharded by FSDP).")
    weights = load_file(folder / MODEL_WEIGHTS_FILE, device="cpu")
    if weights and all(is_lora_key(name) for name in weights):
        raise InputError(f"{folder} is a checkpoint of a LoRA run: it holds only the adapter, not a whole UNet. "
                         "Use the run's saved adapter (or its base, 'base') instead.")
    averages = _checkpoint_ema(folder)
    if averages is not None:
        parameters = list(model.parameters())
        if len(averages) != len(parameters) or any(a.shape != p.shape for a, p in zip(averages, parameters)):
            raise InputError(f"The EMA weights of {folder} do not fit the model's config ({len(averages)} tensors, "
                             f"the model has {len(parameters)}): a checkpoint of another model.")
        with torch.no_grad():
            for parameter, average in zip(parameters, averages):
                parameter.copy_(average)
        return "EMA"
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"The weights of {folder} do not fit the model's config (missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}): a checkpoint of another model.")
    return "model"


def _checkpoint_ema(folder: Path) -> list | None:
    """The EMA's averaged parameters among a checkpoint's registered objects (custom_checkpoint_<i>.pkl), if any."""
    for path in sorted(folder.glob("custom_checkpoint_*.pkl")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 (an object of another kind, e.g. the post-hoc EMA's lists)
            continue
        if isinstance(state, dict) and EMA_STATE_KEY in state:
            return state[EMA_STATE_KEY]
    return None


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


def state_problems(folder: Path, data: dict) -> list[str]:
    """What is wrong with training_state.json's content `data`: its own checksum (absent in older checkpoints)
    and its global_step, which must be the step in the folder's name (where there is one)."""
    problems = []
    recorded = data.get(STATE_CHECKSUM_KEY)
    if recorded is not None and recorded != state_checksum(data):
        problems.append(f"{STATE_FILE} does not match its {CHECKSUM} checksum (changed or damaged since it was saved)")
    step = checkpoint_step(folder)
    if step is not None and data.get("global_step") != step:
        problems.append(f"{STATE_FILE} says global_step {data.get('global_step')}, but the folder is {folder.name}")
    return problems


def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """What is wrong with a complete checkpoint folder, each naming the file; [] when it is intact.

    training_state.json first (`state_problems`). With a manifest: every recorded file exists, has its size and
    its checksum. Without one (older checkpoints): the model weights exist and every file parses as far as its
    format can be checked."""
    folder = Path(folder)
    try:
        data = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        return [f"{STATE_FILE} cannot be read ({error})"]
    problems = state_problems(folder, data)
    manifest = data.get(FILES_KEY)
    if manifest is None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != STATE_FILE)
        problems += [problem for problem in map(_format_problem, files) if problem]
        if not any(p.name.startswith(("model", "pytorch_model")) for p in files):
            problems.append("the model weights (model.safetensors) are missing")
        return problems
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
    from ..saving import agree_on_failures

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


class BestCheckpoint:
    """Validation.keep_best's policy: the checkpoint of the best (lowest) value of the metric `key` so far is
    protected from pruning (saved at that step if none was due there); `best` is its (step, value)."""

    def __init__(self, key: str | None, output_dir: str | os.PathLike, total_limit: int | None):
        self.key = key
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        self.best: tuple[int, float] | None = None

    def find(self, global_step: int) -> None:
        """On (re)start, main process: the best validation so far in metrics.jsonl, among the steps up to where
        training goes on whose checkpoint exists; its record is rewritten to match."""
        key = self.key
        if key is None:
            return
        rows = read_metrics(self.output_dir, having=key) if (self.output_dir / METRICS_FILE).exists() else []
        rows = [row for row in rows if 0 < row["step"] <= global_step
                and isinstance(row[key], (int, float)) and math.isfinite(row[key])
                and (self.output_dir / f"checkpoint-{row['step']}").is_dir()]
        if rows:
            row = min(rows, key=lambda row: row[key])
            self.best = (row["step"], row[key])
            protect_checkpoint(self.output_dir, row["step"], **{key: row[key]})
        else:
            unprotect_checkpoints(self.output_dir)

    def after_validation(self, accelerator, step: int, metrics: dict | None, save: Callable[[], Any]) -> None:
        """A new best value in `metrics` (the validation of `step`; None if it did not run there) protects this
        step's checkpoint, calling `save()` first if none was due at this step. Every process takes part (the
        save is collective); the main process decides."""
        if self.key is None or step == 0:
            return

        def decide() -> tuple[bool, bool, float | None]:
            value = (metrics or {}).get(self.key)
            new_best = value is not None and math.isfinite(value) and (self.best is None or value < self.best[1])
            return new_best, (self.output_dir / f"checkpoint-{step}").is_dir(), value

        new_best, has_checkpoint, value = decided_by_main_process(accelerator, decide)
        if not new_best:
            return
        if not has_checkpoint:
            save()
        if accelerator.is_main_process:
            self.best = (step, value)
            protect_checkpoint(self.output_dir, step, **{self.key: value})
            prune_checkpoints(self.output_dir, self.total_limit)  # the previous best may go now
            logger.info("Best %s so far (%.4g) at step %d: checkpoint-%d is kept from pruning.",
                        self.key, value, step, step)
