"""Two-model guidance in the pipeline: `g + w * (m - g)` at every step, for every scheduler and prediction type."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DModel

from conftest import build_tiny_kl_vae, build_tiny_unet
from pipeline_latent_uncond import UnconditionalLatentPipeline, guided_model, noise_level
from uldm.diffusion import build_noise_scheduler

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


class Counting(torch.nn.Module):
    """A UNet that counts its forward passes."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, 0

    def forward(self, sample, t):
        self.calls += 1
        return self.unet(sample, t)


def write_out_guidance(pipe, guide, weight):
    """The guided model written out as the pipeline's UNet: what the pipeline must compute at every step."""
    model = build_tiny_unet(seed=0)  # the same weights as pipe.unet, called separately

    def forward(sample, t, *args, **kwargs):
        guide_output = guide(sample, t).sample
        return type(model(sample, t))(sample=guide_output + weight * (model(sample, t).sample - guide_output))

    pipe.unet.forward = forward
    return pipe


def make_pipeline(scheduler_class=DDIMScheduler, prediction_type="epsilon", guide=None, **config):
    scheduler = scheduler_class.from_config(build_noise_scheduler(prediction_type=prediction_type).config)
    pipe = UnconditionalLatentPipeline(unet=build_tiny_unet(seed=0), vae=build_tiny_kl_vae(), scheduler=scheduler,
                                       latent_scaling_factor=1.0, guide=guide, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **options):
    return pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                output_type="latent", **options).images


def test_weight_one_is_the_unguided_result_bit_for_bit_and_never_runs_the_guide():
    pipe = make_pipeline()
    guide = Counting(build_tiny_unet(seed=1))
    unguided = sample(pipe)
    assert torch.equal(sample(pipe, guide=guide, guidance_scale=1.0), unguided)
    assert guide.calls == 0
    sample(pipe, guide=guide, guidance_scale=2.0)
    assert guide.calls == 4, "one guide forward a step when guiding"


def test_weight_zero_is_the_guide_alone():
    guide_unet = build_tiny_unet(seed=1)
    pipe = make_pipeline()
    alone = UnconditionalLatentPipeline(unet=guide_unet, vae=pipe.vae, scheduler=pipe.scheduler, latent_scaling_factor=1.0)
    alone.set_progress_bar_config(disable=True)
    assert torch.equal(sample(pipe, guide=guide_unet, guidance_scale=0.0), sample(alone))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_guided_sampling_follows_the_linear_rule_for_each_prediction_type_and_scheduler(prediction_type, scheduler_class):
    guide_unet = build_tiny_unet(seed=1)
    pipe = make_pipeline(scheduler_class, prediction_type)
    guided = sample(pipe, guide=guide_unet, guidance_scale=2.5)
    mixed = write_out_guidance(make_pipeline(scheduler_class, prediction_type), guide_unet, 2.5)
    torch.testing.assert_close(guided, sample(mixed), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, sample(pipe), atol=1e-3), "the guide changed the samples"


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_noise_v_and_sample_predictions_combine_into_the_same_clean_image_estimate(prediction_type):
    """At a fixed x_t and t each prediction type is an affine map of the clean-image estimate, so combining the
    outputs by g + w(m - g) combines the denoised estimates by the same rule: guidance means one thing for all."""
    scheduler = DDIMScheduler.from_config(build_noise_scheduler(prediction_type=prediction_type).config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    generator = torch.Generator().manual_seed(0)
    x_t, model_out, guide_out = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    weight = 2.0

    def clean_estimate(output):
        return scheduler.step(output, t, x_t).pred_original_sample

    combined = clean_estimate(guide_out + weight * (model_out - guide_out))
    expected = clean_estimate(guide_out) + weight * (clean_estimate(model_out) - clean_estimate(guide_out))
    torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-5)


def test_the_guidance_interval_guides_only_the_steps_whose_noise_level_lies_inside():
    pipe = make_pipeline()
    pipe.scheduler.set_timesteps(4)
    levels = [noise_level(pipe.scheduler, t) for t in pipe.scheduler.timesteps]
    assert levels == sorted(levels, reverse=True)
    low, high = (levels[2] + levels[3]) / 2, (levels[0] + levels[1]) / 2  # steps 1 and 2 only
    guide = Counting(build_tiny_unet(seed=1))
    interval = sample(pipe, guide=guide, guidance_scale=2.0, guidance_interval=(low, high))
    assert guide.calls == 2
    everywhere = sample(pipe, guide=guide, guidance_scale=2.0)
    assert not torch.allclose(interval, everywhere) and not torch.allclose(interval, sample(pipe))
    step = guided_model(pipe.unet, guide, 2.0, (low, high), pipe.scheduler)
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(step(x, pipe.scheduler.timesteps[0]), pipe.unet(x, pipe.scheduler.timesteps[0]).sample)


@pytest.mark.parametrize("change, number", [({"in_channels": 3, "out_channels": 3}, "in_channels 3"),
                                            ({"sample_size": 16}, "sample_size 16")])
def test_a_guide_of_another_latent_shape_is_refused_before_sampling(change, number):
    guide = build_tiny_unet(seed=1, **change)
    pipe = make_pipeline()
    with pytest.raises(ValueError, match=number):
        sample(pipe, guide=guide, guidance_scale=2.0)
    with pytest.raises(ValueError, match=number):
        make_pipeline(guide=guide)


def test_a_lora_result_is_guided_by_its_base_with_one_copy_of_the_weights():
    from uldm.lora import add_lora_adapter

    pipe = make_pipeline()
    base_unet = UNet2DModel.from_config(pipe.unet.config)
    base_unet.load_state_dict(pipe.unet.state_dict())
    add_lora_adapter(pipe.unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "conv1", "conv2"])
    with torch.no_grad():  # as after training: peft starts B at zero
        for name, parameter in pipe.unet.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    parameters = sum(p.numel() for p in pipe.components["unet"].parameters())
    with_base_copy = sample(pipe, guide=base_unet, guidance_scale=3.0)
    guide = pipe.lora_base_guide()
    with_switched_off_adapter = sample(pipe, guide=guide, guidance_scale=3.0)
    torch.testing.assert_close(with_switched_off_adapter, with_base_copy, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in pipe.components["unet"].parameters()) == parameters
    assert not torch.allclose(sample(pipe), with_base_copy, atol=1e-4), "the adapter is on again after guiding"
    torch.testing.assert_close(sample(pipe), sample(pipe, guide=guide, guidance_scale=1.0))


CLEAN_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from diffusers import DiffusionPipeline
    folder, out = sys.argv[1:3]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    np.save(out, latents.numpy())
    print("guide", type(pipe.guide).__name__, pipe.config.guidance_scale)
    """
)


def test_a_saved_guide_and_weight_round_trip_and_sample_guided_in_a_clean_process(tmp_path):
    guide_unet = build_tiny_unet(seed=1)
    pipe = make_pipeline(guide=guide_unet, guidance_scale=2.0, guidance_interval_low=0.1, guidance_interval_high=50.0)
    expected = sample(pipe)
    assert not torch.equal(expected, sample(pipe, guidance_scale=1.0))
    folder = tmp_path / "guided"
    pipe.save_pretrained(folder)
    assert (folder / "guide" / "config.json").is_file()

    loaded = UnconditionalLatentPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert (loaded.config.guidance_scale, loaded.config.guidance_interval_low, loaded.config.guidance_interval_high) == (
        2.0, 0.1, 50.0)
    torch.testing.assert_close(sample(loaded), expected, rtol=1e-4, atol=1e-4)  # same weights, other memory

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf-home"),
               HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    out = tmp_path / "latents.npy"
    result = subprocess.run([sys.executable, "-c", CLEAN_PROCESS_SCRIPT, str(folder), str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "guide UNet2DModel 2.0" in result.stdout
    np.testing.assert_allclose(np.load(out), expected.numpy(), atol=1e-4)  # other thread count


def test_a_pipeline_without_a_guide_saves_and_loads_as_before(tmp_path):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path / "plain")
    loaded = UnconditionalLatentPipeline.from_pretrained(tmp_path / "plain")
    assert loaded.guide is None and loaded.config.guidance_scale == 1.0
    assert not (tmp_path / "plain" / "guide").exists()


def test_set_guidance_makes_guided_sampling_the_default_and_none_switches_it_off():
    pipe = make_pipeline()
    guide = build_tiny_unet(seed=1)
    explicit = sample(pipe, guide=guide, guidance_scale=2.0, guidance_interval=(0.5, 100.0))
    pipe.set_guidance(guide, 2.0, (0.5, 100.0))
    assert pipe.guide is guide and pipe.config.guidance_scale == 2.0
    torch.testing.assert_close(sample(pipe), explicit)
    pipe.set_guidance(lambda x, t: guide(x, t).sample, 2.0, (0.5, 100.0))  # a callable: not a component
    assert pipe.guide is None
    torch.testing.assert_close(sample(pipe), explicit)
    pipe.set_guidance(None)
    assert pipe.config.guidance_scale == 1.0 and pipe.guide is None
    torch.testing.assert_close(sample(pipe), sample(make_pipeline()))
