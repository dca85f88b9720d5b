"""train_unconditional_latent.py: it learns, caches, scales, saves a loadable pipeline and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from uldm.presets import read_json_preset
from uldm.training import read_metrics

from conftest import REPO_ROOT, latent_training_args, run_script, subprocess_env, venv_bin

SCRIPT = "train_unconditional_latent"


def test_training_learns(train_images, tiny_vae_dir, tmp_path):
    out = tmp_path / "out"
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=30, cache_latents=True,
                                 lr_scheduler="constant_with_warmup", prediction_type="epsilon"))
    losses = [row["loss"] for row in read_metrics(out)]
    assert len(losses) == 30
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.6 * start, f"loss did not fall enough: {start:.3f} -> {end:.3f}"
    assert (out / "loss_curve.png").is_file()
    card = ModelCard.load(out / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("diffusers", "unconditional-image-generation")
    assert card.data.tags == ["latent-diffusion", "unconditional-image-generation"]


def test_v_prediction_is_the_default_and_a_saved_epsilon_model_stays_epsilon(train_images, tiny_vae_dir, tmp_path):
    """diffusers' default is epsilon; ours is v_prediction, unless a saved model says otherwise (an older
    epsilon model continues as one) or the flag is given."""
    import train_unconditional_latent as trainer
    from conftest import build_tiny_kl_vae, build_tiny_unet
    from pipeline_latent_uncond import UnconditionalLatentPipeline
    from uldm.diffusion import build_noise_scheduler

    fresh = latent_training_args(train_images, tiny_vae_dir, tmp_path / "fresh")
    assert trainer.parse_args(fresh).prediction_type == "v_prediction"
    assert trainer.parse_args(fresh + ["--prediction_type", "epsilon"]).prediction_type == "epsilon"

    epsilon_model = tmp_path / "epsilon_model"
    UnconditionalLatentPipeline(unet=build_tiny_unet(), vae=build_tiny_kl_vae(), latent_scaling_factor=1.0,
                                scheduler=build_noise_scheduler(prediction_type="epsilon")).save_pretrained(epsilon_model)
    continued = latent_training_args(train_images, tiny_vae_dir, tmp_path / "continued",
                                     model_config_name_or_path=None, pretrained_model_name_or_path=epsilon_model)
    assert trainer.parse_args(continued).prediction_type == "epsilon"
    assert trainer.parse_args(continued + ["--prediction_type", "sample"]).prediction_type == "sample"

    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, tmp_path / "fresh", max_train_steps=2))
    saved_scheduler = json.loads((tmp_path / "fresh" / "scheduler" / "scheduler_config.json").read_text())
    assert saved_scheduler["prediction_type"] == "v_prediction"
    assert "prediction type" in (card := (tmp_path / "fresh" / "README.md").read_text()) and "v_prediction" in card


def test_cached_latents_never_call_the_encoder_after_the_first_pass(train_images, tiny_vae_dir, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    calls = []
    original = AutoencoderKL.encode

    def counting_encode(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    cache = tmp_path / "cache"
    # 24 images, batch 4: 6 steps per epoch; 18 steps = 3 epochs. Encoding: 24/8 batches x 2 (flips).
    common = dict(cache_latents=True, random_flip=True, latent_cache_dir=cache, encode_batch_size=8, max_train_steps=18)
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, tmp_path / "a", **common))
    assert len(calls) == 3 * 2
    assert len(list(cache.iterdir())) == 1

    calls.clear()
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, tmp_path / "b", **common))
    assert calls == [], "a complete cache for the same settings must be reused"

    # Another resolution (with a matching UNet) or another VAE must not reuse the cache.
    unet16 = tmp_path / "unet16.json"
    config = read_json_preset("tiny", "unet")
    unet16.write_text(json.dumps({**config, "sample_size": 4}))
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, tmp_path / "c", resolution=16,
                                 model_config_name_or_path=unet16, **{**common, "max_train_steps": 1}))
    assert len(calls) == 3 * 2 and len(list(cache.iterdir())) == 2

    from conftest import build_tiny_kl_vae

    other_vae = tmp_path / "other-vae"
    build_tiny_kl_vae(seed=1).save_pretrained(other_vae)
    calls.clear()
    run_script(SCRIPT, latent_training_args(train_images, other_vae, tmp_path / "d", **{**common, "max_train_steps": 1}))
    assert len(calls) == 3 * 2 and len(list(cache.iterdir())) == 3


def test_accelerate_launch_checkpoints_resumes_and_saves_a_loadable_pipeline(train_images, tiny_vae_dir, tmp_path):
    out = tmp_path / "run"
    launch = [venv_bin("accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / f"{SCRIPT}.py")]
    first = latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=6, checkpointing_steps=3,
                      checkpoints_total_limit=1, use_ema=True, lr_scheduler="constant")
    result = subprocess.run(launch + first, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"], "limit 1 keeps only the newest"

    second = latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=9, checkpointing_steps=3,
                       use_ema=True, lr_scheduler="constant", resume_from_checkpoint="latest",
                       validation_steps=100)
    result = subprocess.run(launch + second, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stderr and "checkpoint-6" in result.stderr
    assert [row["step"] for row in read_metrics(out)] == list(range(1, 10))
    for name in ("model_index.json", "pipeline_latent_uncond.py", "README.md", "training_args.json",
                 "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "samples").glob("validation_*.png"))

    # Load from a copy outside the repository, in a fresh interpreter that cannot import the repo.
    import shutil

    elsewhere = tmp_path / "elsewhere" / "model"
    shutil.copytree(out, elsewhere, ignore=shutil.ignore_patterns("checkpoint-*", "latent_cache", "logs"))
    code = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if p not in ('', {str(REPO_ROOT)!r})]
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(elsewhere)!r}, trust_remote_code=True)
        images = pipe(batch_size=2, num_inference_steps=3).images
        print(type(pipe).__name__, len(images), images[0].size)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["UnconditionalLatentPipeline", "2", "(32,", "32)"]


def test_exact_resume_after_sigterm_mid_epoch_with_accumulation(train_images, tiny_vae_dir, tmp_path,
                                                                sigterm_after_step):
    """Straight 2N steps == N steps, SIGTERM, resume N more: same weights, EMA, post-hoc EMA profiles, learning
    rates, losses."""
    # 24 images, batch 4: 6 batches per epoch; with accumulation 4, steps straddle epochs.
    common = dict(max_train_steps=5, gradient_accumulation_steps=4, use_ema=True, random_flip=True,
                  cache_latents=True, checkpointing_steps=100, lr_scheduler="cosine", lr_warmup_steps=3,
                  snr_gamma=5.0, use_posthoc_ema=True, ema_snapshot_steps=1)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, straight, **common))

    sigterm_after_step(1)  # a real signal: the loop stops at the next step boundary
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, interrupted, **common))
    assert [p.name for p in interrupted.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (interrupted / "model_index.json").exists(), "a stopped run must not save a final pipeline"
    state = json.loads((interrupted / "checkpoint-2" / "training_state.json").read_text())
    assert state["micro_batches"] == 8  # 2 batches into the second epoch

    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, interrupted, resume_from_checkpoint="latest", **common))

    a, b = read_metrics(straight), read_metrics(interrupted)
    assert [row["step"] for row in b] == list(range(1, 6))
    for row_a, row_b in zip(a, b):
        assert row_a["lr"] == pytest.approx(row_b["lr"], rel=1e-12, abs=1e-15)
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-6, abs=1e-7)
    live_a = load_file(straight / "checkpoint-5" / "model.safetensors")
    live_b = load_file(interrupted / "checkpoint-5" / "model.safetensors")
    ema_a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    ema_b = load_file(interrupted / "unet" / "diffusion_pytorch_model.safetensors")
    for weights_a, weights_b in ((live_a, live_b), (ema_a, ema_b)):
        assert weights_a.keys() == weights_b.keys()
        worst = max((weights_a[k].float() - weights_b[k].float()).abs().max().item() for k in weights_a)
        assert worst <= 1e-6, f"weights differ by {worst}"
    # The EMA really differs from the live weights (so the comparison above covers both).
    key = next(k for k in ema_a if k.endswith("conv_in.weight"))
    assert not torch.equal(ema_a[key], live_a[key])
    # Post-hoc EMA: a snapshot of both profiles after every step, the same in both runs.
    names = sorted(path.name for path in (straight / "ema_snapshots").glob("*.safetensors"))
    assert len(names) == 10 and names == sorted(path.name for path in (interrupted / "ema_snapshots").glob("*.safetensors"))
    for name in names:
        snapshot_a = load_file(straight / "ema_snapshots" / name)
        snapshot_b = load_file(interrupted / "ema_snapshots" / name)
        assert max((snapshot_a[k] - snapshot_b[k]).abs().max().item() for k in snapshot_a) <= 1e-6, name
