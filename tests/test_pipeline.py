"""UnconditionalLatentPipeline: sampling, determinism, latent scaling, saving and both loading paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
    VQModel,
)

from conftest import REPO_ROOT, build_tiny_kl_vae, build_tiny_unet, build_tiny_vq_vae
from pipeline_latent_uncond import UnconditionalLatentPipeline
from uldm.pipeline_loading import load_pipeline

STEPS = 2
SCHEDULERS = [
    DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler,
]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build_tiny_vq_unet(seed: int = 0) -> UNet2DModel:
    """The tiny UNet preset, on the 3-channel latents of the tiny VQ-f4 model."""
    return build_tiny_unet(seed, in_channels=3, out_channels=3)


def make_kl_pipeline(scheduler_class=DDPMScheduler, **config) -> UnconditionalLatentPipeline:
    pipe = UnconditionalLatentPipeline(
        unet=build_tiny_unet(), vae=build_tiny_kl_vae(scaling_factor=0.18215), scheduler=scheduler_class(clip_sample=False),
        **config,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_vq_pipeline() -> UnconditionalLatentPipeline:
    pipe = UnconditionalLatentPipeline(
        unet=build_tiny_vq_unet(), vae=build_tiny_vq_vae(), scheduler=DDIMScheduler(clip_sample=False)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def kl_pipe():
    return make_kl_pipeline()


def sample_np(pipe, seed=0, batch_size=2, **kwargs) -> np.ndarray:
    return pipe(batch_size=batch_size, num_inference_steps=STEPS, generator=seeded(seed), output_type="np",
                **kwargs).images


# ----------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=lambda c: c.__name__)
def test_every_scheduler_samples_images_of_the_right_size_and_range(kl_pipe, scheduler_class):
    kl_pipe.scheduler = scheduler_class.from_config(kl_pipe.scheduler.config)
    calls = []
    original = kl_pipe.scheduler.scale_model_input
    kl_pipe.scheduler.scale_model_input = lambda sample, t: calls.append(t) or original(sample, t)
    try:
        images = sample_np(kl_pipe, batch_size=2)
    finally:
        del kl_pipe.scheduler.scale_model_input
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0  # something was decoded, not a constant
    assert len(calls) == len(kl_pipe.scheduler.timesteps)  # Euler needs its input scaled every step


# The LDM face models' schedule with diffusers' "leading" spacing (as in Stable Diffusion's configs): there,
# Euler's init_noise_sigma depends on the number of steps (83.8 for the 1000-step table, 2.96 for 2 steps).
LEADING_EULER = dict(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, timestep_spacing="leading",
                     steps_offset=1)


def first_step_sample(pipe, **call) -> torch.Tensor:
    """The sample the scheduler's first step() receives."""
    seen = []
    original_step = pipe.scheduler.step
    pipe.scheduler.step = lambda model_output, t, sample, **kw: seen.append(sample.clone()) or original_step(
        model_output, t, sample, **kw)
    try:
        pipe(num_inference_steps=STEPS, output_type="latent", **call)
    finally:
        del pipe.scheduler.step
    return seen[0]


def test_initial_noise_is_scaled_by_the_sigma_of_the_first_of_the_steps_actually_taken(kl_pipe):
    kl_pipe.scheduler = EulerDiscreteScheduler(**LEADING_EULER)
    full_table_sigma = float(kl_pipe.scheduler.init_noise_sigma)
    reference = EulerDiscreteScheduler(**LEADING_EULER)
    reference.set_timesteps(STEPS)
    assert full_table_sigma > 10 * float(reference.init_noise_sigma)  # so that scaling too early is caught
    noise = torch.randn(1, 4, 8, 8, generator=seeded(3))
    torch.testing.assert_close(first_step_sample(kl_pipe, latents=noise), noise * reference.init_noise_sigma)


def test_under_autocast_euler_keeps_float32_latents_between_steps():
    # diffusers' Euler schedulers cast their result to the model output's dtype: without a cast of the
    # UNet's bfloat16 output, the float32 latents would be rounded to bfloat16 at every step.
    pipe = make_kl_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    dtypes = []
    record = lambda p, i, t, tensors: dtypes.append(tensors["latents"].dtype) or {}  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = pipe(num_inference_steps=STEPS, generator=seeded(0), output_type="latent",
                       callback_on_step_end=record).images
        model_output = pipe.unet(torch.zeros(1, 4, 8, 8), 10).sample
    assert model_output.dtype == torch.bfloat16  # autocast really is on
    assert dtypes == [torch.float32] * STEPS and latents.dtype == torch.float32


def test_same_generator_gives_same_images_and_other_seed_other_images():
    pipe = make_kl_pipeline(DDPMScheduler)  # DDPM: the generator also drives every step's noise
    first, again, other = sample_np(pipe, seed=1), sample_np(pipe, seed=1), sample_np(pipe, seed=2)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_each_image_depends_only_on_its_own_generator():
    pipe = make_kl_pipeline(DDPMScheduler)
    run = lambda seeds: pipe(batch_size=len(seeds), num_inference_steps=STEPS, output_type="np",
                             generator=[seeded(s) for s in seeds]).images
    pair_a, pair_b, alone = run([10, 11]), run([10, 12]), run([11])
    np.testing.assert_allclose(pair_a[0], pair_b[0], atol=1e-5)
    np.testing.assert_allclose(pair_a[1], alone[0], atol=1e-5)
    assert np.abs(pair_a[1] - pair_b[1]).max() > 1e-3


def test_a_generator_list_of_the_wrong_length_is_refused(kl_pipe):
    with pytest.raises(ValueError, match="list of 2 generators for batch_size=3"):
        kl_pipe(batch_size=3, num_inference_steps=STEPS, generator=[seeded(0), seeded(1)])


def test_given_latents_make_sampling_deterministic():
    pipe = make_kl_pipeline(DDIMScheduler)
    noise = torch.randn(2, 4, 8, 8, generator=seeded(5))
    first = pipe(batch_size=2, latents=noise, num_inference_steps=STEPS, output_type="np").images
    second = pipe(batch_size=2, latents=noise.clone(), num_inference_steps=STEPS, output_type="np").images
    other = pipe(batch_size=2, latents=noise + 1.0, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - other).max() > 1e-3
    with pytest.raises(ValueError, match=r"latents has shape \(2, 4, 8, 8\).*\(1, 4, 8, 8\)"):
        pipe(batch_size=1, latents=noise, num_inference_steps=STEPS)


def test_output_types_and_latent_output_decodes_to_the_image_output(kl_pipe):
    kl_pipe.scheduler = DDIMScheduler.from_config(kl_pipe.scheduler.config)
    common = dict(batch_size=2, num_inference_steps=STEPS)
    pil = kl_pipe(generator=seeded(0), output_type="pil", **common).images
    as_np = kl_pipe(generator=seeded(0), output_type="np", **common).images
    as_pt = kl_pipe(generator=seeded(0), output_type="pt", **common).images
    latents = kl_pipe(generator=seeded(0), output_type="latent", **common).images
    (as_tuple,) = kl_pipe(generator=seeded(0), output_type="np", return_dict=False, **common)

    assert [image.size for image in pil] == [(32, 32)] * 2 and pil[0].mode == "RGB"
    assert as_pt.shape == (2, 3, 32, 32) and latents.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[1]), np.round(as_np[1] * 255).astype(np.uint8))
    torch.testing.assert_close(kl_pipe.decode_latents(latents), as_pt)
    np.testing.assert_array_equal(as_tuple, as_np)
    with pytest.raises(ValueError, match="output_type must be one of"):
        kl_pipe(num_inference_steps=STEPS, output_type="jpeg")


def test_callback_runs_every_step_and_can_replace_the_latents(kl_pipe):
    kl_pipe.scheduler = DDIMScheduler.from_config(kl_pipe.scheduler.config)
    steps_seen = []

    def record(pipe, step, timestep, tensors):
        steps_seen.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else {}

    latents = kl_pipe(num_inference_steps=STEPS, generator=seeded(0), output_type="latent",
                      callback_on_step_end=record).images
    assert steps_seen == list(range(STEPS)) and kl_pipe.num_timesteps == STEPS
    assert torch.count_nonzero(latents) == 0
    with pytest.raises(ValueError, match="may only name"):
        kl_pipe(num_inference_steps=STEPS, callback_on_step_end=record,
                callback_on_step_end_tensor_inputs=["model_output"])


def test_noise_uses_the_unet_dtype_and_decoding_the_vae_dtype():
    pipe = make_kl_pipeline(DDIMScheduler)
    pipe.unet.to(torch.bfloat16)
    pipe.vae.to(torch.bfloat16)
    dtypes = []
    pipe(num_inference_steps=STEPS, generator=seeded(0),
         callback_on_step_end=lambda p, i, t, d: dtypes.append(d["latents"].dtype) or {})
    images = pipe(num_inference_steps=STEPS, generator=seeded(0), output_type="pt").images
    assert dtypes == [torch.bfloat16] * STEPS
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1


def test_bad_inputs_give_clear_errors(kl_pipe):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        kl_pipe(batch_size=0, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        kl_pipe(num_inference_steps=0)
    with pytest.raises(ValueError, match="3-channel latents"):
        UnconditionalLatentPipeline(unet=build_tiny_vq_unet(), vae=build_tiny_kl_vae(), scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="positive finite"):
        make_kl_pipeline(latent_scaling_factor=0.0)


# ----------------------------------------------------------------------------------- latent scaling


def test_latent_scale_resolution_and_round_trip():
    kl_configured = make_kl_pipeline()
    assert kl_configured.latent_scale == kl_configured.vae.config.scaling_factor == pytest.approx(0.18215)
    assert kl_configured.latent_shift == 0.0

    # diffusers fills a missing scaling_factor with 0.18215; that default is no scale, so it must be given.
    unset = build_tiny_kl_vae()
    assert unset.config.scaling_factor == pytest.approx(0.18215)
    with pytest.raises(ValueError, match="sets no scaling_factor"):
        UnconditionalLatentPipeline(unet=build_tiny_unet(), vae=unset, scheduler=DDPMScheduler())

    shifted = UnconditionalLatentPipeline(unet=build_tiny_unet(), vae=build_tiny_kl_vae(scaling_factor=0.3,
                                          shift_factor=0.1), scheduler=DDPMScheduler())
    assert (shifted.latent_scale, shifted.latent_shift) == (pytest.approx(0.3), pytest.approx(0.1))

    vq = make_vq_pipeline()
    assert vq.vae.config.scaling_factor == pytest.approx(0.18215)  # diffusers' default, the #6725 trap
    assert (vq.latent_scale, vq.latent_shift) == (1.0, 0.0)

    explicit = make_kl_pipeline(latent_scaling_factor=0.5, latent_shift_factor=-0.2)
    z = torch.randn(2, 4, 8, 8, generator=seeded(0))
    torch.testing.assert_close(explicit.scale_latents(z), (z + 0.2) * 0.5)
    torch.testing.assert_close(explicit.unscale_latents(explicit.scale_latents(z)), z)
    torch.testing.assert_close(explicit.scale_latents(explicit.unscale_latents(z)), z)


def test_decoding_divides_by_the_scale_and_adds_the_shift():
    pipe = make_kl_pipeline(latent_scaling_factor=0.5, latent_shift_factor=0.25)
    z = torch.randn(1, 4, 8, 8, generator=seeded(0))
    expected = (pipe.vae.decode(z / 0.5 + 0.25).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(pipe.decode_latents(z), expected)


def test_vq_latents_are_encoded_before_quantisation_and_decoded_through_the_codebook():
    pipe = make_vq_pipeline()
    images = torch.rand(2, 3, 32, 32, generator=seeded(0)) * 2 - 1
    latents = pipe.encode_images(images)
    torch.testing.assert_close(latents, pipe.vae.encode(images).latents)  # scale 1: pre-quantisation latents
    quantised, _, _ = pipe.vae.quantize(latents)
    assert (quantised - latents).abs().max() > 1e-3  # quantisation really changes them
    via_codebook = (pipe.vae.decode(latents, force_not_quantize=False).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(pipe.decode_latents(latents), via_codebook)
    images_out = pipe(batch_size=2, num_inference_steps=STEPS, generator=seeded(0), output_type="np").images
    assert images_out.shape == (2, 32, 32, 3)


# ------------------------------------------------------------------------------- saving and loading


def saved_pipeline(tmp_path: Path, pipe=None) -> Path:
    folder = tmp_path / "saved-pipeline"
    (pipe or make_kl_pipeline(DDIMScheduler, latent_scaling_factor=0.7)).save_pretrained(folder)
    assert REPO_ROOT not in folder.resolve().parents
    return folder


def test_saved_folder_names_the_custom_class_and_carries_the_file(tmp_path):
    folder = saved_pipeline(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_uncond", "UnconditionalLatentPipeline"]
    assert index["latent_scaling_factor"] == 0.7 and index["latent_shift_factor"] == 0.0
    assert (folder / "pipeline_latent_uncond.py").read_bytes() == (REPO_ROOT / "pipeline_latent_uncond.py").read_bytes()
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


CLEAN_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from diffusers import DiffusionPipeline
    repo_root, folder, poisoned, out = sys.argv[1:5]
    import os
    assert not any(p and os.path.realpath(p) == os.path.realpath(repo_root) for p in sys.path), sys.path
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe).__module__
    assert pipe.latent_scale == 0.7
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.save(out, images)
    try:
        DiffusionPipeline.from_pretrained(poisoned, trust_remote_code=True)
    except RuntimeError as error:
        print("POISONED COPY RAN:", error)
    """
)


def test_saved_folder_loads_and_samples_in_a_clean_process_and_our_loader_never_runs_its_code(tmp_path):
    pipe = make_kl_pipeline(DDIMScheduler, latent_scaling_factor=0.7)
    folder = saved_pipeline(tmp_path, pipe)
    poisoned = tmp_path / "poisoned-pipeline"
    pipe.save_pretrained(poisoned)
    (poisoned / "pipeline_latent_uncond.py").write_text('raise RuntimeError("marker: folder code executed")\n')

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf-home"),
               HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    out = tmp_path / "images.npy"
    result = subprocess.run(
        [sys.executable, "-c", CLEAN_PROCESS_SCRIPT, str(REPO_ROOT), str(folder), str(poisoned), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "POISONED COPY RAN: marker: folder code executed" in result.stdout  # the marker is live code

    expected = sample_np(pipe, seed=0)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)  # other thread count

    # Would raise if it ran the copy; trust_remote_code (diffusers' permission) has nothing to allow here.
    loaded = load_pipeline(poisoned, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is UnconditionalLatentPipeline and loaded.latent_scale == 0.7
    assert not [name for name in sys.modules if name.startswith("diffusers_modules")]
    np.testing.assert_allclose(sample_np(loaded, seed=0), expected, atol=1e-5)  # same weights, other memory


def test_the_class_own_from_pretrained_is_diffusers_and_loads_a_saved_folder_as_this_class(tmp_path):
    """diffusers' loader, asked of the class itself, uses the class at hand (as for diffusers' own pipelines)
    instead of importing the folder's copy of the file, which it would refuse without trust_remote_code."""
    pipe = make_kl_pipeline(DDIMScheduler, latent_scaling_factor=0.7)
    folder = saved_pipeline(tmp_path, pipe)
    (folder / "pipeline_latent_uncond.py").write_text('raise RuntimeError("marker: folder code executed")\n')
    assert "from_pretrained" not in vars(UnconditionalLatentPipeline)
    loaded = UnconditionalLatentPipeline.from_pretrained(folder)
    assert type(loaded) is UnconditionalLatentPipeline and loaded.latent_scale == 0.7
    np.testing.assert_allclose(sample_np(loaded, seed=0), sample_np(pipe, seed=0), atol=1e-5)

def test_from_pretrained_options_override_saved_values(tmp_path):
    folder = saved_pipeline(tmp_path)
    custom_scheduler = DDPMScheduler(clip_sample=False)
    loaded = load_pipeline(folder, latent_scaling_factor=0.25, scheduler=custom_scheduler, torch_dtype=torch.bfloat16)
    assert loaded.latent_scale == 0.25 and loaded.scheduler is custom_scheduler
    assert loaded.unet.dtype == torch.bfloat16 and loaded.vae.dtype == torch.bfloat16


def write_compvis_ldm_folder(folder: Path) -> tuple[UNet2DModel, VQModel]:
    """The layout of CompVis/ldm-celebahq-256: LDMPipeline with unet/, vqvae/ and a DDIM scheduler/."""
    unet, vqvae = build_tiny_vq_unet(), build_tiny_vq_vae()
    with torch.no_grad():  # a codebook spread like a trained one, so that a wrong scale picks other codes
        vqvae.quantize.embedding.weight.copy_(torch.randn(vqvae.quantize.embedding.weight.shape, generator=seeded(1)))
    unet.save_pretrained(folder / "unet")
    vqvae.save_pretrained(folder / "vqvae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False
                  ).save_pretrained(folder / "scheduler")
    vq_config_path = folder / "vqvae" / "config.json"
    vq_config = json.loads(vq_config_path.read_text())
    vq_config.pop("scaling_factor")  # as in the published config, so diffusers falls back to 0.18215
    vq_config_path.write_text(json.dumps(vq_config))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMPipeline", "_diffusers_version": "0.4.0",
        "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"],
        "vqvae": ["diffusers", "VQModel"],
    }))
    return unet, vqvae


def test_compvis_ldm_layout_loads_with_scale_one_and_decodes_latents_unscaled(tmp_path):
    folder = tmp_path / "ldm-celebahq-like"
    write_compvis_ldm_folder(folder)
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vae, VQModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)  # what LDMPipeline would divide by
    assert (pipe.latent_scale, pipe.latent_shift) == (1.0, 0.0)

    latents = pipe(batch_size=2, num_inference_steps=STEPS, generator=seeded(0), output_type="latent").images
    images = pipe(batch_size=2, num_inference_steps=STEPS, generator=seeded(0), output_type="pt").images
    with torch.no_grad():
        unscaled = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        wrongly_scaled = (pipe.vae.decode(latents / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, unscaled)
    assert (images - wrongly_scaled).abs().max() > 1e-2


def test_loader_refuses_folders_that_are_not_unconditional_latent_pipelines(tmp_path):
    text_to_image = tmp_path / "sd"
    text_to_image.mkdir()
    (text_to_image / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"],
    }))
    with pytest.raises(ValueError, match=r"StableDiffusionPipeline.*text_encoder.*not an unconditional"):
        load_pipeline(text_to_image)

    foreign_class = saved_pipeline(tmp_path)
    index = json.loads((foreign_class / "model_index.json").read_text())
    index["unet"] = ["my_package", "UNet2DModel"]
    (foreign_class / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="only classes from the diffusers library"):
        load_pipeline(foreign_class)

    with pytest.raises(FileNotFoundError, match="not a saved pipeline folder"):
        load_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_pipeline(str(tmp_path / "missing" / "deeper" / "model"))


def test_unreachable_hub_id_says_the_machine_may_be_offline():
    import huggingface_hub.constants

    # conftest forces offline mode before the hub libraries load: the made-up id is never looked up online.
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(OSError, match=r"(?s)may be offline.*--local-dir.*HF_HUB_OFFLINE=1"):
        load_pipeline("someone/no-such-unconditional-model")
