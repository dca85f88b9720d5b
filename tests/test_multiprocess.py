"""A real 2-process run on the CPU (accelerate's MULTI_CPU mode over gloo, started by torchrun)."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO_ROOT, latent_training_args, subprocess_env, torchrun_command
from uldm.training import read_metrics

LATENT_TRAINER = REPO_ROOT / "train_unconditional_latent.py"


def read_trace(prefix: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in Path(f"{prefix}.rank{rank}.jsonl").read_text().splitlines()]


def test_two_processes_shard_the_data_keep_equal_weights_and_write_one_set_of_outputs(
        train_images, tiny_vae_dir, tmp_path):
    out, trace = tmp_path / "out", tmp_path / "trace"
    command = torchrun_command(LATENT_TRAINER, *latent_training_args(
        train_images, tiny_vae_dir, out, train_batch_size=3, max_train_steps=6, gradient_accumulation_steps=2,
        cache_latents=True, random_flip=True, use_ema=True, checkpointing_steps=3, validation_steps=3,
        num_validation_images=2, validation_inference_steps=2, report_to="tensorboard", lr_warmup_steps=1,
        validation_fid_images=7, fid_feature_extractor="random-conv", fid_batch_size=2))
    result = subprocess.run(command, env=subprocess_env(ULDM_TRACE_BATCHES=trace), capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    traces = [read_trace(trace, rank) for rank in range(2)]
    # Each rank saw its own shard: within every global batch the two ranks' items are disjoint,
    # and over one epoch (24 images / (3 x 2) = 4 batches) they cover 24 different images.
    batches = [[entry["indices"] for entry in t if "indices" in entry] for t in traces]
    assert len(batches[0]) == len(batches[1]) == 12
    for mine, theirs in zip(*batches):
        assert not set(mine) & set(theirs)
    first_epoch = [i for rank in range(2) for batch in batches[rank][:4] for i in batch]
    assert sorted(first_epoch) == list(range(24))

    # Weights are identical on both ranks after every optimiser step.
    checksums = [[entry["weights_checksum"] for entry in t if "weights_checksum" in entry] for t in traces]
    assert len(checksums[0]) == 6 and checksums[0] == checksums[1]

    # The latent cache was encoded by both ranks together, half each.
    (cache,) = (out / "latent_cache").iterdir()
    parts = sorted(p for p in cache.iterdir() if p.is_dir())
    assert len(parts) == 2
    sizes = [len(__import__("numpy").load(part / "index.npy")) for part in parts]
    assert sizes == [12, 12]

    # Every rank took part in each save_state; only the main process wrote logs and outputs.
    for step in (3, 6):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    steps = [row["step"] for row in read_metrics(out, having="loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["validation_0000003.png", "validation_0000006.png"]
    writers = {path.name.split(".")[-2] for path in (out / "logs").rglob("events.out.tfevents.*")}
    assert len(writers) == 1, f"TensorBoard files from several processes: {writers}"
    assert (out / "model_index.json").is_file()
    check_fid_is_the_one_process_fid(out, train_images)

    grouped = defaultdict(list)
    for line in result.stderr.splitlines():
        if "Saved the pipeline" in line:
            grouped["pipeline"].append(line)
    assert len(grouped["pipeline"]) == 1


def _torchrun_latent_run(output_dir: Path, train_images, tiny_vae_dir, *options, env=None):
    """4 steps of the latent trainer in 2 CPU processes (accumulation 2, EMA, checkpoints and validation at 2 and 4)."""
    command = torchrun_command(LATENT_TRAINER, *latent_training_args(
        train_images, tiny_vae_dir, output_dir, train_batch_size=3, max_train_steps=4, gradient_accumulation_steps=2,
        cache_latents=True, use_ema=True, checkpointing_steps=2, validation_steps=2, num_validation_images=2,
        validation_inference_steps=2, lr_warmup_steps=1), *options)
    return subprocess.run(command, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=600,
                          cwd=output_dir.parent)


def test_fsdp2_trains_as_ddp_resumes_exactly_and_saves_a_loadable_pipeline(train_images, tiny_vae_dir, tmp_path):
    """accelerate selects FSDP only on GPUs; ULDM_TEST_FORCE_FSDP=2 makes these CPU processes use its FSDP2 code
    (uldm.testing.force_fsdp_if_asked). EMA of the gathered weights, validation and the pipeline
    from the unsharded copy, sharded checkpoints: the run equals DDP's, and resuming its checkpoint-2 gives the
    same steps 3-4."""
    import shutil

    from safetensors.torch import load_file

    from uldm.pipeline_loading import load_pipeline

    fsdp, resumed, ddp = tmp_path / "fsdp", tmp_path / "resumed", tmp_path / "ddp"
    force = {"ULDM_TEST_FORCE_FSDP": "2"}
    result = _torchrun_latent_run(fsdp, train_images, tiny_vae_dir, env=force)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (fsdp / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir(), "the checkpoint is not FSDP's (sharded)"
    resumed.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    result = _torchrun_latent_run(resumed, train_images, tiny_vae_dir, "--resume_from_checkpoint", "latest",
                                  env=force)
    assert result.returncode == 0, result.stderr[-4000:]
    result = _torchrun_latent_run(ddp, train_images, tiny_vae_dir)
    assert result.returncode == 0, result.stderr[-4000:]

    losses = {run: [row["loss"] for row in read_metrics(run, having="loss")] for run in (fsdp, resumed, ddp)}
    assert len(losses[fsdp]) == 4 and losses[resumed] == losses[fsdp][2:]  # resumed: steps 3-4, exactly
    for a, b in zip(losses[fsdp], losses[ddp]):
        assert a == pytest.approx(b, rel=1e-5)

    def weights(folder: Path, name: str = "unet/diffusion_pytorch_model.safetensors") -> dict:
        return load_file(folder / name)

    def worst(a: dict, b: dict) -> float:
        assert a.keys() == b.keys()
        return max((a[key] - b[key]).abs().max().item() for key in a)

    assert worst(weights(fsdp), weights(resumed)) == 0.0  # the saved EMA
    assert worst(weights(fsdp), weights(ddp)) < 1e-5  # reduction order differs
    assert (fsdp / "samples" / "validation_0000002.png").is_file() and (fsdp / "samples" / "validation_0000004.png").is_file()
    pipeline = load_pipeline(fsdp)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_torchrun_without_accelerate_use_cpu_on_a_machine_without_gpus_is_refused(train_images, tiny_vae_dir,
                                                                                   tmp_path):
    """accelerate would run each of the 2 processes alone, both training into the same --output_dir."""
    import os

    import torch

    if torch.cuda.is_available():
        pytest.skip("with GPUs torchrun's processes are joined: nothing to refuse")
    out = tmp_path / "out"
    env = subprocess_env()
    command = torchrun_command(LATENT_TRAINER, *latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=1))
    result = subprocess.run(command, env={k: v for k, v in env.items() if k != "ACCELERATE_USE_CPU"},
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert "error: 2 processes were started (WORLD_SIZE=2)" in result.stderr, result.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=1" in result.stderr and "exitcode  : 2" in result.stderr  # the script's clean exit
    assert not out.exists() or not any(out.iterdir()), sorted(os.listdir(out))


def worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with this RANK (Linux: /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    if not children.is_file():
        pytest.skip("needs Linux's /proc/<pid>/task/<pid>/children")
    for pid in map(int, children.read_text().split()):
        variables = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        if variables.get("RANK") == str(rank):
            return pid
    raise AssertionError(f"no worker with RANK={rank} among torchrun's children")


def test_a_signal_to_one_process_stops_all_of_them_at_the_same_step(train_images, tiny_vae_dir, tmp_path):
    """Pre-emption may reach the processes at different moments, or only one: they agree on the stop flag every
    step, so all stop at the same step boundary with one complete checkpoint (and none waits for the others)."""
    import os
    import signal
    import time

    out, trace = tmp_path / "out", tmp_path / "trace"
    command = torchrun_command(LATENT_TRAINER, *latent_training_args(
        train_images, tiny_vae_dir, out, train_batch_size=3, max_train_steps=200, cache_latents=True,
        checkpointing_steps=1000))
    process = subprocess.Popen(command, env=subprocess_env(ULDM_TRACE_BATCHES=trace), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        rank1_trace, deadline = Path(f"{trace}.rank1.jsonl"), time.monotonic() + 300
        while not (rank1_trace.is_file() and "weights_checksum" in rank1_trace.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
            time.sleep(0.2)
        os.kill(worker_with_rank(process.pid, 1), signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-4000:]
    (checkpoint,) = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 200 and (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert json.loads((checkpoint / "training_state.json").read_text())["global_step"] == step
    assert not (out / "model_index.json").exists(), "a stopped run saves no pipeline"
    for rank in range(2):
        steps_done = [entry["step"] for entry in read_trace(trace, rank) if "weights_checksum" in entry]
        assert steps_done[-1] == step, f"rank {rank} stopped after step {steps_done[-1]}, the checkpoint is {step}"
    assert [row["step"] for row in read_metrics(out, having="loss")] == list(range(1, step + 1))


def check_fid_is_the_one_process_fid(out: Path, train_images: Path) -> None:
    """The two processes shared the reference images and the samples (7 of each: uneven shares); gathered in
    order, they give the features and the FID that one process computes alone."""
    import pytest
    import torch

    from uldm.pipeline_loading import load_pipeline
    from uldm.metrics import fid
    from uldm.data import ImageFolderDataset, Preprocessing
    from uldm.metrics.fid_validation import FidScorer
    from uldm.images import list_image_files

    rows = read_metrics(out, having="fid")
    assert [row["step"] for row in rows] == [3, 6]
    (cached,) = (out / "fid_reference").glob("reference-*.safetensors")
    shared = fid.load_stored_features(cached, fid.RandomConvFeatures())
    reference = fid.ReferenceImages(ImageFolderDataset(list_image_files(train_images), train_images,
                                                       Preprocessing(32, center_crop=True)))
    alone = fid.extract_features(reference, fid.RandomConvFeatures(), batch_size=5)
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-6)
    pipeline = load_pipeline(out)  # the EMA weights of step 6, as validated
    pipeline.set_progress_bar_config(disable=True)
    scorer = FidScorer(fid.RandomConvFeatures(), alone, num_images=7, num_inference_steps=2, batch_size=3)
    assert scorer.score(pipeline)["fid"] == pytest.approx(rows[-1]["fid"], rel=1e-4)
