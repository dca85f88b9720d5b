"""The loss and noise levers: P2 and Min-SNR weights, logit-normal timesteps, zero terminal SNR (kept in the
saved model, inherited by sampling and DreamBooth), and the combinations that are refused."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import latent_training_args, run_script, to_argv
from uldm.args import config_from, loss_config
from uldm.diffusion import (
    LossConfig,
    build_noise_scheduler,
    logit_normal_timestep_probabilities,
    loss_weights,
    noisy_latents_and_target,
    p2_weights,
    sample_timesteps,
    training_target,
)

SCRIPT = "train_unconditional_latent"
TIMESTEPS = torch.tensor([0, 1, 10, 250, 500, 900, 999])


def snr_from_betas(scheduler) -> torch.Tensor:
    """SNR computed here from the betas, not through diffusers' compute_snr."""
    alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), dim=0)
    return alphas_cumprod / (1 - alphas_cumprod)


# --------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("gamma, k", [(1.0, 1.0), (0.5, 2.0)])
def test_p2_weights_of_the_epsilon_loss_match_the_paper(gamma, k):
    scheduler = build_noise_scheduler(prediction_type="epsilon")
    snr = snr_from_betas(scheduler)[TIMESTEPS]
    expected = 1 / (k + snr) ** gamma
    torch.testing.assert_close(p2_weights(scheduler, TIMESTEPS, gamma, k).double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("lever", [{"p2_gamma": 1.0, "p2_k": 1.0}, {"p2_gamma": 0.5, "p2_k": 3.0}, {"snr_gamma": 5.0}])
def test_weighted_losses_are_one_objective_whatever_the_prediction_type(prediction_type, lever):
    """For one and the same guess of the clean image, the weighted loss of every parameterisation is the P2 /
    Min-SNR weighted epsilon loss of its paper."""
    generator = torch.Generator().manual_seed(0)
    reference = build_noise_scheduler(prediction_type="epsilon")
    scheduler = build_noise_scheduler(prediction_type=prediction_type)
    shape = (len(TIMESTEPS), 4, 8, 8)
    clean, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    guess = clean + 0.3 * torch.randn(shape, generator=generator)  # the model's estimate of the clean image
    noisy = scheduler.add_noise(clean, noise, TIMESTEPS)
    alpha = scheduler.alphas_cumprod[TIMESTEPS].sqrt()[:, None, None, None]
    sigma = (1 - scheduler.alphas_cumprod[TIMESTEPS]).sqrt()[:, None, None, None]
    guessed_noise = (noisy - alpha * guess) / sigma
    prediction = {"epsilon": guessed_noise, "sample": guess,
                  "v_prediction": scheduler.get_velocity(guess, guessed_noise, TIMESTEPS)}[prediction_type]

    def weighted(sched, predicted):
        target = training_target(sched, clean, noise, TIMESTEPS)
        errors = (predicted - target).pow(2).mean(dim=(1, 2, 3))
        return errors * loss_weights(sched, TIMESTEPS, LossConfig(**lever))

    torch.testing.assert_close(weighted(scheduler, prediction), weighted(reference, guessed_noise), rtol=2e-3, atol=1e-7)


def test_the_last_timestep_of_a_zero_snr_schedule_keeps_the_plain_loss():
    scheduler = build_noise_scheduler(prediction_type="v_prediction", levers=LossConfig(rescale_betas_zero_snr=True))
    for lever in ({"snr_gamma": 5.0}, {"p2_gamma": 1.0}):
        weights = loss_weights(scheduler, TIMESTEPS, LossConfig(**lever))
        assert torch.isfinite(weights).all()
        assert weights[-1] == 1.0  # t = 999, SNR 0: the formulas give 0, which would leave it untrained
        assert 0 < weights[-2] < 1e-2  # t = 900: the formula (small, SNR is nearly 0 there)


# --------------------------------------------------------------------------------------------
# Timesteps


def test_uniform_timesteps_are_the_draws_of_before():
    scheduler = build_noise_scheduler()
    drawn = sample_timesteps(scheduler, 64, torch.Generator().manual_seed(3), "cpu", LossConfig())
    expected = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, expected)


def test_logit_normal_timesteps_have_the_logit_normal_distribution():
    mean, std, count = 0.8, 0.6, 200_000
    scheduler = build_noise_scheduler()
    levers = LossConfig(weighting_scheme="logit_normal", logit_mean=mean, logit_std=std)
    drawn = sample_timesteps(scheduler, count, torch.Generator().manual_seed(0), "cpu", levers)
    assert drawn.min() >= 0 and drawn.max() <= 999
    # The logit of the drawn position in the descending timestep list (diffusers' sign) has the asked mean and
    # std (to within the 1/1000 bins).
    logits = torch.logit(1 - (drawn.double() + 0.5) / 1000)
    assert abs(logits.mean().item() - mean) < 0.01 and abs(logits.std().item() - std) < 0.01
    # Counts in 20 bins of 50 timesteps against the exact probabilities: a chi-square test.
    expected = logit_normal_timestep_probabilities(1000, mean, std).reshape(20, 50).sum(dim=1) * count
    observed = torch.bincount(drawn // 50, minlength=20).double()
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 45, chi_square  # 19 degrees of freedom: P(chi2 > 45) < 0.001
    # ...and it is not uniform: far fewer of the extreme timesteps.
    assert observed[0] < 0.2 * count / 20


def test_noisy_latents_use_the_levers_timesteps():
    scheduler = build_noise_scheduler()
    latents = torch.zeros(4096, 1, 1, 1)
    levers = LossConfig(weighting_scheme="logit_normal", logit_mean=3.0, logit_std=0.1)
    _, timesteps, _ = noisy_latents_and_target(scheduler, latents, torch.Generator().manual_seed(0), levers=levers)
    expected = 1000 / (1 + math.exp(3))  # (1 - sigmoid(3)) * 1000 = 47.4: diffusers' sign
    assert abs(timesteps.double().mean().item() - expected) < 2


def test_logit_mean_has_the_sign_of_diffusers_sd3_scripts():
    """diffusers (compute_density_for_timestep_sampling) draws u = sigmoid(N(mean, std)) and trains on entry
    int(u * T) of its descending timestep list: --logit_mean 1 trains near timestep 303 of 1000 on average
    (the SD3 paper's sign would give 696), and the same command line means the same here."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    count = 100_000
    levers = loss_config(parsed(SCRIPT, "--weighting_scheme", "logit_normal", "--logit_mean", 1))
    drawn = sample_timesteps(build_noise_scheduler(), count, torch.Generator().manual_seed(0), "cpu", levers)
    assert abs(drawn.double().mean().item() - 303) < 5
    u = compute_density_for_timestep_sampling("logit_normal", count, logit_mean=1.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(1))
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000).timesteps[(u * 1000).long()]
    assert abs(drawn.double().mean().item() - theirs.double().mean().item()) < 3


# --------------------------------------------------------------------------------------------
# Zero terminal SNR in the saved model, in sampling and in DreamBooth


@pytest.fixture(scope="module")
def zero_snr_model(tmp_path_factory, train_images, tiny_vae_dir):
    out = tmp_path_factory.mktemp("zero_snr") / "model"
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=4,
                                            rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                            snr_gamma=5.0))
    return out


def test_zero_snr_betas_end_in_pure_noise():
    scheduler = build_noise_scheduler(prediction_type="v_prediction", levers=LossConfig(rescale_betas_zero_snr=True))
    assert scheduler.alphas_cumprod[-1] == 0
    assert scheduler.alphas_cumprod[-2] > 0
    assert scheduler.config.timestep_spacing == "trailing"
    assert build_noise_scheduler().alphas_cumprod[-1] > 1e-4  # the default schedule does not


def test_a_zero_snr_model_is_saved_and_sampled_with_trailing_spacing(zero_snr_model, tmp_path):
    from uldm.pipeline_loading import load_pipeline
    from uldm.sampling import SCHEDULER_NAMES, make_scheduler

    config = json.loads((zero_snr_model / "scheduler" / "scheduler_config.json").read_text())
    assert (config["rescale_betas_zero_snr"], config["timestep_spacing"], config["prediction_type"]) == (
        True, "trailing", "v_prediction")
    pipeline = load_pipeline(zero_snr_model)
    for name in SCHEDULER_NAMES:  # every sampler of sample.py --scheduler starts at the pure-noise timestep
        scheduler = make_scheduler(name, pipeline.scheduler.config)
        scheduler.set_timesteps(10)
        assert int(scheduler.timesteps[0]) == 999, name
        assert scheduler.config.prediction_type == "v_prediction", name
    images = pipeline(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (2, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()
    card = ModelCard.load(zero_snr_model / "README.md").text
    assert "zero terminal SNR" in card and "v_prediction" in card


def test_dreambooth_on_a_zero_snr_base_keeps_v_prediction_and_the_rescaled_betas(zero_snr_model, train_images,
                                                                                  tmp_path):
    from uldm.pipeline_loading import load_pipeline
    from uldm.dreambooth import load_base_pipeline, training_noise_scheduler

    scheduler = training_noise_scheduler(load_base_pipeline(str(zero_snr_model)).scheduler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1] == 0
    out = tmp_path / "dreambooth"
    run_script("train_dreambooth_unconditional", to_argv({
        "pretrained_model_name_or_path": zero_snr_model, "instance_data_dir": train_images, "output_dir": out,
        "train_batch_size": 2, "max_train_steps": 2, "learning_rate": 1e-4, "validation_steps": 0,
        "num_validation_images": 2, "validation_inference_steps": 2, "checkpointing_steps": 0,
        "report_to": "none", "snr_gamma": 5.0}))
    saved = load_pipeline(out).scheduler.config
    assert (saved["rescale_betas_zero_snr"], saved["timestep_spacing"], saved["prediction_type"]) == (
        True, "trailing", "v_prediction")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


# --------------------------------------------------------------------------------------------
# The command line: one group of levers for every trainer, recorded, and the refusals

TRAINERS = {SCRIPT: ["--vae_name_or_path", "none"],
            "train_dreambooth_unconditional": ["--pretrained_model_name_or_path", "base", "--instance_data_dir", "me"]}
# A value other than the default for every lever: a new lever must be added here, and then reaches every trainer.
LEVERS_ON = {"snr_gamma": 5.0, "p2_gamma": 1.0, "p2_k": 2.0, "weighting_scheme": "logit_normal", "logit_mean": 1.0,
             "logit_std": 0.5, "offset_noise": 0.05, "rescale_betas_zero_snr": True}


def parsed(script: str, *argv):
    return importlib.import_module(script).parse_args([*TRAINERS[script], "--output_dir", "out", *map(str, argv)])


@pytest.mark.parametrize("script", TRAINERS)
def test_every_lever_is_a_flag_of_every_trainer(script):
    assert set(LEVERS_ON) == {field.name for field in dataclasses.fields(LossConfig)}
    defaults = parsed(script)
    assert all(hasattr(defaults, name) for name in LEVERS_ON)
    assert config_from(LossConfig, defaults) == LossConfig()
    assert config_from(LossConfig, parsed(script, *to_argv(LEVERS_ON))) == LossConfig(**LEVERS_ON)



def test_training_only_levers_are_recorded_in_the_arguments_and_the_model_card(train_images, tiny_vae_dir, tmp_path):
    out = tmp_path / "out"
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=2, p2_gamma=0.5,
                                            p2_k=2.0, timestep_sampling="logit_normal", logit_mean=0.5))
    arguments = json.loads((out / "training_args.json").read_text())
    assert (arguments["p2_gamma"], arguments["p2_k"], arguments["weighting_scheme"], arguments["logit_mean"],
            arguments["logit_std"]) == (0.5, 2.0, "logit_normal", 0.5, 1.0)
    card = ModelCard.load(out / "README.md").text
    assert "P2, 1 / (2 + SNR)^0.5" in card and "logit-normal, mean 0.5, std 1" in card


@pytest.mark.parametrize("options, message", [
    ({"rescale_betas_zero_snr": True}, "Use --prediction_type v_prediction"),
    ({"rescale_betas_zero_snr": True, "snr_gamma": 5.0}, "would moreover be infinite"),
    ({"p2_gamma": 1.0, "snr_gamma": 5.0}, "Choose one"),
    ({"p2_gamma": 1.0, "p2_k": 0.0}, "--p2_k must be positive"),
    ({"weighting_scheme": "logit_normal", "logit_std": 0.0}, "--logit_std must be positive"),
])
def test_combinations_that_cannot_work_are_refused_before_anything_is_written(
        options, message, train_images, tiny_vae_dir, tmp_path, expect_input_error):
    out = tmp_path / "out"
    stderr = expect_input_error(run_script, SCRIPT, latent_training_args(train_images, tiny_vae_dir, out, **options))
    assert message in stderr
    assert not out.exists()
