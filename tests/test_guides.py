"""Guides without a second training run (uldm.guidance), and guidance wherever a user samples: sample.py, training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from PIL import Image
from safetensors.torch import save_file

from conftest import build_tiny_kl_vae, build_tiny_unet, latent_training_args, run_script
from pipeline_latent_uncond import UnconditionalLatentPipeline
from uldm.diffusion import build_noise_scheduler
from uldm.errors import InputError
from uldm.first_stage import PixelSampler, load_saved_model
from uldm.guidance import ADAPTER_OFF, Guidance, load_guide
from uldm.lora import add_lora_adapter, save_lora_result
from uldm.sampling import sample_file_name
from uldm.training.checkpoints import TrainingState, load_checkpoint_model


def make_pipeline(unet_seed=0, vae=None, scale=0.7, prediction_type="epsilon", **unet_overrides):
    return UnconditionalLatentPipeline(unet=build_tiny_unet(seed=unet_seed, **unet_overrides),
                                       vae=vae if vae is not None else build_tiny_kl_vae(),
                                       scheduler=build_noise_scheduler(prediction_type=prediction_type),
                                       latent_scaling_factor=scale)


def save(pipeline, folder: Path) -> Path:
    pipeline.save_pretrained(folder)
    return folder


def sample(pipe, **options):
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="latent", **options).images


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A main pipeline and a guide pipeline of the same latent space (another UNet), saved."""
    root = tmp_path_factory.mktemp("guides")
    return {"main": save(make_pipeline(0), root / "main"), "guide": save(make_pipeline(1), root / "guide")}


# --------------------------------------------------------------------------------------------
# The three kinds of guide


def test_a_pipeline_folder_guide_loads_and_samples_as_its_unet(folders):
    pipe = load_saved_model(folders["main"])
    guide = load_guide(folders["guide"], pipe, source=folders["main"])
    assert isinstance(guide, UNet2DModel) and same_weights(guide, build_tiny_unet(seed=1))
    torch.testing.assert_close(sample(pipe, guide=guide, guidance_scale=2.0),
                               sample(pipe, guide=build_tiny_unet(seed=1), guidance_scale=2.0))


def write_checkpoint(folder: Path, raw: UNet2DModel, ema: UNet2DModel | None = None, weights: dict | None = None):
    """A checkpoint laid out as CheckpointContents.save writes one (accelerate's files, then the state)."""
    from diffusers.training_utils import EMAModel

    folder.mkdir(parents=True)
    save_file(weights if weights is not None else raw.state_dict(), folder / "model.safetensors")
    torch.save({"base_lrs": [1e-3], "last_epoch": 3}, folder / "custom_checkpoint_0.pkl")  # the LR schedule
    if ema is not None:
        torch.save(EMAModel(ema.parameters()).state_dict(), folder / "custom_checkpoint_1.pkl")
    TrainingState(global_step=3).save(folder)
    return folder


def test_checkpoint_weights_are_the_ema_when_there_is_one_else_the_raw_model(tmp_path):
    raw, ema = build_tiny_unet(seed=2), build_tiny_unet(seed=3)
    for name, averaged, expected, which in (("checkpoint-3", ema, ema, "EMA"), ("checkpoint-4", None, raw, "model")):
        folder = write_checkpoint(tmp_path / name, raw, averaged)
        model = build_tiny_unet(seed=0)
        assert load_checkpoint_model(folder, model) == which
        assert same_weights(model, expected)


def test_a_checkpoint_of_the_run_guides_with_its_ema_weights_by_name_inside_the_run(folders, tmp_path):
    run = save(make_pipeline(0), tmp_path / "run")
    write_checkpoint(run / "checkpoint-3", build_tiny_unet(seed=2), ema=build_tiny_unet(seed=3))
    pipe = load_saved_model(run)
    guide = load_guide("checkpoint-3", pipe, source=run)
    assert same_weights(guide, build_tiny_unet(seed=3))
    torch.testing.assert_close(sample(pipe, guide=guide, guidance_scale=2.0),
                               sample(pipe, guide=build_tiny_unet(seed=3), guidance_scale=2.0))


def test_a_lora_only_checkpoint_and_a_missing_one_are_refused_with_a_clear_message(folders, tmp_path):
    lora = {"down_blocks.0.attentions.0.to_q.lora_A.default.weight": torch.zeros(4, 8)}
    write_checkpoint(tmp_path / "checkpoint-5", build_tiny_unet(), weights=lora)
    pipe = load_saved_model(folders["main"])
    with pytest.raises(InputError, match="LoRA run: it holds only the adapter"):
        load_guide(tmp_path / "checkpoint-5", pipe)
    with pytest.raises(InputError, match="no checkpoint folder checkpoint-9"):
        load_guide("checkpoint-9", pipe, source=tmp_path)


def lora_result(base: Path, folder: Path) -> Path:
    unet = build_tiny_unet(seed=0)
    add_lora_adapter(unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "conv1", "conv2"])
    with torch.no_grad():  # as after training: peft starts B at zero
        for name, parameter in unet.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    save_lora_result(unet, folder, base_model=str(base))
    return folder


def test_base_of_a_lora_result_is_its_unet_with_the_adapter_off_and_one_copy_of_the_weights(folders, tmp_path):
    result = lora_result(folders["main"], tmp_path / "lora")
    pipe = load_saved_model(result)  # unfused: the adapter can be switched off
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    guide = load_guide("base", pipe, source=result)
    assert not isinstance(guide, torch.nn.Module), "no second UNet"
    guided = sample(pipe, guide=guide, guidance_scale=3.0)
    assert sum(p.numel() for p in pipe.unet.parameters()) == parameters
    base = load_saved_model(folders["main"])
    torch.testing.assert_close(guided, sample(pipe, guide=base.unet, guidance_scale=3.0), rtol=1e-5, atol=1e-5)
    fused = load_saved_model(result, fuse_lora=True)
    with pytest.raises(InputError, match="base"):
        load_guide("base", fused, source=result)


def test_base_of_a_full_fine_tune_is_the_model_its_training_args_name(folders, tmp_path):
    result = save(make_pipeline(4), tmp_path / "fine-tune")
    (result / "training_args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(folders["main"])}))
    guide = load_guide("base", load_saved_model(result), source=result)
    assert same_weights(guide, build_tiny_unet(seed=0))
    with pytest.raises(InputError, match="records none"):
        load_guide("base", load_saved_model(folders["guide"]), source=folders["guide"])


def test_a_dreambooth_run_guided_by_base_switches_each_validation_pipelines_adapter_off():
    pipe = make_pipeline(0)
    add_lora_adapter(pipe.unet, rank=4, alpha=4, target_modules=["to_q", "conv1"])
    Guidance(ADAPTER_OFF, 2.0).apply(pipe)
    assert pipe.guide is None and pipe.config.guidance_scale == 2.0
    sample(pipe)  # samples with the adapter switched off and on again at each step


def test_pixel_space_models_take_guides_the_same_way(tmp_path):
    def pixel_pipeline(seed):
        return DDPMPipeline(unet=build_tiny_unet(seed=seed, in_channels=3, out_channels=3, sample_size=8),
                            scheduler=build_noise_scheduler(clip_sample=True))

    pipe = load_saved_model(save(pixel_pipeline(0), tmp_path / "pixel"))
    assert isinstance(pipe, PixelSampler)
    guide = load_guide(save(pixel_pipeline(1), tmp_path / "pixel-guide"), pipe)
    expected = sample(pipe, guide=guide, guidance_scale=2.0)
    pipe.set_guidance(guide, 2.0)
    torch.testing.assert_close(sample(pipe), expected)
    assert not torch.allclose(sample(pipe, guidance_scale=1.0), expected)
    with pytest.raises(InputError, match="first stage is AutoencoderKL, the model's pixel space"):
        load_guide(save(make_pipeline(1), tmp_path / "latent"), pipe)


# --------------------------------------------------------------------------------------------
# Guides that do not fit are refused before sampling


@pytest.mark.parametrize("guide_options, message", [
    ({"scale": 0.5}, "the guide's latent scale is 0.5, the model's 0.7"),
    ({"vae": build_tiny_kl_vae(seed=5)}, "the guide's VAE weights digest is"),
    ({"vae": build_tiny_kl_vae(norm_num_groups=4)}, "the guide's VAE norm_num_groups is 4, the model's 8"),
    ({"prediction_type": "v_prediction"}, "the guide's prediction type is v_prediction, the model's epsilon"),
    ({"sample_size": 16}, r"the guide's latent size \(sample_size\) is \(16, 16\), the model's \(8, 8\)"),
])
def test_a_guide_that_does_not_fit_is_refused_saying_which_number_disagrees(folders, tmp_path, guide_options, message):
    unet_options = {"sample_size": guide_options.pop("sample_size")} if "sample_size" in guide_options else {}
    guide = save(make_pipeline(1, **guide_options, **unet_options), tmp_path / "guide")
    with pytest.raises(InputError, match=message):
        load_guide(guide, load_saved_model(folders["main"]))


# --------------------------------------------------------------------------------------------
# sample.py


SAMPLE_ARGS = ["--num_images", "2", "--num_inference_steps", "3", "--batch_size", "2"]


def sampled(pipeline: Path, output_dir: Path, *extra) -> np.ndarray:
    run_script("sample", [pipeline, "--output_dir", output_dir, *SAMPLE_ARGS, *extra])
    return np.stack([np.asarray(Image.open(output_dir / sample_file_name(i))) for i in range(2)])


def test_sample_py_guides_as_the_pipeline_with_that_guide_and_weight_one_is_unguided(folders, tmp_path):
    guided = sampled(folders["main"], tmp_path / "guided", "--guide", folders["guide"], "--guidance_scale", "2")
    carrying = make_pipeline(0)
    carrying.set_guidance(build_tiny_unet(seed=1), 2.0)
    with_saved_guide = save(carrying, tmp_path / "carrying")
    np.testing.assert_array_equal(sampled(with_saved_guide, tmp_path / "by-default"), guided)
    plain = sampled(folders["main"], tmp_path / "plain")
    assert not np.array_equal(guided, plain)
    np.testing.assert_array_equal(
        sampled(folders["main"], tmp_path / "w1", "--guide", folders["guide"], "--guidance_scale", "1"), plain)
    np.testing.assert_array_equal(sampled(with_saved_guide, tmp_path / "reweighted", "--guidance_scale", "1"), plain)
    args = json.loads((tmp_path / "guided" / "sample_args.json").read_text())
    assert (args["guide"], args["guidance_scale"]) == (str(folders["guide"]), 2.0)


def test_sample_py_refuses_a_guide_that_does_not_fit_before_writing_an_image(folders, tmp_path, expect_input_error):
    guide = save(make_pipeline(1, scale=0.5), tmp_path / "other-scale")
    message = expect_input_error(run_script, "sample", [folders["main"], "--output_dir", tmp_path / "out",
                                                        *SAMPLE_ARGS, "--guide", guide, "--guidance_scale", "2"])
    assert "latent scale is 0.5, the model's 0.7" in message
    assert not list((tmp_path / "out").glob("*.png"))
    assert "--guidance_scale" in expect_input_error(run_script, "sample", [folders["main"], "--output_dir",
                                                                           tmp_path / "o2", *SAMPLE_ARGS, "--guide", guide])


# --------------------------------------------------------------------------------------------
# Training: validation grids (and FID) sample guided


def test_a_training_run_with_a_validation_guide_logs_guided_validation(train_images, tiny_vae_dir, tmp_path, caplog):
    options = dict(max_train_steps=4, validation_steps=4, checkpointing_steps=2, use_ema=True, seed=3)
    first = tmp_path / "first"
    run_script("train_unconditional_latent", latent_training_args(train_images, tiny_vae_dir, first, **options))
    guided = tmp_path / "guided"
    with caplog.at_level(logging.INFO, logger="uldm.guidance"):
        run_script("train_unconditional_latent", latent_training_args(
            train_images, tiny_vae_dir, guided, **options, validation_guide=first / "checkpoint-2",
            validation_guidance_scale=3.0))
    assert "Validation samples guided by" in caplog.text and "EMA weights of" in caplog.text
    grid = "samples/validation_0000004.png"
    guided_grid, plain_grid = (np.asarray(Image.open(run / grid)) for run in (guided, first))
    assert not np.array_equal(guided_grid, plain_grid), "the validation grid is guided"
    same = [torch.equal(a, b) for a, b in zip(UNet2DModel.from_pretrained(first / "unet").state_dict().values(),
                                              UNet2DModel.from_pretrained(guided / "unet").state_dict().values())]
    assert all(same), "guiding the validation does not change training"
