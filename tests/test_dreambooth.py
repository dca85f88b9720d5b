"""train_dreambooth_unconditional.py: it moves samples to the subject, generates only missing class
images, splits and weights the loss per half, saves small LoRA adapters, resumes exactly and refuses
bad input clearly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from conftest import build_tiny_kl_vae, build_tiny_unet, make_blob_images, run_script, to_argv
from uldm.training import read_metrics

SCRIPT = "train_dreambooth_unconditional"
RESOLUTION = 32


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A tiny base pipeline: random UNet, random f4 KL VAE made deterministic (posterior std ~0, else the
    random posterior noise drowns the image in the latents), latents scaled to unit std."""
    from pipeline_latent_uncond import UnconditionalLatentPipeline
    from uldm.diffusion import build_noise_scheduler

    vae = build_tiny_kl_vae()
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0  # the log-variance half of the posterior
        vae.quant_conv.bias[4:] = -30
        std = vae.encode(torch.rand(8, 3, RESOLUTION, RESOLUTION) * 2 - 1).latent_dist.mean.std().item()
    scheduler = build_noise_scheduler()
    pipeline = UnconditionalLatentPipeline(unet=build_tiny_unet(), vae=vae, scheduler=scheduler,
                                           latent_scaling_factor=1.0 / std)
    folder = tmp_path_factory.mktemp("base") / "pipeline"
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory) -> Path:
    """The subject: a large red disc near the centre of a blue background, 5 slightly different photos."""
    folder = tmp_path_factory.mktemp("subject") / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:RESOLUTION, 0:RESOLUTION]
    for index in range(5):
        cy, cx = RESOLUTION / 2 + rng.uniform(-2, 2, size=2)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(8, 10) ** 2
        pixels = np.where(inside[..., None], [230, 30, 30], [20, 40, 200]).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"me_{index}.png")
    return folder


def db_args(base, instance, output_dir, **overrides) -> list[str]:
    options = {
        "pretrained_model_name_or_path": base,
        "instance_data_dir": instance,
        "output_dir": output_dir,
        "train_batch_size": 4,
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "validation_steps": 0,
        "num_validation_images": 4,
        "validation_inference_steps": 3,
        "checkpointing_steps": 0,
        "class_sampling_steps": 2,
        "report_to": "none",
    }
    return to_argv({**options, **overrides})


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def folder_state(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(folder.iterdir())}


@torch.no_grad()
def subject_latent_distance(pipeline, instance_dir: Path, num_samples: int = 8) -> float:
    """Mean over samples from fixed noise of the RMS distance to the nearest instance latent."""
    from uldm.data import Preprocessing, image_folder_dataset
    from uldm.sampling import make_scheduler

    photos = image_folder_dataset(instance_dir, Preprocessing(RESOLUTION, True))
    pixels = torch.stack([photos[i]["pixel_values"] for i in range(len(photos))])
    references = pipeline.encode_images(pixels, sample_posterior=False).flatten(1)
    pipeline.scheduler = make_scheduler("dpmsolver++", pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    noise = torch.randn((num_samples, *pipeline.latent_shape(1)[1:]), generator=torch.Generator().manual_seed(123))
    samples = pipeline(batch_size=num_samples, latents=noise, num_inference_steps=10, output_type="latent").images
    return (torch.cdist(samples.flatten(1), references).min(dim=1).values / references.shape[1] ** 0.5).mean().item()


# ------------------------------------------------------------------------------------------------


def test_fine_tuning_moves_samples_towards_the_subject_and_saves_a_loadable_pipeline(base_dir, instance_dir, tmp_path):
    from uldm.pipeline_loading import load_pipeline

    out = tmp_path / "full"
    run_script(SCRIPT, db_args(base_dir, instance_dir, out, max_train_steps=30, validation_steps=15))

    base = load_pipeline(base_dir)
    tuned = load_pipeline(out)
    assert tuned.latent_scale == pytest.approx(base.latent_scale)
    # the base is an epsilon model (the trainers' default before v_prediction): it is fine-tuned and saved as one
    assert base.scheduler.config.prediction_type == tuned.scheduler.config.prediction_type == "epsilon"
    before, after = subject_latent_distance(base, instance_dir), subject_latent_distance(tuned, instance_dir)
    assert after < 0.8 * before, f"samples did not move towards the subject: {before:.3f} -> {after:.3f}"

    measured = read_metrics(out, having="instance_distance")
    assert [row["step"] for row in measured] == [0, 15, 30], "step 0 (base), every 15 steps, and the end"
    assert measured[-1]["instance_latent_distance"] < measured[0]["instance_latent_distance"]
    for step in (0, 15, 30):
        assert (out / "samples" / f"validation_{step:07d}.png").is_file()
    losses = read_metrics(out, having="loss")
    assert len(losses) == 30 and "instance_loss" in losses[0] and "prior_loss" not in losses[0]
    card = (out / "README.md").read_text()
    assert "Instance images (left)" in card and "card_instances_vs_samples.png" in card
    assert (out / "card_instances_vs_samples.png").is_file()
    metadata = ModelCard.load(out / "README.md").data
    assert metadata.library_name == "diffusers" and "latent-diffusion" in metadata.tags
    assert metadata.base_model is None, "a local base folder is no Hub id, so it stays out of the metadata"
    assert json.loads((out / "training_args.json").read_text())["resolution"] == RESOLUTION


def test_validation_scores_dino_and_clip_i_of_the_samples_and_the_card_shows_them(base_dir, instance_dir, tmp_path):
    from test_subject_similarity import save_tiny_clip, save_tiny_vit

    from uldm.pipeline_loading import load_pipeline
    from uldm.latents import pipeline_scaling
    from uldm.images import list_image_files
    from uldm.sampling import build_pipeline
    from uldm.metrics.subject_similarity import InstanceEmbeddings
    from uldm.validation import fixed_validation_noise
    from uldm.vae import latent_shape

    dino, clip = save_tiny_vit(tmp_path / "dino"), save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "out"
    run_script(SCRIPT, db_args(base_dir, instance_dir, out, validation_steps=2, validation_dino_model=dino,
                               validation_clip_model=clip))
    rows = read_metrics(out, having="dino")
    assert [row["step"] for row in rows] == [0, 2, 4]
    for row in rows:
        assert {"dino", "div_dino", "clip_i", "div_clip_i", "instance_distance"} <= set(row)
        assert -1 <= row["dino"] <= 1 and 0 <= row["div_dino"] <= 2

    # Step 0 scores the base model's samples from the validation noise against the photos.
    base = load_pipeline(base_dir)
    noise = fixed_validation_noise(4, latent_shape(base.vae, RESOLUTION), seed=0, device="cpu")
    sampler = build_pipeline(base.unet, base.vae, pipeline_scaling(base), base.scheduler.config, "dpmsolver++")
    with torch.no_grad():
        latents = sampler(batch_size=4, latents=noise, num_inference_steps=3, output_type="latent").images
        images = sampler.decode_latents(latents).permute(0, 2, 3, 1).float().numpy()
    expected = InstanceEmbeddings.from_photos(list_image_files(instance_dir), {"dino": str(dino), "clip_i": str(clip)})
    scores = expected.score(images)
    for key in ("dino", "div_dino", "clip_i", "div_clip_i"):
        assert rows[0][key] == pytest.approx(scores[key], abs=1e-5), key
    assert rows[-1]["dino"] != rows[0]["dino"], "the fine-tuned model's samples score differently"

    card = (out / "README.md").read_text()
    assert "DINO similarity of the samples to the instance photos (step 0 -> 4)" in card
    assert "CLIP-I similarity" in card and "the photos among themselves" in card


def test_prior_preservation_generates_only_the_missing_class_images_and_logs_both_losses(
        base_dir, instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    make_blob_images(class_dir, 2, size=RESOLUTION, seed=5)  # e.g. real images of the class, kept
    before = folder_state(class_dir)
    out = tmp_path / "prior"
    common = dict(with_prior_preservation=True, class_data_dir=class_dir, num_class_images=5, prior_loss_weight=0.5,
                  snr_gamma=5.0, sample_batch_size=2, num_validation_images=0)
    run_script(SCRIPT, db_args(base_dir, instance_dir, out, **common))

    after = folder_state(class_dir)
    generated = sorted(set(after) - set(before))
    assert generated == [f"generated_{i:06d}.png" for i in range(3)], "exactly the 3 missing images"
    assert all(after[name] == before[name] for name in before), "existing class images are left alone"
    assert all(Image.open(class_dir / name).size == (RESOLUTION, RESOLUTION) for name in generated)

    rows = read_metrics(out)
    assert len(rows) == 4
    for row in rows:
        assert np.isfinite(row["instance_loss"]) and np.isfinite(row["prior_loss"])
        assert row["loss"] == pytest.approx(row["instance_loss"] + 0.5 * row["prior_loss"], rel=1e-5)

    # A full class folder is reused: nothing generated, nothing touched.
    run_script(SCRIPT, db_args(base_dir, instance_dir, tmp_path / "again", **common, max_train_steps=1))
    assert folder_state(class_dir) == after


def test_class_images_cut_short_are_completed_with_the_same_indices():
    from uldm.dreambooth import class_image_indices_to_generate

    existing = [Path("generated_000001.png"), Path("photo.jpg"), Path("generated_000003.png")]
    assert class_image_indices_to_generate(existing, 3) == [0, 2, 4]
    assert class_image_indices_to_generate(existing, 0) == []


def test_min_snr_weights_apply_to_each_half_of_the_batch():
    """diffusers #5791: a B-sized weight on the 2B losses crashed, and the prior half was never weighted."""
    from uldm.diffusion import LossConfig, build_noise_scheduler, min_snr_weights
    from uldm.dreambooth import DreamBoothLoss

    scheduler = build_noise_scheduler()
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([5, 400, 990, 10, 500, 999])
    mse = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    weights = min_snr_weights(scheduler, timesteps, 5.0)
    assert not torch.allclose(weights[3:], torch.ones(3)), "the check needs weights that differ from 1"

    min_snr = LossConfig(snr_gamma=5.0)
    loss, logs = DreamBoothLoss(scheduler, prior_loss_weight=0.5, levers=min_snr)(prediction, target, timesteps, 3)
    assert logs["instance_loss"].item() == pytest.approx((weights[:3] * mse[:3]).mean().item(), rel=1e-6)
    assert logs["prior_loss"].item() == pytest.approx((weights[3:] * mse[3:]).mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(logs["instance_loss"].item() + 0.5 * logs["prior_loss"].item(), rel=1e-6)

    plain, plain_logs = DreamBoothLoss(scheduler, prior_loss_weight=1.0)(prediction, target, timesteps, 3)
    assert plain_logs["prior_loss"].item() == pytest.approx(mse[3:].mean().item(), rel=1e-6)
    alone, alone_logs = DreamBoothLoss(scheduler)(prediction[:3], target[:3], timesteps[:3], 3)
    assert "prior_loss" not in alone_logs and alone.item() == pytest.approx(mse[:3].mean().item(), rel=1e-6)


def test_p2_weights_on_a_zero_snr_schedule_apply_to_each_half_of_the_batch():
    """Any lever's weights combine with prior preservation as Min-SNR's do: per sample, each half by its own
    timesteps (here P2 on v-prediction, whose pure-noise timestep keeps weight 1)."""
    from uldm.diffusion import LossConfig, build_noise_scheduler, loss_weights, p2_weights
    from uldm.dreambooth import DreamBoothLoss

    scheduler = build_noise_scheduler(prediction_type="v_prediction", levers=LossConfig(rescale_betas_zero_snr=True))
    levers = LossConfig(p2_gamma=1.0, p2_k=2.0)
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([5, 400, 999, 10, 500, 990])
    mse = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    weights = loss_weights(scheduler, timesteps, levers)
    torch.testing.assert_close(weights[[0, 1, 3, 4, 5]], p2_weights(scheduler, timesteps, 1.0, 2.0)[[0, 1, 3, 4, 5]])
    assert weights[2] == 1.0 and not torch.allclose(weights[3:], weights[:3])

    loss, logs = DreamBoothLoss(scheduler, prior_loss_weight=0.5, levers=levers)(prediction, target, timesteps, 3)
    assert logs["instance_loss"].item() == pytest.approx((weights[:3] * mse[:3]).mean().item(), rel=1e-6)
    assert logs["prior_loss"].item() == pytest.approx((weights[3:] * mse[3:]).mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(logs["instance_loss"].item() + 0.5 * logs["prior_loss"].item(), rel=1e-6)


@pytest.fixture(scope="session")
def v_prediction_base(base_dir, tmp_path_factory) -> Path:
    """The tiny base with v-prediction, on a noise schedule without zero terminal SNR."""
    import shutil

    folder = tmp_path_factory.mktemp("v_base") / "pipeline"
    shutil.copytree(base_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    return folder


def test_every_loss_lever_reaches_dreambooth(v_prediction_base, instance_dir, tmp_path, monkeypatch):
    """The latent trainer's argument group and loss path: zero terminal SNR (the base's schedule rescaled, then
    saved), P2 weights, logit-normal timesteps with diffusers' sign, offset noise; with prior preservation."""
    import uldm.diffusion
    from pipeline_latent_uncond import UnconditionalLatentPipeline
    from uldm.diffusion import LossConfig

    levers = {"rescale_betas_zero_snr": True, "p2_gamma": 1.0, "p2_k": 2.0, "weighting_scheme": "logit_normal",
              "logit_mean": 1.0, "logit_std": 0.05, "offset_noise": 0.05}
    seen = []
    original_loss_weights = uldm.diffusion.loss_weights

    def recorded_loss_weights(noise_scheduler, timesteps, config):
        seen.append((noise_scheduler, timesteps, config))
        return original_loss_weights(noise_scheduler, timesteps, config)

    monkeypatch.setattr(uldm.diffusion, "loss_weights", recorded_loss_weights)
    class_dir, out = tmp_path / "class", tmp_path / "out"
    make_blob_images(class_dir, 2, size=RESOLUTION, seed=5)
    run_script(SCRIPT, db_args(v_prediction_base, instance_dir, out, with_prior_preservation=True,
                               class_data_dir=class_dir, num_class_images=2, prior_loss_weight=0.5,
                               num_validation_images=2, **levers))

    assert len(seen) == 4 and all(config == LossConfig(**levers) for _, _, config in seen)
    for scheduler, timesteps, _ in seen:
        assert scheduler.alphas_cumprod[-1] == 0 and scheduler.config.prediction_type == "v_prediction"
        assert len(timesteps) == 8 and ((timesteps > 200) & (timesteps < 340)).all(), timesteps  # 1000 x sigmoid(-1)
    for row in read_metrics(out, having="loss"):
        assert row["loss"] == pytest.approx(row["instance_loss"] + 0.5 * row["prior_loss"], rel=1e-5)
    saved = UnconditionalLatentPipeline.from_pretrained(out).scheduler.config
    assert (saved["rescale_betas_zero_snr"], saved["timestep_spacing"], saved["prediction_type"]) == (
        True, "trailing", "v_prediction")
    arguments = json.loads((out / "training_args.json").read_text())
    assert {name: arguments[name] for name in levers} == levers
    card = ModelCard.load(out / "README.md").text
    assert "P2, 1 / (2 + SNR)^1" in card and "logit-normal, mean 1, std 0.05" in card and "zero terminal SNR" in card


def test_schedule_levers_dreambooth_cannot_carry_are_refused(base_dir, v_prediction_base, instance_dir, tmp_path,
                                                             expect_input_error):
    out = tmp_path / "out"
    message = expect_input_error(run_script, SCRIPT, db_args(base_dir, instance_dir, out, rescale_betas_zero_snr=True))
    assert "Use --prediction_type v_prediction" in message and "DreamBooth: a base model trained so" in message
    message = expect_input_error(run_script, SCRIPT, db_args(v_prediction_base, instance_dir, out, use_lora=True,
                                                             rescale_betas_zero_snr=True))
    assert "a LoRA adapter (--use_lora) cannot carry" in message
    assert not out.exists()


def test_lora_resumes_exactly_and_its_small_adapter_reproduces_the_samples(base_dir, instance_dir, tmp_path,
                                                                             sigterm_after_step):
    from uldm.pipeline_loading import load_pipeline
    from uldm.lora import load_pipeline_or_adapter
    from uldm.sampling import make_scheduler
    from uldm.validation import fixed_validation_noise, image_grid

    class_dir = tmp_path / "class"
    make_blob_images(class_dir, 4, size=RESOLUTION, seed=7)
    common = dict(use_lora=True, rank=4, with_prior_preservation=True, class_data_dir=class_dir, num_class_images=4,
                  max_train_steps=4, train_batch_size=2, gradient_accumulation_steps=2, random_flip=True, cache_latents=True,
                  use_ema=True, checkpointing_steps=100, snr_gamma=5.0)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_script(SCRIPT, db_args(base_dir, instance_dir, straight, **common))

    sigterm_after_step(1)  # the loop saves a checkpoint at the end of step 2 and stops
    # Validation samples (only the straight run makes them) must not change the training either.
    run_script(SCRIPT, db_args(base_dir, instance_dir, interrupted, **common, num_validation_images=0))
    assert [p.name for p in interrupted.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (interrupted / "pytorch_lora_weights.safetensors").exists()
    checkpoint_weights = load_file(interrupted / "checkpoint-2" / "model.safetensors")
    assert checkpoint_weights and all(".lora_" in key for key in checkpoint_weights), "checkpoints hold the adapter only"
    run_script(SCRIPT, db_args(base_dir, instance_dir, interrupted, resume_from_checkpoint="latest", **common,
                               num_validation_images=0))

    a, b = read_metrics(straight, having="loss"), read_metrics(interrupted, having="loss")
    assert [row["step"] for row in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        for key in ("loss", "instance_loss", "prior_loss"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-6, abs=1e-7)
    adapter_a = load_file(straight / "pytorch_lora_weights.safetensors")
    adapter_b = load_file(interrupted / "pytorch_lora_weights.safetensors")
    assert adapter_a.keys() == adapter_b.keys()
    assert all(key.startswith("unet.") for key in adapter_a)  # diffusers' LoRA layout
    assert max((adapter_a[k] - adapter_b[k]).abs().max().item() for k in adapter_a) <= 1e-6

    # Small: a fraction of the UNet. And the adapter is not a no-op (LoRA B starts at zero).
    unet_bytes = (base_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (straight / "pytorch_lora_weights.safetensors").stat().st_size < 0.15 * unet_bytes
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in adapter_a.items())

    # Base + adapter, loaded as diffusers users load LoRA, gives the samples of the final validation grid (same
    # noise, sampler and steps); so does the adapter fused into a plain pipeline, and its own metadata finds the base.
    def grid_of(pipeline) -> np.ndarray:
        pipeline.scheduler = make_scheduler("dpmsolver++", pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        noise = fixed_validation_noise(4, pipeline.latent_shape(1)[1:], 0, "cpu")
        images = pipeline(batch_size=4, latents=noise, num_inference_steps=3, output_type="np").images
        return np.asarray(image_grid(images), dtype=np.int16)

    final_grid = np.asarray(Image.open(straight / "samples" / "validation_0000004.png"), dtype=np.int16)
    base_grid = grid_of(load_pipeline(base_dir))
    with_lora = load_pipeline(base_dir)
    with_lora.load_lora_weights(straight)
    assert with_lora.unet.peft_config["default_0"].r == 4  # the rank comes back from the file's metadata
    with_adapter = grid_of(with_lora)
    fused = load_pipeline_or_adapter(straight, fuse_lora=True)
    assert not hasattr(fused.unet, "peft_config")
    merged = grid_of(fused)
    assert np.abs(with_adapter - final_grid).max() <= 1
    assert np.abs(merged - final_grid).max() <= 1
    assert np.abs(base_grid - final_grid).max() > 1, "the adapter changes the samples"


# ------------------------------------------------------------------------------------------------ bad input


def test_empty_instance_folder_and_unusable_base_models_are_refused(base_dir, instance_dir, tmp_path, expect_input_error):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in expect_input_error(run_script, SCRIPT, db_args(base_dir, empty, tmp_path / "o1"))

    message = expect_input_error(run_script, SCRIPT, db_args(tmp_path / "no-such-model", instance_dir, tmp_path / "o2"))
    assert "Could not load the base model" in message

    text_to_image = tmp_path / "sd"
    text_to_image.mkdir()
    (text_to_image / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    message = expect_input_error(run_script, SCRIPT, db_args(text_to_image, instance_dir, tmp_path / "o3"))
    assert "not an unconditional latent diffusion pipeline" in message

    message = expect_input_error(run_script, SCRIPT, db_args(base_dir, instance_dir, tmp_path / "o4", resolution=64))
    assert "--resolution 64 does not match the base model" in message and "32x32" in message


def test_class_images_of_another_size_are_refused_and_kept(base_dir, instance_dir, tmp_path, expect_input_error):
    class_dir = tmp_path / "class"
    make_blob_images(class_dir, 2, size=RESOLUTION)
    Image.new("RGB", (64, 64)).save(class_dir / "generated_000002.png")
    before = folder_state(class_dir)
    message = expect_input_error(run_script, SCRIPT, db_args(base_dir, instance_dir, tmp_path / "out", with_prior_preservation=True,
                                         class_data_dir=class_dir, num_class_images=6))
    assert "not 32x32" in message and "generated_000002.png (64x64)" in message
    assert folder_state(class_dir) == before, "nothing generated, nothing deleted"


# ------------------------------------------------------------------------------------------------ ready script


@pytest.mark.parametrize("variant", ["prior", "no_prior"])
def test_ready_script_aligns_the_photos_and_passes_arguments_the_trainer_accepts(variant, tmp_path):
    import subprocess

    from conftest import REPO_ROOT, make_command_recorder, path_with

    import train_dreambooth_unconditional

    # Stand-ins for python (the alignment step) and accelerate: they record their command lines.
    record = tmp_path / "commands.jsonl"
    fake = make_command_recorder(tmp_path / "bin", record)
    env = {**os.environ, "PATH": path_with(fake.parent), "PYTHON": str(fake), "PHOTOS": "my_photos"}
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "dreambooth_ffhq256.sh"), variant, "--rank", "8"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    align, launch = read_jsonl(record)
    assert align[:2] == ["align_faces.py", "my_photos"] and align[align.index("--output_size") + 1] == "256"
    script = next(i for i, arg in enumerate(launch) if arg.endswith(".py"))
    assert launch[0] == "launch" and launch[script] == "train_dreambooth_unconditional.py"
    args = train_dreambooth_unconditional.parse_args(launch[script + 1:])
    assert args.instance_data_dir == align[align.index("--output_dir") + 1]
    assert args.resolution == 256 and args.rank == 8 and args.with_prior_preservation == (variant == "prior")
    if variant == "prior":
        assert args.prior_loss_weight == 0.5 and args.class_data_dir
