"""FID/KID during training (uldm/metrics/fid_validation.py, --validation_fid_images), the offline feature
extractors of uldm/metrics/fid.py, the loss-curve figure's FID panel, and --keep_best_checkpoint
(uldm/training/checkpoints.py's protected checkpoint, TrainingLoop's best step).

The runs use a first stage set by hand (conftest's `build_pooling_autoencoder`: latents are the image pooled
4x4, decoding repeats them), so samples show what the UNet learned, and --prediction_type sample, whose
x0 prediction is good enough to sample from after a few dozen steps; a random VAE would decode every
model's latents into the same kind of texture.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import build_tiny_unet, latent_training_args, make_blob_images, run_script
from uldm.training import checkpoints as ckpt
from uldm.metrics import fid
from uldm.metrics.fid_validation import FidScorer, gather_in_order, shard_indices
from uldm.training import read_metrics

SCRIPT = "train_unconditional_latent"


def fid_run_args(images, vae_dir, out, **overrides):
    options = dict(validation_fid_images=24, fid_feature_extractor="random-conv", validation_inference_steps=5,
                   prediction_type="sample", cache_latents=True, lr_scheduler="constant_with_warmup",
                   num_validation_images=0)
    return latent_training_args(images, vae_dir, out, **{**options, **overrides})


# --------------------------------------------------------------------------------------------
# Sharing the work between processes


def test_shards_cover_every_item_once_and_gathering_restores_the_order():
    for count in range(1, 23):
        for processes in range(1, min(count, 5) + 1):
            shards = [shard_indices(count, processes, rank) for rank in range(processes)]
            assert [i for shard in shards for i in shard] == list(range(count)), (count, processes)
            assert max(map(len, shards)) - min(map(len, shards)) <= 1 and min(map(len, shards)) >= 1
            # Each process' rows (here: the item number, twice), then the all-gather of the padded shares.
            local = [torch.tensor([[i, i] for i in shard], dtype=torch.float32).reshape(-1, 2) for shard in shards]
            sent = []
            for rows in local:
                gather_in_order(rows, count, processes, lambda t: sent.append(t) or torch.zeros(len(t) * processes, 2))
            assert len({len(t) for t in sent}) == 1, "all-gather needs equal shapes"
            for rows in local:
                gathered = gather_in_order(rows, count, processes, lambda t: torch.cat(sent))
                assert gathered[:, 0].tolist() == list(range(count))


# --------------------------------------------------------------------------------------------
# Feature extractors


def blob_batch(folder, count, seed, offset=(0, 0, 0)) -> torch.Tensor:
    paths = make_blob_images(folder, count, seed=seed)
    pixels = [torch.from_numpy(__import__("numpy").array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
    return (torch.stack(pixels).int() + torch.tensor(offset).view(1, 3, 1, 1)).clamp(0, 255).to(torch.uint8)


def test_random_conv_features_are_fixed_and_tell_distributions_apart(tmp_path):
    torch.manual_seed(123)
    first = fid.RandomConvFeatures()
    torch.manual_seed(456)
    second = fid.RandomConvFeatures()
    assert fid.feature_extractor_fingerprint(first) == fid.feature_extractor_fingerprint(second), \
        "the weights come from the extractor's own seed, not torch's global state"
    assert fid.feature_extractor_fingerprint(fid.RandomConvFeatures(seed=1)) != fid.feature_extractor_fingerprint(first)

    a, b = blob_batch(tmp_path / "a", 48, 1), blob_batch(tmp_path / "b", 48, 2)
    shifted = blob_batch(tmp_path / "c", 48, 3, offset=(70, -40, 20))
    with torch.no_grad():
        features = {name: first(images) for name, images in (("a", a), ("b", b), ("shifted", shifted))}
    assert features["a"].shape == (48, first.num_features)
    same = fid.fid_from_features(features["a"], features["b"])
    other = fid.fid_from_features(features["a"], features["shifted"])
    assert other > 5 * same, (same, other)
    larger = torch.nn.functional.interpolate(a.float(), scale_factor=2, mode="nearest").round().to(torch.uint8)
    with torch.no_grad():
        assert first(larger).shape == features["a"].shape, "any image size gives the same features"


def test_the_extractor_option_takes_torchscript_files_and_explains_bad_values(tmp_path, monkeypatch):
    scripted = torch.jit.script(fid.RandomConvFeatures(seed=3))
    scripted.save(str(tmp_path / "features.pt"))
    loaded = fid.build_feature_extractor(str(tmp_path / "features.pt"))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), fid.RandomConvFeatures(seed=3)(images))
    with pytest.raises(fid.InputError, match="TorchScript"):
        fid.build_feature_extractor(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(fid.InputError, match="torch.jit.load"):
        fid.build_feature_extractor(str(tmp_path / "junk.pt"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    with pytest.raises(fid.InceptionWeightsMissing, match="--inception_weights"):
        fid.build_feature_extractor("inception")


# --------------------------------------------------------------------------------------------
# FID in the training loop


def tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return values


def test_fid_is_logged_at_each_validation_and_falls_as_the_model_learns(pooling_vae_dir, tmp_path):
    from uldm.pipeline_loading import load_pipeline

    images, out = tmp_path / "images", tmp_path / "out"
    make_blob_images(images, 24)
    run_script(SCRIPT, fid_run_args(images, pooling_vae_dir, out, max_train_steps=30, validation_steps=10,
                                    report_to="tensorboard"))
    rows = read_metrics(out, having="fid")
    assert [row["step"] for row in rows] == [10, 20, 30]
    assert all(set(row) == {"step", "fid", "kid"} for row in rows)
    fids = [row["fid"] for row in rows]
    assert fids[-1] < 0.75 * fids[0], f"FID did not fall as the model learned: {fids}"
    assert [step for step, _ in tensorboard_scalars(out / "logs", "fid")] == [10, 20, 30]

    # The logged number is the FID of the model the run saved (the same samples, the same reference features) ...
    (cached,) = (out / "fid_reference").glob("reference-*.safetensors")
    reference = fid.load_stored_features(cached, fid.RandomConvFeatures())
    assert reference.shape[0] == 24
    pipeline = load_pipeline(out)
    pipeline.set_progress_bar_config(disable=True)
    scorer = FidScorer(fid.RandomConvFeatures(), reference, num_images=24, num_inference_steps=5)
    assert scorer.score(pipeline)["fid"] == pytest.approx(fids[-1], rel=1e-4)
    # ... and an untrained UNet in its place scores much worse.
    pipeline.unet = build_tiny_unet().eval()
    assert scorer.score(pipeline)["fid"] > 2 * fids[-1]

    with Image.open(out / "loss_curve.png") as figure:
        assert figure.height > 1.4 * figure.width * 4 / 7, "the loss curve has an FID panel under it"
    card = (out / "README.md").read_text()
    assert "FID / KID at step 30" in card and "not comparable with published FIDs" in card


def test_a_second_run_reuses_the_reference_features_and_other_references_are_checked(
        pooling_vae_dir, tmp_path, monkeypatch, expect_input_error):
    images, out = tmp_path / "images", tmp_path / "out"
    make_blob_images(images, 16)
    cache = tmp_path / "shared-cache"
    calls = []
    original = fid.extract_features
    monkeypatch.setattr(fid, "extract_features", lambda data, *a, **k: calls.append(len(data)) or original(data, *a, **k))
    common = dict(max_train_steps=2, validation_fid_images=8, reference_stats_cache=cache)
    run_script(SCRIPT, fid_run_args(images, pooling_vae_dir, out, **common))
    assert calls == [16, 8], "the reference once, then the samples"
    calls.clear()
    run_script(SCRIPT, fid_run_args(images, pooling_vae_dir, tmp_path / "again", **common))
    assert calls == [8], "the cached reference features are reused"
    (features_file,) = cache.glob("reference-*.safetensors")

    calls.clear()  # stored features as the reference
    run_script(SCRIPT, fid_run_args(images, pooling_vae_dir, tmp_path / "stored", fid_reference=features_file,
                                    **{**common, "reference_stats_cache": None}))
    assert calls == [8] and read_metrics(tmp_path / "stored", having="fid")
    # ... but only for the extractor that made them.
    torch.jit.script(fid.RandomConvFeatures(seed=5)).save(str(tmp_path / "other.pt"))
    message = expect_input_error(run_script, SCRIPT, fid_run_args(
        images, pooling_vae_dir, tmp_path / "other-extractor", fid_reference=features_file,
        fid_feature_extractor=tmp_path / "other.pt", **{**common, "reference_stats_cache": None}))
    assert "another feature extractor" in message
    assert not list((tmp_path / "other-extractor").glob("checkpoint-*"))


# --------------------------------------------------------------------------------------------
# --keep_best_checkpoint


def make_checkpoint(output_dir, step: int) -> None:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    ckpt.TrainingState(global_step=step).save(folder)


def steps_on_disk(output_dir) -> list[int]:
    return [ckpt.checkpoint_step(path) for path in ckpt.list_checkpoints(output_dir)]


def test_pruning_keeps_the_protected_checkpoint_besides_the_limit(tmp_path):
    for step in (1, 2, 3, 4):
        make_checkpoint(tmp_path, step)
    ckpt.protect_checkpoint(tmp_path, 1, fid=3.5)
    assert ckpt.protected_steps(tmp_path) == {1}
    ckpt.prune_checkpoints(tmp_path, 2)
    assert steps_on_disk(tmp_path) == [1, 3, 4]
    ckpt.prune_checkpoints(tmp_path, 1, protected=())
    assert steps_on_disk(tmp_path) == [4]
    (tmp_path / ckpt.PROTECTED_FILE).write_text("{not json")
    assert ckpt.protected_steps(tmp_path) == set()


@pytest.fixture
def scripted_fid(monkeypatch):
    """FidScorer.score returns the FIDs given, one per validation (the loop's bookkeeping is what is tested)."""

    def script(values: list[float]) -> list[float]:
        remaining = list(values)
        monkeypatch.setattr(FidScorer, "score", lambda self, pipeline, accelerator=None: {"fid": remaining.pop(0),
                                                                                           "kid": 0.0})
        return remaining

    return script


def test_the_best_checkpoint_survives_pruning_and_resume(pooling_vae_dir, train_images, tmp_path, scripted_fid):
    out = tmp_path / "out"
    # Validations at 3, 6, 9 and 12 (the end); checkpoints due at 4, 8 and 12, at most one besides the best.
    common = dict(validation_steps=3, checkpointing_steps=4, checkpoints_total_limit=1, keep_best_checkpoint=True,
                  validation_fid_images=4, train_batch_size=2)
    left = scripted_fid([5.0, 2.0, 3.0, 4.0])
    run_script(SCRIPT, fid_run_args(train_images, pooling_vae_dir, out, max_train_steps=12, **common))
    assert not left
    assert steps_on_disk(out) == [6, 12], "step 6 had the lowest FID: saved although no checkpoint was due, then kept"
    record = json.loads((out / ckpt.PROTECTED_FILE).read_text())
    assert (record["step"], record["fid"], record["checkpoint"]) == (6, 2.0, "checkpoint-6")
    assert "lowest FID" in (out / "README.md").read_text()

    # Resumed, the run knows its best so far from metrics.jsonl: 3.0 at step 15 is no new best.
    left = scripted_fid([3.0])
    run_script(SCRIPT, fid_run_args(train_images, pooling_vae_dir, out, max_train_steps=15,
                                    resume_from_checkpoint="latest", **common))
    assert not left
    assert steps_on_disk(out) == [6, 15]
    assert json.loads((out / ckpt.PROTECTED_FILE).read_text())["step"] == 6

    # A new best at the end replaces the old one, which then counts against the limit like any other.
    scripted_fid([1.0])
    run_script(SCRIPT, fid_run_args(train_images, pooling_vae_dir, out, max_train_steps=18,
                                    resume_from_checkpoint="latest", **common))
    assert steps_on_disk(out) == [6, 18], "18 is kept as the best, 6 as the one other checkpoint the limit allows"
    assert json.loads((out / ckpt.PROTECTED_FILE).read_text())["step"] == 18


def test_fid_options_are_checked_before_anything_is_written(pooling_vae_dir, train_images, tmp_path,
                                                            expect_input_error):
    out = tmp_path / "out"
    assert "--validation_fid_images" in expect_input_error(run_script, SCRIPT, fid_run_args(
        train_images, pooling_vae_dir, out, validation_fid_images=0, keep_best_checkpoint=True, checkpointing_steps=5))
    assert "--checkpointing_steps" in expect_input_error(run_script, SCRIPT, fid_run_args(
        train_images, pooling_vae_dir, out, keep_best_checkpoint=True, checkpointing_steps=0))
    assert "at least 2" in expect_input_error(run_script, SCRIPT, fid_run_args(
        train_images, pooling_vae_dir, out, validation_fid_images=1))
    assert "--fid_reference" in expect_input_error(run_script, SCRIPT, fid_run_args(
        train_images, pooling_vae_dir, out, fid_reference=tmp_path / "nowhere"))
    assert "TorchScript" in expect_input_error(run_script, SCRIPT, fid_run_args(
        train_images, pooling_vae_dir, out, fid_feature_extractor="alexnet"))
    assert not (out / "checkpoint-12").exists() and not (out / "model_index.json").exists()
