"""A real 2-process run on the CPU (accelerate's MULTI_CPU mode over gloo, started by torchrun)."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path

from conftest import REPO_ROOT, subprocess_env, venv_bin
from uldm.training import read_metrics


def read_trace(prefix: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in Path(f"{prefix}.rank{rank}.jsonl").read_text().splitlines()]


def test_two_processes_shard_the_data_keep_equal_weights_and_write_one_set_of_outputs(
        train_images, tiny_vae_dir, tmp_path):
    out, trace = tmp_path / "out", tmp_path / "trace"
    command = [
        venv_bin("torchrun"), "--nproc_per_node", "2", "--master_port", "29517",
        str(REPO_ROOT / "train_unconditional_latent.py"),
        "--train_data_dir", str(train_images), "--vae_name_or_path", str(tiny_vae_dir),
        "--model_config_name_or_path", "tiny", "--resolution", "32", "--train_batch_size", "3",
        "--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--cache_latents", "--random_flip",
        "--use_ema", "--checkpointing_steps", "3", "--validation_steps", "3", "--num_validation_images", "2",
        "--validation_inference_steps", "2", "--report_to", "tensorboard", "--output_dir", str(out),
        "--learning_rate", "1e-3", "--lr_warmup_steps", "1",
        "--validation_fid_images", "7", "--fid_feature_extractor", "random-conv", "--fid_batch_size", "2",
    ]
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


def check_fid_is_the_one_process_fid(out: Path, train_images: Path) -> None:
    """The two processes shared the reference images and the samples (7 of each: uneven shares); gathered in
    order, they give the features and the FID that one process computes alone."""
    import pytest
    import torch

    from pipeline_latent_uncond import UnconditionalLatentPipeline
    from uldm import fid
    from uldm.data import ImageFolderDataset, Preprocessing
    from uldm.fid_validation import FidScorer
    from uldm.images import list_image_files

    rows = read_metrics(out, having="fid")
    assert [row["step"] for row in rows] == [3, 6]
    (cached,) = (out / "fid_reference").glob("reference-*.safetensors")
    shared = fid.load_stored_features(cached, fid.RandomConvFeatures())
    reference = fid.ReferenceImages(ImageFolderDataset(list_image_files(train_images), train_images,
                                                       Preprocessing(32, center_crop=True)))
    alone = fid.extract_features(reference, fid.RandomConvFeatures(), batch_size=5)
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-6)
    pipeline = UnconditionalLatentPipeline.from_pretrained(out)  # the EMA weights of step 6, as validated
    pipeline.set_progress_bar_config(disable=True)
    scorer = FidScorer(fid.RandomConvFeatures(), alone, num_images=7, num_inference_steps=2, batch_size=3)
    assert scorer.score(pipeline)["fid"] == pytest.approx(rows[-1]["fid"], rel=1e-4)
