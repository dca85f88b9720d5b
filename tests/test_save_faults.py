"""Faults while saving and resuming: a full disk, a damaged checkpoint, a checkpoint that does not fit.

Each test checks the message, and that nothing saved before was lost. The script-level tests (exit
code 2 through the scripts' error path) are in test_checkpoints.py; these drive the library directly
with a tiny model, which is much faster.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from conftest import strip_checksums
from uldm import saving
from uldm.errors import InputError, SaveError
from uldm.training import checkpoints as ckpt

DiskUsage = namedtuple("DiskUsage", "total used free")


def pretend_free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - free, free))


def failing_writer(real_writer, marker: str, error: BaseException):
    """A stand-in for a file writer: for paths containing `marker` it writes a few bytes, as a writer does
    before the disk fills, then raises `error`; other paths are written normally."""

    def write(obj, path, *args, **kwargs):
        if marker in str(path):
            Path(path).write_bytes(b"\0" * 100)
            raise error
        return real_writer(obj, path, *args, **kwargs)

    return write


def disk_full(path="") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


# --------------------------------------------------------------------------------------------
# What counts as a failed write, and the message


def test_the_errors_torch_and_safetensors_raise_on_a_full_disk_count_as_write_failures():
    # Neither raises OSError on a full disk. These are their errors on a full 1 MiB tmpfs (torch 2.14,
    # safetensors 0.8): torch's zip writer only notices that its position is off.
    from safetensors import SafetensorError

    assert saving.is_write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    assert saving.is_write_failure(
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert saving.is_write_failure(disk_full())
    assert not saving.is_write_failure(ValueError("a bug"))
    assert not saving.is_write_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    try:
        raise ValueError("while saving") from disk_full()
    except ValueError as wrapped:
        assert saving.is_write_failure(wrapped), "an OSError behind another exception is still a write failure"


def test_the_message_says_what_where_how_much_is_needed_and_free(tmp_path, monkeypatch):
    pretend_free_space(monkeypatch, 3 * 1024**2)
    message = saving.save_failure_message("checkpoint-4", tmp_path, disk_full(), needed=25 * 1024**2,
                                          basis="the size of checkpoint-2", kept="checkpoint-2 is intact.",
                                          remedy="Free some space.")
    assert message.startswith(f"Could not write checkpoint-4 to {tmp_path}: the disk is full")
    assert "It needs about 25.0 MiB (the size of checkpoint-2); 3.0 MiB are free" in message
    assert message.endswith("checkpoint-2 is intact. Free some space.")
    quota = saving.save_failure_message("x", tmp_path, OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert "the disk quota is exceeded" in quota
    torch_style = saving.save_failure_message("x", tmp_path, RuntimeError("[enforce fail] unexpected pos 704 vs 598"),
                                              needed=25 * 1024**2)
    assert ": the disk is full (3.0 MiB were free when the write failed: [enforce fail] unexpected pos 704 vs 598)." \
        in torch_style, "torch does not say why; less free space than needed does"
    pretend_free_space(monkeypatch, 10**11)
    plenty = saving.save_failure_message("x", tmp_path, RuntimeError("PytorchStreamWriter failed writing file"),
                                         needed=25 * 1024**2)
    assert ": the write failed (PytorchStreamWriter failed writing file)." in plenty
    from safetensors import SafetensorError

    safetensors_style = saving.save_failure_message(
        "x", tmp_path, SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert "x to " + str(tmp_path) + ": the disk is full (No space left on device)." in safetensors_style


def test_free_space_below_twice_the_expected_size_is_warned_about(tmp_path, monkeypatch, caplog):
    pretend_free_space(monkeypatch, 150)
    with caplog.at_level(logging.WARNING):
        assert saving.warn_if_low_on_space(tmp_path / "not-yet", 100, "checkpoint-4", "the size of checkpoint-2")
    assert "Only 150 bytes free" in caplog.text and "twice the 100 bytes checkpoint-4 needs" in caplog.text
    assert not saving.warn_if_low_on_space(tmp_path, 75, "checkpoint-4")
    assert not saving.warn_if_low_on_space(tmp_path, None, "checkpoint-4"), "nothing to compare with: no warning"


# --------------------------------------------------------------------------------------------
# Every process stops together (one process here: the semantics)


class OneProcess:
    num_processes = 1
    is_main_process = True


def test_a_failed_write_becomes_one_save_error_after_the_cleanup(tmp_path):
    cleaned = []
    with pytest.raises(SaveError, match="Could not write samples to .*: the disk is full") as raised:
        with saving.processes_stop_together(OneProcess(), "samples", tmp_path, on_failure=lambda: cleaned.append(1),
                                            needed=lambda: 1234):
            raise disk_full(tmp_path / "000001.png")
    assert cleaned == [1] and "about 1.2 KiB" in str(raised.value)
    assert isinstance(raised.value.__cause__, OSError)


def test_a_bug_inside_a_guarded_save_keeps_its_own_exception(tmp_path):
    cleaned = []
    with pytest.raises(KeyError, match="no such component"):
        with saving.processes_stop_together(OneProcess(), "the pipeline", tmp_path, on_failure=lambda: cleaned.append(1)):
            raise KeyError("no such component")
    assert cleaned == [1], "the unfinished files are removed even when the cause is a bug"
    with saving.processes_stop_together(OneProcess(), "the pipeline", tmp_path, on_failure=lambda: cleaned.append(2)):
        pass
    assert cleaned == [1], "no cleanup after a save that worked"


# --------------------------------------------------------------------------------------------
# Atomic save_pretrained


def test_a_pipeline_save_that_runs_out_of_space_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    import safetensors.torch
    from diffusers import UNet2DModel

    from conftest import build_tiny_unet

    out = tmp_path / "out"
    saving.save_pretrained_atomically(build_tiny_unet(seed=0), out / "unet")
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_writer(real, saving.TEMP_SAVE_NAME, disk_full()))
    with pytest.raises(SaveError) as raised:
        saving.save_pretrained_atomically(build_tiny_unet(seed=1), out / "unet", "the trained UNet")
    message = str(raised.value)
    assert f"Could not write the trained UNet to {out / 'unet'}: the disk is full" in message
    assert "(the size of its weights)" in message and "is unchanged" in message
    assert weights.read_bytes() == before, "the previous weights are untouched"
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    moved = saving.save_pretrained_atomically(build_tiny_unet(seed=1), out / "unet")
    assert {p.name for p in moved} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert weights.read_bytes() != before
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    reloaded = UNet2DModel.from_pretrained(out / "unet")
    assert torch.equal(reloaded.conv_in.weight, build_tiny_unet(seed=1).conv_in.weight)


def test_moving_a_saved_folder_into_place_replaces_folders_whole(tmp_path):
    destination, source = tmp_path / "out", tmp_path / "out" / ".tmp-save"
    (destination / "unet").mkdir(parents=True)
    (destination / "unet" / "stale.bin").write_text("old")
    (destination / "checkpoint-2").mkdir()
    (source / "unet").mkdir(parents=True)
    (source / "unet" / "weights.bin").write_text("new")
    (source / "model_index.json").write_text("{}")
    saving.move_into_place(source, destination)
    assert sorted(p.name for p in destination.iterdir()) == ["checkpoint-2", "model_index.json", "unet"]
    assert [p.name for p in (destination / "unet").iterdir()] == ["weights.bin"], "no stale file of the old unet/"


# --------------------------------------------------------------------------------------------
# Checkpoints: manifest, guarded save, verified restore (a tiny model on a real Accelerator)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    from uldm.testing import reset_accelerate_state

    reset_accelerate_state()
    yield Accelerator(cpu=True)
    reset_accelerate_state()


def prepared_model(accelerator, out_features: int = 4):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, out_features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()  # optimiser state to save
    return model, optimizer


def save_steps(accelerator, model, out, steps):
    """A checkpoint at each step, with the weights set to the step number (so a restore shows which one)."""
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(step)
        ckpt.save_checkpoint(accelerator, out, ckpt.TrainingState(global_step=step),
                             write_extra=lambda folder: (folder / "training_args.json").write_text("{}"))


def test_a_checkpoint_records_the_size_and_checksum_of_each_file(accelerator, tmp_path):
    model, _ = prepared_model(accelerator)
    save_steps(accelerator, model, tmp_path, [1])
    folder = tmp_path / "checkpoint-1"
    manifest = json.loads((folder / "training_state.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "training_args.json"} <= set(manifest)
    for name, record in manifest.items():
        data = (folder / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.checkpoint_problems(folder) == []
    assert ckpt.TrainingState.load(folder).global_step == 1, "the manifest does not disturb the state"


def test_a_checkpoint_save_that_fails_removes_its_folder_and_keeps_the_previous_one(accelerator, tmp_path, monkeypatch):
    import accelerate.utils.other

    model, _ = prepared_model(accelerator)
    save_steps(accelerator, model, tmp_path, [1])
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()}
    size = ckpt.checkpoint_size(tmp_path / "checkpoint-1")
    pretend_free_space(monkeypatch, 5000)
    # torch.save (optimizer.bin) fails the way torch fails on a full disk: a RuntimeError, not an OSError.
    torch_disk_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", failing_writer(torch.save, ".tmp-checkpoint-2", torch_disk_full))
    with pytest.raises(SaveError) as raised:
        save_steps(accelerator, model, tmp_path, [2])
    message = str(raised.value)
    assert message.startswith(f"Could not write checkpoint-2 to {tmp_path}: the disk is full (4.9 KiB were free "
                              "when the write failed: [enforce fail")
    assert f"It needs about {saving.human_size(size)} (the size of checkpoint-1); 4.9 KiB are free" in message
    assert "The unfinished .tmp-checkpoint-2 was removed; checkpoint-1 is intact." in message
    assert "--resume_from_checkpoint latest" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()} == before

    # The safetensors writer (model.safetensors) with a plain ENOSPC: the same outcome.
    monkeypatch.undo()
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file",
                        failing_writer(accelerate.utils.other.safe_save_file, ".tmp-checkpoint-2", disk_full()))
    with pytest.raises(SaveError, match="the disk is full"):
        save_steps(accelerator, model, tmp_path, [2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_saving_warns_when_the_disk_has_less_than_twice_the_last_checkpoint_free(accelerator, tmp_path, monkeypatch,
                                                                                 caplog):
    model, _ = prepared_model(accelerator)
    save_steps(accelerator, model, tmp_path, [1])
    size = ckpt.checkpoint_size(tmp_path / "checkpoint-1")
    pretend_free_space(monkeypatch, int(1.5 * size))
    with caplog.at_level(logging.WARNING):
        save_steps(accelerator, model, tmp_path, [2])
    assert f"less than twice the {saving.human_size(size)} checkpoint-2 needs (the size of checkpoint-1)" in caplog.text
    assert ckpt.checkpoint_problems(tmp_path / "checkpoint-2") == [], "a warning only: the save goes on"


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damage_is_found_and_named_with_or_without_a_manifest(accelerator, tmp_path):
    model, _ = prepared_model(accelerator)
    save_steps(accelerator, model, tmp_path, [1, 2, 3, 4])
    one, two, three, four = (tmp_path / f"checkpoint-{step}" for step in (1, 2, 3, 4))
    truncate(one / "model.safetensors")
    (two / "random_states_0.pkl").unlink()
    flip_a_byte(three / "optimizer.bin")
    saved_size = ckpt.read_manifest(one)["model.safetensors"]["size"]
    assert ckpt.checkpoint_problems(one) == [f"model.safetensors is truncated (100 bytes; {saved_size} when saved)"]
    assert ckpt.checkpoint_problems(two) == ["random_states_0.pkl is missing"]
    assert ckpt.checkpoint_problems(three) == ["optimizer.bin does not match its sha256 checksum "
                                               "(changed or damaged since it was saved)"]
    (four / "training_state.json").write_text('{"global_step": 4, "fi')
    assert "training_state.json cannot be read" in ckpt.checkpoint_problems(four)[0]

    # Without a manifest: what the formats allow (the safetensors header, the CRCs of torch's zip files).
    for folder in (one, three):
        strip_checksums(folder)
    assert ckpt.checkpoint_problems(one)[0].startswith("model.safetensors cannot be read (SafetensorError")
    assert ckpt.checkpoint_problems(three)[0].startswith("optimizer.bin is damaged (its part ")
    save_steps(accelerator, model, tmp_path, [5])
    strip_checksums(tmp_path / "checkpoint-5")
    assert ckpt.checkpoint_problems(tmp_path / "checkpoint-5") == [], "an intact old-style checkpoint passes"
    (tmp_path / "checkpoint-5" / "model.safetensors").unlink()
    assert ckpt.checkpoint_problems(tmp_path / "checkpoint-5") == ["the model weights (model.safetensors) are missing"]


def garble_but_record(folder: Path, name: str) -> None:
    """Damage a file in a way checksums cannot see: record the damaged file in the manifest (as if it had
    been written damaged), so only loading it shows the problem."""
    (folder / name).write_bytes(b"not a pickle at all")
    state = ckpt.TrainingState.load(folder)
    (folder / "training_state.json").unlink()
    state.save(folder, files=ckpt.file_manifest(folder))


def test_latest_falls_back_past_damaged_checkpoints_naming_the_files(accelerator, tmp_path, caplog):
    model, _ = prepared_model(accelerator)
    save_steps(accelerator, model, tmp_path, [1, 2, 3])
    truncate(tmp_path / "checkpoint-3" / "model.safetensors")
    garble_but_record(tmp_path / "checkpoint-2", "optimizer.bin")
    assert ckpt.checkpoint_problems(tmp_path / "checkpoint-2") == []
    with torch.no_grad():
        model.weight.fill_(99)
    with caplog.at_level(logging.WARNING):
        assert ckpt.restore_checkpoint(accelerator, "latest", tmp_path) == tmp_path / "checkpoint-1"
    assert f"Skipping {tmp_path / 'checkpoint-3'}, it is damaged: model.safetensors is truncated" in caplog.text
    assert (f"Skipping {tmp_path / 'checkpoint-2'}, it is damaged: optimizer.bin does not load (UnpicklingError"
            in caplog.text)
    assert "Resuming from " + str(tmp_path / "checkpoint-1") in caplog.text
    assert torch.all(model.weight == 1), "the weights of checkpoint-1, whatever the failed loads did before"

    with pytest.raises(InputError) as raised:
        ckpt.restore_checkpoint(accelerator, str(tmp_path / "checkpoint-3"), tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / 'checkpoint-3'} is damaged: model.safetensors is truncated (")
    assert "checkpoint-1, checkpoint-2), or use --resume_from_checkpoint latest" in str(raised.value)
    with pytest.raises(InputError, match=r"checkpoint-2 is damaged: optimizer.bin does not load \(UnpicklingError"):
        ckpt.restore_checkpoint(accelerator, "checkpoint-2", tmp_path)

    truncate(tmp_path / "checkpoint-1" / "optimizer.bin")
    with pytest.raises(InputError, match="No intact checkpoint in .* to resume from: checkpoint-3: .* "
                                         "checkpoint-1: optimizer.bin is truncated"):
        ckpt.restore_checkpoint(accelerator, "latest", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"], \
        "resuming never deletes anything"


def test_an_old_style_checkpoint_without_checksums_still_resumes(accelerator, tmp_path):
    model, _ = prepared_model(accelerator)
    save_steps(accelerator, model, tmp_path, [1, 2])
    strip_checksums(tmp_path / "checkpoint-2")
    with torch.no_grad():
        model.weight.fill_(99)
    assert ckpt.restore_checkpoint(accelerator, "latest", tmp_path) == tmp_path / "checkpoint-2"
    assert torch.all(model.weight == 2)


def test_a_sound_checkpoint_that_does_not_fit_the_run_is_not_called_damaged(tmp_path):
    from accelerate import Accelerator

    from uldm.testing import reset_accelerate_state

    reset_accelerate_state()
    try:
        first = Accelerator(cpu=True)
        model, _ = prepared_model(first, out_features=4)
        save_steps(first, model, tmp_path, [1, 2])
        reset_accelerate_state()
        other = Accelerator(cpu=True)
        prepared_model(other, out_features=5)  # another model size: the weights cannot be loaded into it
        with pytest.raises(InputError) as raised:
            ckpt.restore_checkpoint(other, "latest", tmp_path)
    finally:
        reset_accelerate_state()
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'checkpoint-2'} does not fit this run (RuntimeError: ")
    assert "its files are intact" in message and "damaged" not in message


# --------------------------------------------------------------------------------------------
# Sample folders


class SolidColours:
    """A stand-in pipeline: image i of a call is a solid colour (the sampling loop is what is tested)."""

    def __call__(self, batch_size, **kwargs):
        from PIL import Image

        return type("Output", (), {"images": [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(batch_size)]})


def test_a_full_disk_while_writing_samples_keeps_the_images_written(accelerator, tmp_path, monkeypatch):
    from PIL import Image

    from uldm.sampling import missing_indices, write_missing_samples

    real_save, calls = Image.Image.save, []

    def save_until_the_disk_is_full(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 3:
            Path(path).write_bytes(b"\x89PNG")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_the_disk_is_full)
    with pytest.raises(SaveError) as raised:
        write_missing_samples(SolidColours(), tmp_path, 8, accelerator, batch_size=2)
    message = str(raised.value)
    assert message.startswith(f"Could not write 8 images to {tmp_path}: the disk is full")
    assert "(for the 8 images, at the size of those written)" in message
    assert "The images already written are kept." in message and "makes only the missing images" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.png", "000001.png", "000002.png"], \
        "the partly written image is removed, the others are kept"

    monkeypatch.setattr(Image.Image, "save", real_save)
    assert write_missing_samples(SolidColours(), tmp_path, 8, accelerator, batch_size=2) == [3, 4, 5, 6, 7]
    assert missing_indices(tmp_path, 8) == []
