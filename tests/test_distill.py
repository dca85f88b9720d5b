"""distill.py and uldm/distillation.py: consistency distillation of a saved model into a few-step student that
samples with diffusers' LCMScheduler.

The unit tests check the maths against diffusers (what the student is trained to output is what LCMScheduler.step
samples); the runs distil tiny teachers trained here (a latent one on a pooling first stage, so that samples and
their FID show what the UNet learned, see test_fid_validation.py) and check what the student saves, loads, samples,
resumes and refuses.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, LCMScheduler
from safetensors.torch import load_file

from conftest import (
    REPO_ROOT, build_tiny_unet, latent_training_args, run_script, subprocess_env,
    to_argv,
)
from pipeline_latent_uncond import guided_model, noise_level
from uldm.diffusion import build_noise_scheduler
from uldm.distillation import (
    ConsistencyConfig, SolverGrid, boundary_scalings, clean_and_noise, consistency_function, ddim_step,
    student_scheduler,
)
from uldm.training import read_metrics

SCRIPT = "distill"


# --------------------------------------------------------------------------------------------
# The maths, against diffusers


def noisy_batch(prediction_type: str, alpha_bar: torch.Tensor, seed: int = 0):
    """x0, eps, x_t and the exact model output of each prediction type, in float64."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(len(alpha_bar), 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    a = alpha_bar.to(torch.float64).reshape(-1, 1, 1, 1)
    sample = a.sqrt() * clean + (1 - a).sqrt() * noise
    output = {"epsilon": noise, "sample": clean, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * clean}
    return clean, noise, sample, output[prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_and_noise_recover_x0_and_eps_from_each_prediction_type(prediction_type):
    alpha_bar = torch.tensor([0.999, 0.7, 0.2, 0.003], dtype=torch.float64)
    clean, noise, sample, output = noisy_batch(prediction_type, alpha_bar)
    x0, eps = clean_and_noise(output, sample, alpha_bar.reshape(-1, 1, 1, 1), prediction_type)
    torch.testing.assert_close(x0, clean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps, noise, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="Unknown prediction type"):
        clean_and_noise(output, sample, alpha_bar.reshape(-1, 1, 1, 1), "flow")


def test_boundary_scalings_are_lcm_schedulers():
    timesteps = torch.tensor([0, 1, 19, 99, 499, 999])
    for timestep_scaling in (10.0, 3.0):
        scheduler = LCMScheduler(timestep_scaling=timestep_scaling)
        c_skip, c_out = boundary_scalings(timesteps, timestep_scaling, ndim=4)
        assert c_skip.shape == c_out.shape == (6, 1, 1, 1)
        for index, t in enumerate(timesteps):
            expected_skip, expected_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
            assert c_skip[index].item() == pytest.approx(float(expected_skip), rel=1e-6)
            assert c_out[index].item() == pytest.approx(float(expected_out), rel=1e-6)
    # The boundary condition: the identity at t = 0.
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)


@pytest.mark.parametrize("num_ddim_timesteps", [50, 4, 3])
def test_the_solver_grid_is_lcm_schedulers_origin_grid(num_ddim_timesteps):
    teacher = build_noise_scheduler(prediction_type="v_prediction")
    grid = SolverGrid(teacher.alphas_cumprod, num_ddim_timesteps, "cpu")
    k = 1000 // num_ddim_timesteps
    assert grid.timesteps.tolist() == [n * k - 1 for n in range(1, num_ddim_timesteps + 1)]

    scheduler = student_scheduler(teacher.config, ConsistencyConfig(num_ddim_timesteps=num_ddim_timesteps))
    assert isinstance(scheduler, LCMScheduler)
    assert scheduler.config.original_inference_steps == num_ddim_timesteps
    assert scheduler.config.prediction_type == "v_prediction"
    # The student's noise schedule is the teacher's.
    torch.testing.assert_close(scheduler.alphas_cumprod, teacher.alphas_cumprod, rtol=0, atol=0)
    scheduler.set_timesteps(num_ddim_timesteps)
    assert sorted(scheduler.timesteps.tolist()) == grid.timesteps.tolist()
    for steps in (1, 2, 3):
        scheduler.set_timesteps(steps)
        assert len(scheduler.timesteps) == steps
        assert set(scheduler.timesteps.tolist()) <= set(grid.timesteps.tolist())
    # Training pairs: a grid point and the point one solver step below it (0 below the first).
    start, end = grid.draw(4096, torch.Generator().manual_seed(0))
    assert set(start.tolist()) <= set(grid.timesteps.tolist()) and len(set(start.tolist())) == num_ddim_timesteps
    assert torch.equal(end, (start - k).clamp(min=0))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_the_consistency_function_is_what_lcm_scheduler_step_denoises_to(prediction_type):
    """The student is trained to output f(x_t, t) = c_skip x_t + c_out x0(model(x_t, t)); LCMScheduler.step's
    `denoised` for the same model output, timestep and sample must be exactly that, at every step it samples
    (the last step returns it as the sample)."""
    teacher = build_noise_scheduler(prediction_type=prediction_type)
    config = ConsistencyConfig(num_ddim_timesteps=20, timestep_scaling=10.0)
    scheduler = student_scheduler(teacher.config, config)
    grid = SolverGrid(teacher.alphas_cumprod, config.num_ddim_timesteps, "cpu")
    unet = build_tiny_unet(seed=3).eval()

    def model(x, t):  # the UNet on each sample alone, free of batch-size round-off (eps at t = 999 is x0 times 14)
        return torch.cat([unet(x[i:i + 1], t[i]).sample for i in range(len(x))])

    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    scheduler.set_timesteps(4)
    seen = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = model(sample, t.repeat(len(sample)))
            step = scheduler.step(output, t, sample, generator=torch.Generator().manual_seed(1))
            ours = consistency_function(model, sample, t.repeat(len(sample)), grid, prediction_type,
                                        config.timestep_scaling)
            torch.testing.assert_close(ours, step.denoised, rtol=1e-5, atol=1e-5)
            seen.append((t.item(), sample, ours))
            sample = step.prev_sample
        torch.testing.assert_close(sample, ours, rtol=0, atol=0)  # the last step's sample is the denoised one

        # A batch of different timesteps (as in training) gives each sample its own f(x_t, t).
        timesteps = torch.tensor([t for t, _, _ in seen])
        batch = torch.cat([x[:1] for _, x, _ in seen])
        together = consistency_function(model, batch, timesteps, grid, prediction_type, config.timestep_scaling)
        torch.testing.assert_close(together, torch.cat([f[:1] for _, _, f in seen]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
def test_a_ddim_step_of_an_exact_teacher_lands_on_the_noisy_sample_at_the_end_timestep(prediction_type):
    """A teacher that knows x0 and eps: one DDIM step from x_start gives sqrt(a_end) x0 + sqrt(1 - a_end) eps."""
    teacher_scheduler = build_noise_scheduler(prediction_type=prediction_type)
    grid = SolverGrid(teacher_scheduler.alphas_cumprod, 10, "cpu")
    start = torch.tensor([999, 499, 99])
    end = (start - grid.skip).clamp(min=0)
    clean, noise, sample, output = noisy_batch(prediction_type, teacher_scheduler.alphas_cumprod[start])
    moved = ddim_step(lambda x, t: output, sample.float(), start, end, grid, prediction_type)
    a_end = teacher_scheduler.alphas_cumprod[end].double().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(moved.double(), a_end.sqrt() * clean + (1 - a_end).sqrt() * noise, rtol=1e-4,
                               atol=1e-4)


def test_sample_py_steps_of_a_student_default_to_4_or_its_grid_and_more_than_its_grid_are_refused():
    import argparse

    import sample as sample_script
    from uldm.errors import InputError

    def steps(scheduler, given=None) -> int:
        args = argparse.Namespace(num_inference_steps=given)
        sample_script.resolve_steps(args, scheduler)
        return args.num_inference_steps

    teacher = build_noise_scheduler()
    lcm = {grid: student_scheduler(teacher.config, ConsistencyConfig(num_ddim_timesteps=grid)) for grid in (50, 4, 2)}
    assert steps(teacher) == 50 and steps(teacher, 60) == 60
    assert (steps(lcm[50]), steps(lcm[4]), steps(lcm[2])) == (4, 4, 2)
    assert (steps(lcm[50], 50), steps(lcm[4], 1)) == (50, 1)
    with pytest.raises(InputError, match="--num_inference_steps 51: .* grid of 50 timesteps, so it takes 1 to 50"):
        steps(lcm[50], 51)
    with pytest.raises(InputError, match="--num_inference_steps 3: .* 1 to 2 steps"):
        steps(lcm[2], 3)


# --------------------------------------------------------------------------------------------
# The guided teacher: a batch of timesteps, some inside the guidance interval


def test_guided_model_guides_only_the_samples_whose_noise_level_is_inside_the_interval():
    scheduler = build_noise_scheduler()
    calls = []

    def model(x, t):
        return torch.full_like(x, 1.0)

    def guide(x, t):
        calls.append(t)
        return torch.full_like(x, 3.0)

    timesteps = torch.tensor([10, 300, 999, 500])
    # (lo, hi] holds the noise levels of timesteps 300 and 500 only.
    interval = (noise_level(scheduler, 299), noise_level(scheduler, 500))
    x = torch.zeros(4, 4, 8, 8)
    out = guided_model(model, guide, 2.0, interval, scheduler)(x, timesteps)
    guided, alone = 3.0 + 2.0 * (1.0 - 3.0), 1.0
    assert out[:, 0, 0, 0].tolist() == [alone, guided, alone, guided]
    assert torch.equal(out[1], torch.full((4, 8, 8), guided)) and torch.equal(out[0], torch.ones(4, 8, 8))

    # All inside: everyone guided; none inside: the model alone, and the guide is never called.
    everyone = guided_model(model, guide, 2.0, (0.0, float("inf")), scheduler)(x, timesteps)
    assert torch.equal(everyone, torch.full_like(x, guided))
    calls.clear()
    nobody = guided_model(model, guide, 2.0, (100.0, 200.0), scheduler)(x, timesteps)
    assert torch.equal(nobody, torch.ones_like(x)) and not calls
    # Weight 0 with the interval: the guide alone inside, the model outside.
    zero = guided_model(model, guide, 0.0, interval, scheduler)(x, timesteps)
    assert zero[:, 0, 0, 0].tolist() == [alone, 3.0, alone, 3.0]


def test_guided_model_on_a_batch_of_timesteps_is_each_sample_guided_on_its_own():
    scheduler = build_noise_scheduler(prediction_type="v_prediction")
    unet, guide = build_tiny_unet(seed=0).eval(), build_tiny_unet(seed=1).eval()
    timesteps = torch.tensor([50, 400, 999, 700])
    interval = (noise_level(scheduler, 399), noise_level(scheduler, 800))
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = guided_model(unet, guide, 2.5, interval, scheduler)
    with torch.no_grad():
        together = model(x, timesteps)
        one_by_one = torch.cat([model(x[i:i + 1], timesteps[i]) for i in range(4)])
        alone = unet(x, timesteps).sample
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)
    # Timesteps 50 and 999 are outside: the model alone; 400 and 700 are guided (differ from the model).
    torch.testing.assert_close(together[[0, 2]], alone[[0, 2]], rtol=1e-6, atol=1e-6)
    assert (together[[1, 3]] - alone[[1, 3]]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


# --------------------------------------------------------------------------------------------
# Teachers trained here, and their students

GRID = 4  # --num_ddim_timesteps of the runs: a coarse grid (skip 250), which a hundred steps distil on a CPU


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, train_images, pooling_vae_dir) -> Path:
    """A v-prediction latent teacher that has learnt the blobs (its 10-step samples score an FID of about 9
    against the training images, its 1-step ones about 17), with checkpoint-30 (a weaker self, a guide)."""
    out = tmp_path_factory.mktemp("teacher") / "v"
    run_script("train_unconditional_latent", latent_training_args(
        train_images, pooling_vae_dir, out, max_train_steps=60, cache_latents=True, lr_scheduler="constant_with_warmup",
        checkpointing_steps=30, num_validation_images=0))
    return out


def distil_args(teacher_dir, images, output_dir, student_steps=(1, 2), **overrides) -> list[str]:
    """distill.py's arguments for a short run (an override of None leaves that option out)."""
    options = {
        "pretrained_model_name_or_path": teacher_dir,
        "train_data_dir": images,
        "output_dir": output_dir,
        "train_batch_size": 8,
        "max_train_steps": 3,
        "learning_rate": 1e-3,
        "num_ddim_timesteps": GRID,
        "validation_steps": 0,
        "num_validation_images": 0,
        "checkpointing_steps": 0,
        "report_to": "none",
    }
    return to_argv({**options, **overrides}) + ["--student_inference_steps", *map(str, student_steps)]


DISTIL_STEPS = 120


@pytest.fixture(scope="module")
def student(teacher, train_images, tmp_path_factory) -> Path:
    """The teacher distilled for DISTIL_STEPS steps, with FID at 1 and 2 steps at step 0 and at the end."""
    out = tmp_path_factory.mktemp("student") / "lcm"
    run_script(SCRIPT, distil_args(teacher, train_images, out, max_train_steps=DISTIL_STEPS, cache_latents=True,
                                   validation_fid_images=32, fid_feature_extractor="random-conv",
                                   num_validation_images=4, validation_inference_steps=4))
    return out


def test_the_student_learns_to_sample_in_one_step(student):
    rows = read_metrics(student, having="fid_1step")
    assert [row["step"] for row in rows] == [0, DISTIL_STEPS]
    before, after = rows[0], rows[-1]
    # Calibrated (120 steps): 1-step FID 17.4 -> 11.0 here; with --seed 1 to 4 17.6 -> 12.1 to 12.9 (ratio at most
    # 0.74); a teacher trained with --seed 1: 15.8 -> 7.6. A student that learns nothing stays at ~17.5, and one
    # distilled on LCM's 50-point grid for 30 steps went 17.4 -> 18.3.
    assert after["fid_1step"] < 0.8 * before["fid_1step"], [(row["fid_1step"], row["fid_2step"]) for row in rows]
    assert after["fid_2step"] < before["fid_2step"], [(row["fid_1step"], row["fid_2step"]) for row in rows]
    losses = [row["loss"] for row in read_metrics(student, having="loss")]
    assert len(losses) == DISTIL_STEPS and all(map(math.isfinite, losses))


def test_the_student_saves_an_lcm_scheduler_on_its_grid_and_a_card_that_names_the_teacher(student, teacher):
    config = json.loads((student / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler"
    assert config["original_inference_steps"] == GRID and config["prediction_type"] == "v_prediction"
    teacher_config = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    assert {key: config[key] for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")} == \
        {key: teacher_config[key] for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")}
    # The same pipeline as the teacher's (VAE, latent scale and shift) but for its scheduler.
    index, teacher_index = (json.loads((folder / "model_index.json").read_text()) for folder in (student, teacher))
    assert index.pop("scheduler") == ["diffusers", "LCMScheduler"]
    assert teacher_index.pop("scheduler") != ["diffusers", "LCMScheduler"] and index == teacher_index
    card = (student / "README.md").read_text()
    assert str(teacher) in card and "consistency-distillation" in card
    assert "FID / KID at 1 step" in card
    # The validation grids: the student at each step count (step 0 and the end), the teacher once.
    names = sorted(path.name for path in (student / "samples").glob("*.png"))
    assert names == ["student_1step_0000000.png", f"student_1step_{DISTIL_STEPS:07d}.png",
                     "student_2step_0000000.png", f"student_2step_{DISTIL_STEPS:07d}.png",
                     "teacher_0000000.png"]


def test_the_student_loads_and_samples_in_a_clean_process(student, tmp_path):
    import shutil

    elsewhere = tmp_path / "elsewhere" / "student"
    shutil.copytree(student, elsewhere, ignore=shutil.ignore_patterns("checkpoint-*", "latent_cache", "logs",
                                                                      "fid_reference"))
    code = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if p not in ('', {str(REPO_ROOT)!r})]
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(elsewhere)!r}, trust_remote_code=True)
        images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
        print(type(pipe.scheduler).__name__, images.shape)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "LCMScheduler (2, 32, 32, 3)"


def test_sample_py_gives_a_student_4_steps_and_refuses_more_than_its_grid(student, tmp_path, expect_input_error):
    out = tmp_path / "samples"
    run_script("sample", [student, "--output_dir", out, "--num_images", 2, "--batch_size", 2])
    assert json.loads((out / "sample_args.json").read_text())["num_inference_steps"] == 4
    assert sorted(path.name for path in out.glob("0*.png")) == ["000000.png", "000001.png"]

    refused = tmp_path / "refused"
    message = expect_input_error(run_script, "sample", [student, "--output_dir", refused, "--num_images", 2,
                                                        "--num_inference_steps", GRID + 1])
    assert f"--num_inference_steps {GRID + 1}" in message and f"1 to {GRID} steps" in message
    assert "--scheduler dpmsolver++" in message
    assert not refused.exists()
    # The way out the message names: sampled as an ordinary diffusion model, any number of steps.
    run_script("sample", [student, "--output_dir", refused, "--num_images", 1, "--num_inference_steps", GRID + 2,
                          "--scheduler", "dpmsolver++"])
    assert json.loads((refused / "sample_args.json").read_text())["num_inference_steps"] == GRID + 2
    assert (refused / "000000.png").is_file()


def test_exact_resume_gives_the_same_student_and_target(teacher, train_images, tmp_path, sigterm_after_step):
    """Straight 4 steps == 2 steps, SIGTERM, resume 2 more: the same live student, the same EMA target (what is
    saved), the same losses. 24 images, batch 8: step 4 is in the second epoch."""
    common = dict(max_train_steps=4, checkpointing_steps=2, cache_latents=True)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_script(SCRIPT, distil_args(teacher, train_images, straight, **common))

    sigterm_after_step(1)  # the loop stops at the next step boundary, with a checkpoint
    run_script(SCRIPT, distil_args(teacher, train_images, interrupted, **common))
    assert [path.name for path in interrupted.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (interrupted / "model_index.json").exists(), "a stopped run saves no student"
    run_script(SCRIPT, distil_args(teacher, train_images, interrupted, resume_from_checkpoint="latest", **common))

    a, b = read_metrics(straight, having="loss"), read_metrics(interrupted, having="loss")
    assert [row["step"] for row in b] == [1, 2, 3, 4]
    assert [row["loss"] for row in a] == [row["loss"] for row in b]
    live_a, live_b = (load_file(run / "checkpoint-4" / "model.safetensors") for run in (straight, interrupted))
    target_a, target_b = (load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
                          for run in (straight, interrupted))
    for weights_a, weights_b in ((live_a, live_b), (target_a, target_b)):
        assert weights_a.keys() == weights_b.keys()
        different = [key for key in weights_a if not torch.equal(weights_a[key], weights_b[key])]
        assert not different, different[:5]
    # The saved student is the EMA target, which really differs from the live weights and from the teacher.
    teacher_weights = load_file(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    key = next(k for k in target_a if k.endswith("conv_in.weight"))
    assert not torch.equal(target_a[key], live_a[key]) and not torch.equal(target_a[key], teacher_weights[key])


def test_an_epsilon_teacher_distils_and_sample_py_defaults_to_a_small_grid(train_images, pooling_vae_dir, tmp_path):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    run_script("train_unconditional_latent", latent_training_args(
        train_images, pooling_vae_dir, teacher_dir, max_train_steps=6, cache_latents=True, prediction_type="epsilon",
        num_validation_images=0))
    run_script(SCRIPT, distil_args(teacher_dir, train_images, out, student_steps=(1, 3), num_ddim_timesteps=3,
                                   cache_latents=True))
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (config["_class_name"], config["prediction_type"], config["original_inference_steps"]) == (
        "LCMScheduler", "epsilon", 3)
    losses = [row["loss"] for row in read_metrics(out, having="loss")]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)

    # A grid of 3: sample.py's default (4 steps for a student) is the whole grid.
    samples = tmp_path / "samples"
    run_script("sample", [out, "--output_dir", samples, "--num_images", 1])
    assert json.loads((samples / "sample_args.json").read_text())["num_inference_steps"] == 3
    assert (samples / "000000.png").is_file()


@pytest.fixture(scope="module")
def pixel_teacher(tmp_path_factory) -> Path:
    """A pixel-space DDPMPipeline (random UNet: only the mechanics are tested with it)."""
    folder = tmp_path_factory.mktemp("pixel-teacher") / "ddpm"
    DDPMPipeline(unet=build_tiny_unet(in_channels=3, out_channels=3, sample_size=32),
                 scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def test_a_pixel_space_teacher_distils_into_a_ddpm_pipeline_with_lcm_scheduler(pixel_teacher, train_images, tmp_path):
    out = tmp_path / "student"
    run_script(SCRIPT, distil_args(pixel_teacher, train_images, out, max_train_steps=2, train_batch_size=4))
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert not (out / "vae").exists()
    pipeline = DDPMPipeline.from_pretrained(out)
    assert isinstance(pipeline.scheduler, LCMScheduler) and pipeline.scheduler.config.original_inference_steps == GRID
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    assert "DDPMPipeline.from_pretrained" in (out / "README.md").read_text()


def test_a_lora_student_saves_its_adapter_and_scheduler_and_loads_as_a_few_step_sampler(
        teacher, train_images, tmp_path, expect_input_error):
    from uldm.first_stage import load_saved_model
    from uldm.lora import adapter_scheduler, lora_base_model

    out = tmp_path / "lcm-lora"
    run_script(SCRIPT, distil_args(teacher, train_images, out, use_lora=True, cache_latents=True))
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (config["_class_name"], config["original_inference_steps"]) == ("LCMScheduler", GRID)
    assert lora_base_model(out) == str(teacher.resolve())
    assert isinstance(adapter_scheduler(out), LCMScheduler) and adapter_scheduler(tmp_path) is None
    assert str(teacher) in (out / "README.md").read_text()

    pipeline = load_saved_model(out)
    assert isinstance(pipeline.scheduler, LCMScheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (2, 32, 32, 3)

    # A LoRA student is a student too: distilling it again is refused.
    again = tmp_path / "again"
    message = expect_input_error(run_script, SCRIPT, distil_args(out, train_images, again))
    assert "already a distilled student" in message and not again.exists()


def test_a_guided_teacher_distils(student, teacher, train_images, tmp_path):
    """--guide (the teacher's own checkpoint-30, autoguidance) changes the ODE the student learns: the first loss
    differs from the unguided run's with the same batch, noise and timesteps."""
    scheduler = build_noise_scheduler(prediction_type="v_prediction")
    interval = (noise_level(scheduler, 249), noise_level(scheduler, 749))  # guides grid points 499 and 749 only
    out = tmp_path / "guided"
    run_script(SCRIPT, distil_args(teacher, train_images, out, cache_latents=True, guide="checkpoint-30",
                                   guidance_scale=2.0) + ["--guidance_interval", *map(str, interval)])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    guided_loss = read_metrics(out, having="loss")[0]["loss"]
    unguided_loss = read_metrics(student, having="loss")[0]["loss"]
    assert guided_loss != unguided_loss
    card = (out / "README.md").read_text()
    assert "checkpoint-30, weight 2" in card


def test_bad_input_is_refused_before_anything_is_written(teacher, student, pixel_teacher, train_images, tmp_path,
                                                         expect_input_error):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (dict(pretrained_model_name_or_path=empty), "is not a saved pipeline"),
        (dict(pretrained_model_name_or_path=train_images), "is not a saved pipeline"),
        (dict(pretrained_model_name_or_path=teacher / "unet" / "config.json"), "is a file"),
        (dict(resolution=64), "--resolution 64 does not match the teacher"),
        (dict(student_steps=(1, 8)), ("--student_inference_steps 8: ", f"grid of {GRID} timesteps, so it takes 1 to "
                                      f"{GRID} steps", "(--num_ddim_timesteps 8 or more)")),
        (dict(num_ddim_timesteps=2000), "--num_ddim_timesteps must be between 1 and the teacher's 1000"),
        (dict(pretrained_model_name_or_path=pixel_teacher, use_lora=True), "--use_lora needs a latent teacher"),
        (dict(pretrained_model_name_or_path=pixel_teacher, cache_latents=True), "--cache_latents"),
        (dict(pretrained_model_name_or_path=student), "already a distilled student"),
    ]
    for index, (options, expected) in enumerate(cases):
        out = tmp_path / f"out{index}"
        source = options.pop("pretrained_model_name_or_path", teacher)
        message = expect_input_error(run_script, SCRIPT, distil_args(source, train_images, out, **options))
        for part in (expected,) if isinstance(expected, str) else expected:
            assert part in message, (options, message)
        assert not out.exists(), options
