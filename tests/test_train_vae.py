"""train_vae.py: it learns, stores a measured scaling_factor that the latent trainer picks up, resumes
exactly, fine-tunes, and refuses bad input with a clear message."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from uldm.training import read_metrics

from conftest import run_script, to_argv

SCRIPT = "train_vae"


def vae_args(images, output_dir, **overrides) -> list[str]:
    options = {
        "train_data_dir": images,
        "model_config_name_or_path": "tiny-kl-f4",
        "resolution": 32,
        "num_holdout_images": 8,
        "num_validation_images": 4,
        "train_batch_size": 8,
        "max_train_steps": 8,
        "learning_rate": 2e-3,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "validation_steps": 0,
        "checkpointing_steps": 0,
        "scale_estimation_images": 32,
        "report_to": "none",
        "output_dir": output_dir,
    }
    return to_argv({**options, **overrides})


def held_out(output_dir) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(output_dir) if "val_psnr" in row}


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from uldm.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"), num_images=48, num_subject_images=2).faces_dir


@pytest.fixture(scope="module")
def trained_vae(faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "out"
    run_script(SCRIPT, vae_args(faces, out, max_train_steps=50, validation_steps=25, use_ema=True,
                                ema_max_decay=0.9, random_flip=True))
    return out


def test_vae_learns_on_held_out_images(trained_vae):
    rows = held_out(trained_vae)
    assert sorted(rows) == [0, 25, 50], "held-out metrics before training, every --validation_steps and at the end"
    before, after = rows[0], rows[50]
    assert after["val_rec_loss"] < 0.5 * before["val_rec_loss"], (before, after)
    assert after["val_psnr"] > before["val_psnr"] + 4.0
    losses = [row["loss"] for row in read_metrics(trained_vae) if "loss" in row]
    assert len(losses) == 50 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    for name in ("loss_curve.png", "reconstructions.png", "README.md", "training_args.json",
                 "samples/reconstruction_0000000.png", "samples/reconstruction_0000050.png"):
        assert (trained_vae / name).is_file(), name
    from PIL import Image

    with Image.open(trained_vae / "reconstructions.png") as grid:
        assert grid.size == (2 * 64, 2 * 32), "4 held-out images, each beside its reconstruction"


def test_saved_vae_loads_and_carries_the_measured_scale(trained_vae, faces):
    from diffusers import AutoencoderKL

    from uldm.data import Preprocessing, image_folder_dataset
    from uldm.latents import RunningMoments, encode_moments

    vae = AutoencoderKL.from_pretrained(trained_vae)
    assert "scaling_factor" not in (vae.config.get("_use_default_values") or [])
    logged = read_metrics(trained_vae)[-1]
    assert vae.config.scaling_factor == pytest.approx(logged["scaling_factor"], rel=1e-6)
    assert vae.config.scaling_factor == pytest.approx(1 / logged["latent_std"], rel=1e-6)
    assert vae.config.scaling_factor != pytest.approx(0.18215)

    # Independently: the scaled latents of the images have about unit std.
    images = image_folder_dataset(faces, Preprocessing(32, True))
    moments = RunningMoments()
    pixels = torch.stack([images[i]["pixel_values"] for i in range(len(images))])
    mean, std = encode_moments(vae, pixels)
    moments.add_samples(mean, std)
    scaled_std = RunningMoments.std_from(moments.as_tensor()) * vae.config.scaling_factor
    assert scaled_std == pytest.approx(1.0, abs=0.1)

    card = (trained_vae / "README.md").read_text()
    assert "AutoencoderKL.from_pretrained" in card and "held-out PSNR" in card
    assert ModelCard.load(trained_vae / "README.md").data.library_name == "diffusers"


def test_latent_trainer_takes_the_stored_scale(trained_vae, faces, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "ldm"
    run_script("train_unconditional_latent", [
        "--train_data_dir", faces, "--vae_name_or_path", trained_vae, "--latent_scaling_factor", "auto",
        "--model_config_name_or_path", "tiny", "--resolution", 32, "--train_batch_size", 8, "--max_train_steps", 2,
        "--cache_latents", "--validation_steps", 0, "--num_validation_images", 2, "--validation_inference_steps", 2,
        "--checkpointing_steps", 0, "--report_to", "none", "--output_dir", out,
    ])
    stored = AutoencoderKL.load_config(trained_vae)["scaling_factor"]
    model_index = json.loads((out / "model_index.json").read_text())
    assert model_index["latent_scaling_factor"] == pytest.approx(stored, rel=1e-9)


def test_resume_is_exact(faces, tmp_path):
    """6 steps straight == 3 steps, then resume to 6: same losses, same weights (posterior noise included)."""
    common = dict(checkpointing_steps=3, train_batch_size=4, random_flip=True, use_ema=True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(SCRIPT, vae_args(faces, straight, max_train_steps=6, **common))
    run_script(SCRIPT, vae_args(faces, resumed, max_train_steps=3, **common))
    run_script(SCRIPT, vae_args(faces, resumed, max_train_steps=6, resume_from_checkpoint="latest", **common))
    a = [row for row in read_metrics(straight) if "loss" in row]
    b = [row for row in read_metrics(resumed) if "loss" in row]
    assert [row["step"] for row in b] == list(range(1, 7))
    for row_a, row_b in zip(a, b):
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-6, abs=1e-7)
    weights_a = load_file(straight / "diffusion_pytorch_model.safetensors")
    weights_b = load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) <= 1e-6


def test_fine_tuning_keeps_or_measures_the_scale(tiny_vae_dir, faces, tmp_path):
    from diffusers import AutoencoderKL

    pretrained = AutoencoderKL.load_config(tiny_vae_dir)["scaling_factor"]
    kept, measured = tmp_path / "kept", tmp_path / "measured"
    for out, extra in ((kept, {"keep_scaling_factor": True}), (measured, {})):
        run_script(SCRIPT, vae_args(faces, out, model_config_name_or_path=None,
                                    pretrained_vae_name_or_path=tiny_vae_dir, max_train_steps=2, **extra))
    assert AutoencoderKL.load_config(kept)["scaling_factor"] == pretrained
    assert AutoencoderKL.load_config(measured)["scaling_factor"] == pytest.approx(
        1 / read_metrics(measured)[-1]["latent_std"], rel=1e-6)
    tuned = load_file(kept / "diffusion_pytorch_model.safetensors")
    original = load_file(Path(tiny_vae_dir) / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(tuned[k], original[k]) for k in original), "the weights were trained"


def test_perceptual_loss_with_local_vgg_weights(faces, tmp_path):
    import torchvision

    weights = tmp_path / "vgg16.pth"
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()}, weights)
    out = tmp_path / "perceptual"
    run_script(SCRIPT, vae_args(faces, out, max_train_steps=2, perceptual_weight=1.0,
                                perceptual_weights_path=weights))
    rows = [row for row in read_metrics(out) if "loss" in row]
    assert all(row["perceptual_loss"] > 0 for row in rows)
    assert all(row["loss"] > row["rec_loss"] for row in rows)


def test_perceptual_loss_without_weights_says_what_to_do(faces, tmp_path, monkeypatch, expect_input_error):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    message = expect_input_error(run_script, SCRIPT, vae_args(faces, tmp_path / "out", perceptual_weight=1.0))
    assert "--perceptual_weights_path" in message and "vgg16-397923af.pth" in message

    not_vgg = tmp_path / "not_vgg.pth"
    torch.save({"something.else": torch.zeros(1)}, not_vgg)
    message = expect_input_error(run_script, SCRIPT, vae_args(faces, tmp_path / "out", max_train_steps=1,
                                                              perceptual_weight=1.0, perceptual_weights_path=not_vgg))
    assert "does not hold VGG16 weights" in message


@pytest.mark.parametrize("extra, expected", [
    ({"pretrained_vae_name_or_path": "VAE"}, "not both"),
    ({"model_config_name_or_path": "no-such-preset"}, "neither a preset"),
    ({"num_holdout_images": 48}, "leaves no training images"),
    ({"pretrained_vae_name_or_path": "VQ", "model_config_name_or_path": None}, "AutoencoderKL models only"),
])
def test_bad_input_gets_a_clear_message(faces, tiny_vae_dir, tmp_path, expect_input_error, extra, expected):
    from conftest import build_tiny_vq_vae

    vq = tmp_path / "vq"
    build_tiny_vq_vae().save_pretrained(vq)
    extra = {key: {"VAE": tiny_vae_dir, "VQ": vq}.get(value, value) for key, value in extra.items()}
    message = expect_input_error(run_script, SCRIPT, vae_args(faces, tmp_path / "out", **extra))
    assert expected in message


def test_the_scale_is_measured_on_centre_crops_even_when_training_uses_random_crops(tmp_path):
    from PIL import Image

    from uldm.autoencoder import centre_cropped_view, split_holdout
    from uldm.data import ImageFolderDataset, Preprocessing

    paths = []
    for index in range(6):  # wide images: a random crop and the centre crop differ
        path = tmp_path / f"{index}.png"
        Image.effect_noise((64, 32), 60 + 10 * index).convert("RGB").save(path)
        paths.append(path)
    images = ImageFolderDataset(paths, tmp_path, Preprocessing(32, center_crop=False), seed=0)
    train_set, _ = split_holdout(images, 2, seed=0)
    centred = centre_cropped_view(train_set)
    reference = ImageFolderDataset(paths, tmp_path, Preprocessing(32, center_crop=True))
    assert len(centred) == len(train_set) == 4
    for position, index in enumerate(train_set.indices):
        assert torch.equal(centred[position]["pixel_values"], reference[index]["pixel_values"])
    assert not all(torch.equal(train_set[i]["pixel_values"], centred[i]["pixel_values"]) for i in range(4))


def test_a_full_disk_at_a_validation_grid_warns_and_the_run_still_saves_its_model(faces, tmp_path, monkeypatch,
                                                                                 caplog):
    import errno
    import os

    from PIL import Image

    real_save = Image.Image.save

    def no_space_for_grids(image, path, *args, **kwargs):
        if "samples" in Path(path).parts:
            Path(path).write_bytes(b"\x89PNG")  # a few bytes get out before the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", no_space_for_grids)
    out = tmp_path / "vae"
    with caplog.at_level(logging.WARNING):
        run_script(SCRIPT, vae_args(faces, out, max_train_steps=4, validation_steps=2))
    warnings = [r.getMessage() for r in caplog.records if "Could not write the reconstruction grid" in r.getMessage()]
    assert warnings and "the disk is full" in warnings[0] and "Training goes on without it" in warnings[0]
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and (out / "README.md").is_file()
    assert not list((out / "samples").iterdir()), "no partial grid or temporary file is left"
    assert sorted(held_out(out)) == [0, 2, 4], "the held-out metrics are still logged"
