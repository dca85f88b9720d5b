"""train_unconditional_latent.py --vae_name_or_path none: a plain pixel-space DDPM with the same loop, saved as
a diffusers DDPMPipeline that DDPMPipeline.from_pretrained, sample.py and evaluate.py use."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import latent_training_args, run_script
from uldm.training import read_metrics

SCRIPT = "train_unconditional_latent"


def pixel_args(images, output_dir, **overrides):
    return latent_training_args(images, "none", output_dir, **{"model_config_name_or_path": "tiny-pixel", **overrides})


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory, train_images):
    out = tmp_path_factory.mktemp("pixel") / "model"
    run_script(SCRIPT, pixel_args(train_images, out, max_train_steps=30, validation_steps=30, random_flip=True,
                                  lr_scheduler="constant_with_warmup", use_ema=True))
    return out


def test_pixel_training_learns_and_saves_a_ddpm_pipeline(pixel_model):
    from diffusers import DDPMPipeline

    losses = [row["loss"] for row in read_metrics(pixel_model, having="loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    model_index = json.loads((pixel_model / "model_index.json").read_text())
    assert model_index["_class_name"] == "DDPMPipeline"
    assert not (pixel_model / "vae").exists() and not (pixel_model / "pipeline_latent_uncond.py").exists()
    pipeline = DDPMPipeline.from_pretrained(pixel_model)
    assert (pipeline.unet.config.in_channels, pipeline.unet.config.sample_size) == (3, 32)
    images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    # The validation grid holds the samples themselves (nothing decoded): 4 images of 32 px in a 2x2 grid.
    grid = Image.open(pixel_model / "samples" / "validation_0000030.png")
    assert grid.size == (64, 64)
    card = (pixel_model / "README.md").read_text()
    assert "pixel-space" in card and "latent-diffusion" not in card.split("---")[1]


def test_the_pixel_sampler_gives_what_ddpm_pipeline_gives(pixel_model):
    """PixelSampler (validation, sample.py) runs the same denoising loop as diffusers' DDPMPipeline."""
    from diffusers import DDPMPipeline

    from uldm.first_stage import PixelSampler

    pipeline = DDPMPipeline.from_pretrained(pixel_model)
    expected = pipeline(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                        output_type="np").images
    ours = PixelSampler.from_pretrained(pixel_model)(batch_size=2, num_inference_steps=4,
                                                      generator=torch.Generator().manual_seed(1), output_type="np")
    np.testing.assert_allclose(ours.images, expected, atol=1e-5)


def test_the_pixel_sampler_starts_euler_from_the_first_steps_sigma(pixel_model):
    """init_noise_sigma of Euler-type schedulers depends on the timesteps: read before set_timesteps it is the
    1000-step table's, far above the first sampling step's (the order the latent pipeline keeps too)."""
    from diffusers import EulerDiscreteScheduler

    from uldm.first_stage import PixelSampler

    sampler = PixelSampler.from_pretrained(pixel_model)
    sampler.scheduler = EulerDiscreteScheduler.from_config(sampler.scheduler.config, timestep_spacing="leading")
    first_inputs = []
    real_forward = sampler.unet.forward

    def record(sample, t, *args, **kwargs):
        first_inputs.append(sample.clone())
        return real_forward(sample, t, *args, **kwargs)

    sampler.unet.forward = record
    noise = torch.ones(1, *sampler.image_shape(1)[1:])
    sampler(batch_size=1, num_inference_steps=3, latents=noise, output_type="np")
    reference = EulerDiscreteScheduler.from_config(sampler.scheduler.config)
    reference.set_timesteps(3)
    expected = reference.scale_model_input(noise * reference.init_noise_sigma, reference.timesteps[0])
    assert reference.init_noise_sigma < EulerDiscreteScheduler.from_config(sampler.scheduler.config).init_noise_sigma
    torch.testing.assert_close(first_inputs[0], expected)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_sample_and_evaluate_work_with_a_pixel_model(pixel_model, train_images, tmp_path):
    import evaluate
    from uldm.metrics.fid import RandomConvFeatures

    samples = tmp_path / "samples"
    for scheduler in ("dpmsolver++", "euler"):  # euler needs scale_model_input, which DDPMPipeline never calls
        folder = samples / scheduler
        run_script("sample", [pixel_model, "--num_images", 3, "--output_dir", folder, "--num_inference_steps", 3,
                              "--batch_size", 2, "--scheduler", scheduler, "--seed", 5])
        images = [np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(3)]
        assert all(image.shape == (32, 32, 3) for image in images)
        assert images[0].std() > 0
    # Image i comes from seed + i whatever the batch: the second image alone is the same.
    run_script("sample", [pixel_model, "--num_images", 2, "--output_dir", tmp_path / "again", "--num_inference_steps",
                          3, "--batch_size", 1, "--scheduler", "dpmsolver++", "--seed", 5])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "000001.png")),
                          np.asarray(Image.open(samples / "dpmsolver++" / "000001.png")))
    results = evaluate.main(["--samples_dir", str(samples / "dpmsolver++"), "--reference_dir", str(train_images),
                             "--kid_subset_size", "3", "--kid_subsets", "2", "--device", "cpu"],
                            feature_extractor=RandomConvFeatures())
    assert results["fid_kid"]["num_samples"] == 3 and results["fid_kid"]["fid"] > 0


def test_a_latent_preset_is_refused_with_a_pixel_preset_named(train_images, tmp_path, expect_input_error):
    stderr = expect_input_error(run_script, SCRIPT, pixel_args(train_images, tmp_path / "out",
                                                               model_config_name_or_path="tiny"))
    assert "pixel space" in stderr and "tiny-pixel" in stderr and "4 x 8 x 8" in stderr


@pytest.mark.parametrize("option", [{"cache_latents": True}, {"latent_scaling_factor": 0.5}])
def test_first_stage_options_are_refused_without_a_first_stage(option, train_images, tmp_path, expect_input_error):
    stderr = expect_input_error(run_script, SCRIPT, pixel_args(train_images, tmp_path / "out", **option))
    assert "--vae_name_or_path none" in stderr
    assert not (tmp_path / "out").exists()
