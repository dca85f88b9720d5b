"""Bad input gets a clear error or a visible skip; images of every kind become clean RGB;
latent scaling and the batch order behave as documented."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (build_tiny_kl_vae, build_tiny_unet, build_tiny_vq_vae, latent_training_args, make_blob_images,
                      run_script)
from uldm.data import EpochBatchSampler, Preprocessing, image_folder_dataset
from uldm.errors import InputError
from uldm.images import list_image_files, load_rgb_image
from uldm.latents import LatentScaling, RunningMoments, encode_moments, resolve_latent_scaling, sample_from_moments
from uldm.vae import check_unet_matches_latents, load_vae

# --------------------------------------------------------------------------------------------
# Image hygiene


def _gradient(width=40, height=24) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    return np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                     np.full((height, width), 128.0)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "1"])
def test_every_image_mode_becomes_8bit_rgb(tmp_path, mode):
    rgb = Image.fromarray(_gradient())
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode == "I":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.int32) * 257)
        assert image.mode == "I"
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 0
    else:
        image = rgb.convert(mode)
    path = tmp_path / f"image.{'tif' if mode in ('CMYK', 'I;16', 'I') else 'png'}"
    image.save(path)
    loaded = load_rgb_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 24)
    if mode in ("L", "I;16", "I"):
        # 16-bit values are mapped back to the 8-bit range, not clipped to white.
        grey = np.asarray(rgb.convert("L")).astype(int)
        assert np.abs(np.asarray(loaded)[..., 0].astype(int) - grey).max() <= 1


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = np.asarray(load_rgb_image(tmp_path / "a.png"))
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[7, 7]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(_gradient(40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": phones store portrait photos like this
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    loaded = load_rgb_image(tmp_path / "phone.jpg")
    assert loaded.size == (24, 40)


def test_image_files_are_found_recursively_and_hidden_ones_skipped(tmp_path):
    make_blob_images(tmp_path / "a", 2)
    make_blob_images(tmp_path / "a" / "deeper", 2)
    make_blob_images(tmp_path / ".ipynb_checkpoints", 2)
    (tmp_path / "notes.txt").write_text("not an image")
    assert len(list_image_files(tmp_path)) == 4


# --------------------------------------------------------------------------------------------
# Bad data folders


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    preprocessing = Preprocessing(32)
    with pytest.raises(InputError, match="does not exist"):
        image_folder_dataset(tmp_path / "nowhere", preprocessing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="holds no images"):
        image_folder_dataset(tmp_path / "empty", preprocessing)


def test_unreadable_and_truncated_files_are_skipped_and_named(tmp_path, caplog):
    folder = tmp_path / "data"
    make_blob_images(folder, 3, size=40)
    good_bytes = (folder / "img_0000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    with caplog.at_level(logging.WARNING):
        dataset = image_folder_dataset(folder, Preprocessing(32))
    assert len(dataset) == 3
    assert "2 unreadable" in caplog.text and "truncated.png" in caplog.text and "garbage.jpg" in caplog.text
    item = dataset[0]["pixel_values"]
    assert item.shape == (3, 32, 32) and item.min() >= -1 and item.max() <= 1


def test_a_folder_of_only_broken_files_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"broken")
    (tmp_path / "b.png").write_bytes(b"broken too")
    with pytest.raises(InputError, match="None of the 2 image files"):
        image_folder_dataset(tmp_path, Preprocessing(32))


def test_small_images_are_upscaled_with_a_warning(tmp_path, caplog):
    make_blob_images(tmp_path, 2, size=16)
    with caplog.at_level(logging.WARNING):
        dataset = image_folder_dataset(tmp_path, Preprocessing(32))
    assert "2 image(s) are smaller than --resolution 32" in caplog.text
    assert dataset[1]["pixel_values"].shape == (3, 32, 32)


def test_random_crops_depend_only_on_seed_epoch_and_item(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(tmp_path / "w.png")
    dataset = image_folder_dataset(tmp_path, Preprocessing(32, center_crop=False), seed=3)
    first = dataset[0]["pixel_values"]
    assert torch.equal(first, dataset[0]["pixel_values"])
    crops = set()
    for epoch in range(8):
        dataset.epoch = epoch
        crops.add(dataset[0]["pixel_values"].sum().item())
    assert len(crops) > 1, "random crops should move between epochs"


# --------------------------------------------------------------------------------------------
# Batches


def test_batches_are_disjoint_shards_and_reproducible():
    samplers = [EpochBatchSampler(23, 3, num_processes=2, process_index=rank, seed=5) for rank in range(2)]
    assert samplers[0].batches_per_epoch() == 3  # 23 // 6: the incomplete global batch is dropped
    seen = [sum(list(sampler), []) for sampler in samplers]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 18
    # Resuming at batch 2 of epoch 1 gives exactly the tail of that epoch.
    full = EpochBatchSampler(23, 3, 2, 1, seed=5)
    full.set_position(1, 0)
    tail = EpochBatchSampler(23, 3, 2, 1, seed=5)
    tail.set_position(1, 2)
    assert list(tail) == list(full)[2:]
    other_epoch = EpochBatchSampler(23, 3, 2, 1, seed=5)
    other_epoch.set_position(2, 0)
    assert list(other_epoch) != list(full)


def test_a_data_set_smaller_than_a_batch_is_a_clear_error():
    with pytest.raises(InputError, match="Lower --train_batch_size"):
        EpochBatchSampler(3, 2, num_processes=2)


# --------------------------------------------------------------------------------------------
# VAE and latent scale


def test_auto_scale_is_one_for_vq_latents():
    scaling = resolve_latent_scaling("auto", build_tiny_vq_vae(), measure_std=lambda: pytest.fail("no measuring"))
    assert scaling.scale == 1.0 and scaling.shift == 0.0


def test_auto_scale_uses_a_configured_factor(tmp_path):
    build_tiny_kl_vae(scaling_factor=0.5, shift_factor=0.1).save_pretrained(tmp_path)
    scaling = resolve_latent_scaling("auto", load_vae(str(tmp_path)), measure_std=lambda: pytest.fail("no measuring"))
    assert (scaling.scale, scaling.shift) == (0.5, 0.1)


def test_auto_scale_is_measured_when_the_config_sets_none(tmp_path):
    build_tiny_kl_vae().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["scaling_factor"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    vae = load_vae(str(tmp_path))

    make_blob_images(tmp_path / "images", 16)
    dataset = image_folder_dataset(tmp_path / "images", Preprocessing(32))
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    mean, std = encode_moments(vae, pixels)
    moments = RunningMoments()
    moments.add_samples(mean, std)
    scaling = resolve_latent_scaling("auto", vae, measure_std=lambda: RunningMoments.std_from(moments.as_tensor()))
    # Reference: the empirical std of many posterior samples.
    generator = torch.Generator().manual_seed(0)
    samples = torch.cat([sample_from_moments(mean, std, generator) for _ in range(200)])
    assert scaling.scale == pytest.approx(1.0 / samples.std().item(), rel=0.01)
    assert scaling.source.startswith("1/std")


def test_scaling_given_on_the_command_line_and_bad_values():
    vae = build_tiny_kl_vae()
    assert resolve_latent_scaling("0.25", vae).scale == 0.25
    for bad in ("zero", "-1", "nan"):
        with pytest.raises(InputError, match="latent_scaling_factor"):
            resolve_latent_scaling(bad, vae)


def test_encode_scale_unscale_decode_round_trip():
    from pipeline_latent_uncond import UnconditionalLatentPipeline
    from diffusers import DDIMScheduler

    vae, unet = build_tiny_kl_vae(), build_tiny_unet()
    scaling = LatentScaling(0.7, 0.2, "test")
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, _ = encode_moments(vae, pixels)
    latents = scaling.apply(mean)
    assert torch.allclose(scaling.invert(latents), mean, atol=1e-6)
    pipe = UnconditionalLatentPipeline(unet=unet, vae=vae, scheduler=DDIMScheduler(),
                                       latent_scaling_factor=scaling.scale, latent_shift_factor=scaling.shift)
    with torch.no_grad():
        direct = vae.decode(mean).sample
        through_pipeline = pipe.decode_latents(latents)
    assert torch.allclose(((direct + 1) / 2).clamp(0, 1), through_pipeline.float(), atol=1e-5)


def test_missing_vae_says_the_machine_may_be_offline(tmp_path):
    with pytest.raises(InputError, match="offline") as error:
        load_vae("someone/no-such-vae")
    assert "--vae_subfolder" in str(error.value) or "local" in str(error.value)


def test_unet_that_does_not_fit_the_latents_is_refused():
    vae = build_tiny_kl_vae()  # f4, 4 channels: 32 px -> 4x8x8
    check_unet_matches_latents(build_tiny_unet(), vae, 32)
    with pytest.raises(InputError, match="sample_size is 8, but 64 px images give 16x16"):
        check_unet_matches_latents(build_tiny_unet(), vae, 64)
    with pytest.raises(InputError, match="VAE makes 3-channel latents"):
        check_unet_matches_latents(build_tiny_unet(), build_tiny_vq_vae(), 32)


# --------------------------------------------------------------------------------------------
# The script's answers to bad input


# Options of latent_training_args that these runs leave to the script's defaults (None: not passed).
SCRIPT_DEFAULTS = dict(max_train_steps=None, learning_rate=None, lr_warmup_steps=None, num_validation_images=None,
                       validation_inference_steps=None, checkpointing_steps=None)


def _script_args(images, vae_dir, out, **overrides):
    return latent_training_args(images, vae_dir, out, **{**SCRIPT_DEFAULTS, **overrides})


def test_script_exits_with_a_message_on_bad_input(tiny_vae_dir, train_images, tmp_path, expect_input_error):
    cases = [
        (_script_args(tmp_path / "nowhere", tiny_vae_dir, tmp_path / "o1", max_train_steps=1), "does not exist"),
        (_script_args(train_images, tmp_path / "no-vae", tmp_path / "o2", max_train_steps=1), "VAE"),
        (_script_args(train_images, tiny_vae_dir, tmp_path / "o3", max_train_steps=1, resolution=64),
         "does not match the VAE"),
    ]
    for argv, expected in cases:
        message = expect_input_error(run_script, "train_unconditional_latent", argv)
        assert expected in message


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_vae_dir, train_images, tmp_path,
                                                                      expect_input_error):
    out = tmp_path / "out"
    argv = _script_args(train_images, tiny_vae_dir, out, max_train_steps=10, learning_rate="1e30", max_grad_norm=0,
                        lr_scheduler="constant", lr_warmup_steps=0, checkpointing_steps=1)
    message = expect_input_error(run_script, "train_unconditional_latent", argv)
    assert "NaN or infinite at step 2" in message and "checkpoint-1, is intact" in message
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (out / "checkpoint-2").exists() and not (out / "model_index.json").exists()
