"""Checkpoints are complete or ignored; `latest` is the newest complete one; the limit prunes safely."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import run_script, strip_checksums
from uldm.errors import InputError
from uldm.training import checkpoints as ckpt


def make_checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if complete:
        ckpt.TrainingState(global_step=step).save(folder)
    return folder


def test_latest_skips_incomplete_checkpoints_with_a_warning(tmp_path, caplog):
    make_checkpoint(tmp_path, 100)
    make_checkpoint(tmp_path, 200)
    make_checkpoint(tmp_path, 300, complete=False)  # cut short: no training_state.json
    (tmp_path / f"{ckpt.TEMP_PREFIX}400").mkdir()  # a save in progress or killed
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-200"
    assert "checkpoint-300" in caplog.text and "not written completely" in caplog.text
    assert ckpt.resolve_resume_path("latest", tmp_path).name == "checkpoint-200"
    assert ckpt.resolve_resume_path(None, tmp_path) is None
    with pytest.raises(InputError, match="incomplete"):
        ckpt.resolve_resume_path(str(tmp_path / "checkpoint-300"), tmp_path)
    with pytest.raises(InputError, match="no such checkpoint"):
        ckpt.resolve_resume_path("checkpoint-999", tmp_path)
    assert ckpt.resolve_resume_path("latest", tmp_path / "fresh-run") is None


def test_limit_keeps_exactly_the_newest_complete_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        make_checkpoint(tmp_path, step)
    incomplete = make_checkpoint(tmp_path, 50, complete=False)
    (tmp_path / f"{ckpt.TEMP_PREFIX}60").mkdir()
    removed = ckpt.prune_checkpoints(tmp_path, total_limit=2)
    assert [p.name for p in removed] == ["checkpoint-10", "checkpoint-20"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-40"]
    assert incomplete.exists(), "an incomplete folder is not counted and never deleted as if it were complete"
    assert not (tmp_path / f"{ckpt.TEMP_PREFIX}60").exists(), "leftovers of cut-short saves are cleared"


def test_publishing_a_step_again_replaces_it_only_when_whole(tmp_path):
    make_checkpoint(tmp_path, 5)
    temp = tmp_path / f"{ckpt.TEMP_PREFIX}5"
    temp.mkdir()
    ckpt.TrainingState(global_step=5, micro_batches=7).save(temp)
    final = ckpt.publish_checkpoint(temp, tmp_path, 5)
    assert ckpt.TrainingState.load(final).micro_batches == 7 and not temp.exists()


def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(train_images, tiny_vae_dir, tmp_path, monkeypatch):
    """The process dies while writing checkpoint-4: checkpoint-2 stays `latest`, the run resumes from it."""
    from conftest import latent_training_args
    from uldm.training import read_metrics

    original_save = ckpt.TrainingState.save

    def die_at_step_4(self, folder, **kwargs):
        if self.global_step == 4:
            raise KeyboardInterrupt("simulated kill while saving")
        original_save(self, folder, **kwargs)

    out = tmp_path / "out"
    args = latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=6, checkpointing_steps=2,
                     checkpoints_total_limit=1)
    monkeypatch.setattr(ckpt.TrainingState, "save", die_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_script("train_unconditional_latent", args)
    monkeypatch.setattr(ckpt.TrainingState, "save", original_save)
    assert (out / f"{ckpt.TEMP_PREFIX}4").is_dir(), "the half-written save stays hidden"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"], "the limit must not have removed it"

    run_script("train_unconditional_latent", args + ["--resume_from_checkpoint", "latest"])
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-6"]
    assert not (out / f"{ckpt.TEMP_PREFIX}4").exists()
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6


def test_a_new_run_refuses_to_overwrite_an_earlier_runs_checkpoints(train_images, tiny_vae_dir, tmp_path,
                                                                    expect_input_error):
    from conftest import latent_training_args

    out = tmp_path / "out"
    make_checkpoint(out, 7)
    argv = latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=1)
    message = expect_input_error(run_script, "train_unconditional_latent", argv)
    assert "already holds checkpoints" in message
    assert (out / "checkpoint-7" / "model.safetensors").read_bytes() == b"weights"


def test_first_signal_asks_for_a_clean_stop_and_a_second_stops_at_once():
    from uldm.training import GracefulStop

    before = signal.getsignal(signal.SIGTERM)
    stop = GracefulStop().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested, "the first signal only asks the loop to stop at the next step boundary"
        with pytest.raises(KeyboardInterrupt, match="Second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is before, "after the second signal the old handler is back"
    finally:
        stop.uninstall()


# --------------------------------------------------------------------------------------------
# Faults through a script: a full disk, a damaged checkpoint (exit code 2, nothing saved lost)


def writer_that_fills_the_disk(real_writer, marker: str):
    """Writes a few bytes, as a writer does before the disk fills, then raises ENOSPC (for paths with `marker`)."""
    import errno

    def write(obj, path, *args, **kwargs):
        if marker in str(path):
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_writer(obj, path, *args, **kwargs)

    return write


def folder_bytes(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_full_disk_while_saving_a_checkpoint_stops_cleanly_and_loses_nothing(
        train_images, tiny_vae_dir, tmp_path, monkeypatch, capsys):
    import accelerate.utils.other

    from conftest import latent_training_args
    from uldm.training import read_metrics

    out = tmp_path / "out"
    args = latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=4, checkpointing_steps=2)
    real = accelerate.utils.other.safe_save_file
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", writer_that_fills_the_disk(real, ".tmp-checkpoint-4"))
    with pytest.raises(SystemExit) as stop:
        run_script("train_unconditional_latent", args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: Could not write checkpoint-4 to {out}: the disk is full (No space left on device). "
                           "It needs about ")
    assert "(the size of checkpoint-2);" in line and " are free on that disk." in line
    assert "The unfinished .tmp-checkpoint-4 was removed; checkpoint-2 is intact." in line
    assert line.endswith("then continue with the same command plus --resume_from_checkpoint latest.")
    assert "Traceback" not in err
    assert not (out / ".tmp-checkpoint-4").exists(), "the half-written folder is removed at once"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert ckpt.checkpoint_problems(out / "checkpoint-2") == []
    assert not (out / "unet").exists(), "the run stopped before its final save"

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", real)
    run_script("train_unconditional_latent", args + ["--resume_from_checkpoint", "latest"])
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_full_disk_during_the_final_save_keeps_the_previous_model(
        train_images, tiny_vae_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    from conftest import latent_training_args
    from uldm.saving import TEMP_SAVE_NAME
    from uldm.training import read_metrics

    out = tmp_path / "out"
    run_script("train_unconditional_latent",
               latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=2, checkpointing_steps=2))
    previous = folder_bytes(out / "unet")

    # Training on: the final save runs out of space in the middle of the UNet's weights.
    longer = latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=4, checkpointing_steps=2,
                                  resume_from_checkpoint="latest")
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", writer_that_fills_the_disk(real, f"{TEMP_SAVE_NAME}/unet"))
    with pytest.raises(SystemExit) as stop:
        run_script("train_unconditional_latent", longer)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: Could not write the trained pipeline to {out}: the disk is full")
    assert "(the size of its weights)" in line and f"what {out} held before is unchanged" in line
    assert line.endswith("plus --resume_from_checkpoint latest: it loads checkpoint-4 and writes the model again "
                         "(training only the steps after it, if any).")
    assert folder_bytes(out / "unet") == previous, "the previous model's unet/ is untouched"
    assert not (out / TEMP_SAVE_NAME).exists()
    assert ckpt.checkpoint_problems(out / "checkpoint-4") == []

    # What the message says to do works: the model is written from checkpoint-4 without training.
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    run_script("train_unconditional_latent", longer)
    assert folder_bytes(out / "unet") != previous
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4], "no step was trained again"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary or old folders left"


def test_a_damaged_newest_checkpoint_is_named_and_latest_falls_back_to_an_intact_one(
        train_images, tiny_vae_dir, tmp_path, capsys, caplog):
    """checkpoint-4's weights are truncated after it was published; checkpoint-2 is an old-style one
    (written before checksums were recorded), which must still resume."""
    from conftest import latent_training_args
    from uldm.training import read_metrics

    out = tmp_path / "out"
    run_script("train_unconditional_latent",
               latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=4, checkpointing_steps=2))
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    strip_checksums(out / "checkpoint-2")
    kept = {name: folder_bytes(out / name) for name in ("checkpoint-2", "checkpoint-4")}

    longer = latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=6, checkpointing_steps=2)
    with pytest.raises(SystemExit) as stop:
        run_script("train_unconditional_latent", longer + ["--resume_from_checkpoint", out / "checkpoint-4"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert (f"error: {out / 'checkpoint-4'} is damaged: model.safetensors is truncated (1000 bytes; "
            in err), err[-2000:]
    assert "Resume from another checkpoint (checkpoint-2), or use --resume_from_checkpoint latest" in err
    assert "Traceback" not in err
    assert {name: folder_bytes(out / name) for name in kept} == kept, "a failed resume changes nothing"

    with caplog.at_level(logging.WARNING):
        run_script("train_unconditional_latent", longer + ["--resume_from_checkpoint", "latest"])
    assert f"Skipping {out / 'checkpoint-4'}, it is damaged: model.safetensors is truncated" in caplog.text
    assert f"Resuming from {out / 'checkpoint-2'}, the newest intact checkpoint." in caplog.text
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4, 5, 6], "steps 3 and 4 were trained again"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert ckpt.checkpoint_problems(out / "checkpoint-4") == [], "the damaged checkpoint-4 was written anew"


def test_an_edited_training_state_is_damage_not_a_resume_at_another_step(train_images, tiny_vae_dir, tmp_path,
                                                                         capsys, caplog):
    """Issue 20: one digit changed in training_state.json ("global_step": 4 -> 5) used to resume silently at
    step 5. The file's own checksum and the folder's step catch it; an older checkpoint (no checksums) is still
    held to its folder's step."""
    from conftest import latent_training_args
    from uldm.training import read_metrics

    out = tmp_path / "out"
    run_script("train_unconditional_latent",
               latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=4, checkpointing_steps=2))
    state_file = out / "checkpoint-4" / "training_state.json"
    state_file.write_text(state_file.read_text().replace('"global_step": 4', '"global_step": 5'))
    assert ckpt.checkpoint_problems(out / "checkpoint-4") == [
        "training_state.json does not match its sha256 checksum (changed or damaged since it was saved)",
        "training_state.json says global_step 5, but the folder is checkpoint-4",
    ]
    old_style = tmp_path / "old" / "checkpoint-3"
    shutil.copytree(out / "checkpoint-2", old_style)
    strip_checksums(old_style)
    assert ckpt.checkpoint_problems(old_style) == [
        "training_state.json says global_step 2, but the folder is checkpoint-3"]
    shutil.move(old_style, old_style.with_name("checkpoint-2"))
    assert ckpt.checkpoint_problems(old_style.with_name("checkpoint-2")) == [], "an intact old-style checkpoint passes"

    longer = latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=6, checkpointing_steps=2)
    with pytest.raises(SystemExit) as stop:
        run_script("train_unconditional_latent", longer + ["--resume_from_checkpoint", out / "checkpoint-4"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'checkpoint-4'} is damaged: training_state.json does not match its sha256 checksum" in err

    with caplog.at_level(logging.WARNING):
        run_script("train_unconditional_latent", longer + ["--resume_from_checkpoint", "latest"])
    assert f"Skipping {out / 'checkpoint-4'}, it is damaged: training_state.json does not match" in caplog.text
    assert f"Resuming from {out / 'checkpoint-2'}, the newest intact checkpoint." in caplog.text
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4, 5, 6], "steps 3 and 4 were trained again"
    assert ckpt.checkpoint_problems(out / "checkpoint-4") == [], "the damaged checkpoint-4 was written anew"


SMALL_DISK = os.environ.get("ULDM_TEST_SMALL_DISK")


@pytest.mark.skipif(not SMALL_DISK, reason="set ULDM_TEST_SMALL_DISK to an empty folder on a 16 MB file system "
                                           "(as root: mount -t tmpfs -o size=16m tmpfs DIR)")
def test_a_real_full_disk_stops_the_run_cleanly(train_images, tiny_vae_dir, capsys):
    """The issue's case for real: a tiny run's checkpoint (about 8 MB) fits once on 16 MB, not twice."""
    from conftest import latent_training_args

    out = Path(SMALL_DISK) / "out"
    shutil.rmtree(out, ignore_errors=True)
    try:
        with pytest.raises(SystemExit) as stop:
            run_script("train_unconditional_latent", latent_training_args(
                train_images, tiny_vae_dir, out, max_train_steps=4, checkpointing_steps=2))
        assert stop.value.code == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert line.startswith(f"error: Could not write checkpoint-4 to {out}: the disk is full"), line
        assert "checkpoint-2 is intact" in line
        assert not (out / ".tmp-checkpoint-4").exists()
        assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
        assert ckpt.checkpoint_problems(out / "checkpoint-2") == []
    finally:
        shutil.rmtree(out, ignore_errors=True)
