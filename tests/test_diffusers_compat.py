"""Coming from diffusers: the command lines of its train_unconditional.py and train_dreambooth.py run here with
their flags' meaning, flags that need text are refused with what to do, and results go up to the Hub."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from conftest import FakeHub, build_tiny_kl_vae, build_tiny_unet, latent_training_args, make_blob_images, run_script
from uldm.training import read_metrics

LATENT, DREAMBOOTH, VAE = "train_unconditional_latent", "train_dreambooth_unconditional", "train_vae"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"



def card_usage(out: Path) -> str:
    """The text of the model card written into `out`: its usage snippet names the Hub repository the run pushed
    to (a FakeHub here, nothing is downloaded or loaded from it)."""
    return (out / "README.md").read_text()

@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "images"
    make_blob_images(folder, 8)
    return folder


def keep_each_save(monkeypatch, module_name: str, into: Path) -> list[Path]:
    """Copy the output folder (without checkpoints and logs) each time the trainer has written its result and
    model card; returns the list of copies, filled as the run goes."""
    import importlib

    module = importlib.import_module(module_name)
    original, copies = module.write_model_card, []

    def write_then_copy(output_dir, *args, **kwargs):
        path = original(output_dir, *args, **kwargs)
        copy = into / f"save-{len(copies) + 1}"
        shutil.copytree(output_dir, copy, ignore=shutil.ignore_patterns("checkpoint-*", "tb", "logs"))
        copies.append(copy)
        return path

    monkeypatch.setattr(module, "write_model_card", write_then_copy)
    return copies


def card_facts(folder: Path) -> dict[str, str]:
    rows = [line.strip("|").split("|") for line in (folder / "README.md").read_text().splitlines()
            if line.startswith("| ") and line.count("|") == 3]
    return {key.strip(): value.strip() for key, value in rows}


# ------------------------------------------------------------------------------------------------
# train_unconditional.py's command line


def test_the_origin_reports_command_runs_unchanged_and_saves_images_and_model_every_two_epochs(
        few_images, tiny_vae_dir, tmp_path, monkeypatch, caplog):
    """The origin report's command (scaled down: tiny models, 8 images, 4 epochs) with the other flags of diffusers'
    train_unconditional.py: grids and pipelines of epochs 2 and 4, told apart by step and by their model card."""
    from uldm.pipeline_loading import load_pipeline

    out = tmp_path / "outputs"
    saves = keep_each_save(monkeypatch, LATENT, tmp_path / "saves")
    argv = [
        f"--train_data_dir={few_images}", "--resolution=32", f"--output_dir={out}",
        "--train_batch_size=4", "--eval_batch_size=4", "--num_epochs=4", "--gradient_accumulation_steps=1",
        "--checkpointing_steps=8000", "--use_ema", "--save_images_epochs=2", "--save_model_epochs=2",
        "--learning_rate=8.4e-5", "--lr_warmup_steps=500", '--mixed_precision=no',
        f"--vae_name_or_path={tiny_vae_dir}", "--model_config_name_or_path=tiny",
        # ... and the rest of train_unconditional.py's flags
        "--ddpm_num_inference_steps=4", "--logger=tensorboard", "--logging_dir=tb", "--local_rank=-1",
        "--enable_xformers_memory_efficient_attention", "--lr_scheduler=cosine", "--adam_beta1=0.95",
        "--adam_beta2=0.999", "--adam_weight_decay=1e-6", "--adam_epsilon=1e-08", "--ema_inv_gamma=1.0",
        "--ema_power=0.75", "--ema_max_decay=0.9999", "--prediction_type=epsilon", "--ddpm_num_steps=1000",
        "--ddpm_beta_schedule=linear", "--center_crop", "--random_flip", "--dataloader_num_workers=0",
        "--checkpoints_total_limit=2",
    ]
    with caplog.at_level(logging.INFO):
        run_script(LATENT, argv)

    # 8 images, batch 4: 2 steps an epoch, so epochs 2 and 4 end at steps 4 and 8.
    assert [row["step"] for row in read_metrics(out, having="loss")] == list(range(1, 9))
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["validation_0000004.png", "validation_0000008.png"]
    assert Image.open(out / "samples" / grids[0]).size == (64, 64), "--eval_batch_size=4: a 2 x 2 grid of 32 px"

    assert len(saves) == 2, "the pipeline after epoch 2, replaced after epoch 4 (the end)"
    facts = [card_facts(save) for save in saves]
    assert [(f["epochs"], f["steps"]) for f in facts] == [("2", "4"), ("4", "8")]
    assert "Saved the pipeline of epoch 2 (step 4)" in caplog.text
    first, last = (load_file(save / UNET_WEIGHTS) for save in saves)
    assert first.keys() == last.keys()
    assert any(not torch.equal(first[k], last[k]) for k in first), "epoch 4's weights replace epoch 2's"
    assert all(torch.equal(last[k], v) for k, v in load_file(out / UNET_WEIGHTS).items())
    for save in saves:
        pipeline = load_pipeline(save)
        assert pipeline(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no half-finished save left behind"
    assert sorted(p.name for p in out.glob("card_*.png")) == ["card_validation_0000008.png"], "only the card's image"

    assert list((out / "tb").rglob("events.out.tfevents.*")), "--logging_dir holds the TensorBoard events"
    recorded = json.loads((out / "training_args.json").read_text())
    assert (recorded["num_validation_images"], recorded["report_to"], recorded["validation_inference_steps"]) == (
        4, "tensorboard", 4)
    from diffusers.utils import is_xformers_available

    if not is_xformers_available():
        assert "xformers is not installed, so attention runs on PyTorch's scaled_dot_product_attention" in caplog.text


def test_overwrite_output_dir_moves_the_earlier_run_aside_and_never_deletes_it(few_images, tiny_vae_dir, tmp_path,
                                                                                expect_input_error):
    from uldm.hub import LOCAL_ONLY_PATTERNS, files_to_upload

    out = tmp_path / "out"
    common = dict(max_train_steps=4, checkpointing_steps=2, validation_steps=2, validation_inference_steps=2)
    run_script(LATENT, latent_training_args(few_images, tiny_vae_dir, out, **common))
    earlier = {p.name: p.read_bytes() for p in (out / "checkpoint-4").iterdir() if p.is_file()}

    error = expect_input_error(run_script, LATENT, latent_training_args(few_images, tiny_vae_dir, out, **common))
    assert "already holds checkpoints" in error and "--overwrite_output_dir" in error
    both = latent_training_args(few_images, tiny_vae_dir, out, **common, overwrite_output_dir=True,
                                resume_from_checkpoint="latest")
    assert "give one of them" in expect_input_error(run_script, LATENT, both)

    run_script(LATENT, latent_training_args(few_images, tiny_vae_dir, out, **{**common, "max_train_steps": 2},
                                            overwrite_output_dir=True))
    [archive] = out.glob("previous_run_*")
    assert sorted(p.name for p in archive.iterdir()) == [
        "checkpoint-2", "checkpoint-4", "loss_curve.png", "metrics.jsonl", "samples", "training_args.json"]
    assert {p.name: p.read_bytes() for p in (archive / "checkpoint-4").iterdir() if p.is_file()} == earlier
    assert sorted(p.name for p in (archive / "samples").iterdir()) == ["validation_0000002.png", "validation_0000004.png"]
    assert [row["step"] for row in read_metrics(out, having="loss")] == [1, 2], "the new run's records only"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not [name for name in files_to_upload(out, list(LOCAL_ONLY_PATTERNS)) if name.startswith("previous_run_")]


# ------------------------------------------------------------------------------------------------
# train_dreambooth.py's command line


@pytest.fixture(scope="module")
def variant_base(tmp_path_factory) -> Path:
    """A tiny base pipeline whose weights exist only as the "fp16" variant (diffusion_pytorch_model.fp16.safetensors),
    so that it loads only with --variant fp16."""
    from pipeline_latent_uncond import UnconditionalLatentPipeline
    from uldm.diffusion import build_noise_scheduler

    folder = tmp_path_factory.mktemp("base") / "pipeline"
    pipeline = UnconditionalLatentPipeline(unet=build_tiny_unet(), vae=build_tiny_kl_vae(),
                                           scheduler=build_noise_scheduler(), latent_scaling_factor=1.0)
    pipeline.save_pretrained(folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    return folder


def diffusers_dreambooth_command(base: Path, instance: Path, class_dir: Path, out: Path) -> list[str]:
    """diffusers' DreamBooth command with prior preservation (its README), prompts removed, scaled down, plus the
    flags of train_dreambooth.py that have a meaning here."""
    return [
        f"--pretrained_model_name_or_path={base}", f"--instance_data_dir={instance}", f"--class_data_dir={class_dir}",
        f"--output_dir={out}", "--with_prior_preservation", "--prior_loss_weight=1.0", "--resolution=32",
        "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=5e-6",
        "--lr_scheduler=polynomial", "--lr_power=2.0", "--lr_num_cycles=3", "--lr_warmup_steps=0",
        "--num_class_images=4", "--num_train_epochs=2", "--push_to_hub", "--hub_model_id=me/dreambooth-subject",
        "--gradient_checkpointing", "--set_grads_to_none", "--offset_noise", "--prior_generation_precision=bf16",
        "--variant=fp16", "--report_to=tensorboard", "--logging_dir=tb", "--local_rank=-1",
        "--enable_xformers_memory_efficient_attention", "--mixed_precision=no", "--validation_steps=5",
        "--num_validation_images=2", "--validation_scheduler=DPMSolverMultistepScheduler", "--checkpointing_steps=5",
        "--checkpoints_total_limit=1", "--seed=0", "--sample_batch_size=2", "--center_crop", "--snr_gamma=5.0",
        "--max_grad_norm=1.0", "--adam_beta1=0.9", "--adam_beta2=0.999", "--adam_weight_decay=1e-2",
        "--adam_epsilon=1e-08", "--dataloader_num_workers=0", "--allow_tf32",
        "--class_sampling_steps=2", "--validation_inference_steps=2",  # ours, for a short test
    ]


def test_a_diffusers_dreambooth_command_without_prompts_runs_with_its_flags(variant_base, tmp_path, monkeypatch,
                                                                            expect_input_error):
    from diffusers.optimization import get_scheduler

    from uldm.pipeline_loading import load_pipeline

    instance, class_dir, out = tmp_path / "me", tmp_path / "class", tmp_path / "dreambooth-me"
    make_blob_images(instance, 5, seed=3)
    command = diffusers_dreambooth_command(variant_base, instance, class_dir, out)
    without_variant = [arg for arg in command if not arg.startswith("--variant")]
    assert "Could not load the base model" in expect_input_error(run_script, DREAMBOOTH, without_variant)

    hub = FakeHub(monkeypatch)
    run_script(DREAMBOOTH, command)

    assert sorted(p.name for p in class_dir.iterdir()) == [f"generated_{i:06d}.png" for i in range(4)]
    # 5 instance photos, batch 1: 5 steps an epoch, 2 epochs (--num_train_epochs).
    rows = read_metrics(out, having="loss")
    assert [row["step"] for row in rows] == list(range(1, 11)) and all("prior_loss" in row for row in rows)
    # --lr_power: the polynomial schedule of diffusers' get_scheduler with power 2 (not the default 1).
    def schedule(power: float) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-6)
        scheduler = get_scheduler("polynomial", optimizer, num_warmup_steps=0, num_training_steps=10, power=power)
        values = []
        for _ in range(10):
            optimizer.step()
            scheduler.step()
            values.append(scheduler.get_last_lr()[0])
        return values
    assert [row["lr"] for row in rows] == pytest.approx(schedule(2.0), rel=1e-6)
    assert schedule(2.0)[3] != pytest.approx(schedule(1.0)[3], rel=1e-3)
    assert sorted(p.name for p in (out / "samples").glob("validation_*.png")) == [
        "validation_0000000.png", "validation_0000005.png", "validation_0000010.png"]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-10"]
    assert list((out / "tb").rglob("events.out.tfevents.*"))
    recorded = json.loads((out / "training_args.json").read_text())
    assert (recorded["offset_noise"], recorded["num_epochs"], recorded["validation_scheduler"]) == (
        0.1, 2, "dpmsolver++")

    tuned = load_pipeline(out)
    assert tuned(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    card = ModelCard.load(out / "README.md")
    assert "dreambooth" in card.data.tags and card.data.base_model is None, "a local base is named in the text only"
    assert 'from_pretrained("me/dreambooth-subject"' in card_usage(out)
    [upload] = hub.uploads
    assert upload["repo_id"] == "me/dreambooth-subject" and upload["message"] == "End of training"
    assert UNET_WEIGHTS in upload["files"] and "README.md" in upload["files"]
    assert not [name for name in upload["files"] if name.startswith(("checkpoint-", "tb/"))]


# ------------------------------------------------------------------------------------------------
# The Hub from a training run


def test_push_to_hub_uploads_the_result_after_each_model_save_and_at_the_end(few_images, tiny_vae_dir, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "faces-ldm"
    hub = FakeHub(monkeypatch)
    run_script(LATENT, latent_training_args(
        few_images, tiny_vae_dir, out, max_train_steps=None, num_epochs=2, save_model_epochs=1, cache_latents=True,
        checkpointing_steps=2, report_to="tensorboard", push_to_hub=True, hub_model_id="me/faces", hub_private_repo=True,
        hub_token="hf_test_token_123", license="cc-by-nc-4.0"))

    assert [upload["message"] for upload in hub.uploads] == ["Epoch 1", "End of training"]
    assert "model_index.json" in hub.uploads[0]["files"]
    assert all(repo == {"repo_id": "me/faces", "private": True, "exist_ok": True} for repo in hub.repos)
    assert hub.uploads[1]["files"] == sorted([
        "README.md", "card_validation_0000004.png", "loss_curve.png", "metrics.jsonl", "model_index.json",
        "pipeline_latent_uncond.py", "samples/validation_0000004.png", "scheduler/scheduler_config.json",
        "training_args.json", "unet/config.json", UNET_WEIGHTS, "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors"])
    assert (out / "checkpoint-4").is_dir() and (out / "latent_cache").is_dir() and (out / "logs").is_dir()
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "cc-by-nc-4.0"
    assert 'DiffusionPipeline.from_pretrained("me/faces", trust_remote_code=True)' in card_usage(out)
    assert json.loads((out / "training_args.json").read_text())["hub_token"] is None


def test_offline_a_run_with_push_to_hub_succeeds_and_says_how_to_upload(few_images, tiny_vae_dir, tmp_path, caplog):
    from huggingface_hub import constants

    assert constants.is_offline_mode()
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="uldm.hub"):
        run_script(LATENT, latent_training_args(few_images, tiny_vae_dir, out, max_train_steps=2, push_to_hub=True))
    assert (out / "model_index.json").is_file() and (out / UNET_WEIGHTS).is_file()
    failure = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failure) == 1 and "offline mode is on (HF_HUB_OFFLINE=1)" in failure[0]
    assert f"Everything is saved locally in {out}" in failure[0]
    assert failure[0].splitlines()[-1].strip().startswith(f"HF_HUB_OFFLINE=0 hf upload run {out} --repo-type model")


def test_train_vae_pushes_an_autoencoder_card_and_saves_every_epoch(few_images, tmp_path, monkeypatch):
    out = tmp_path / "vae"
    hub = FakeHub(monkeypatch)
    saves = keep_each_save(monkeypatch, VAE, tmp_path / "saves")
    run_script(VAE, [
        f"--train_data_dir={few_images}", "--model_config_name_or_path=tiny-kl-f4", "--resolution=32",
        "--num_holdout_images=2", "--num_validation_images=2", "--train_batch_size=3", "--num_train_epochs=2",
        "--save_model_epochs=1", "--save_images_epochs=1", "--validation_steps=0", "--checkpointing_steps=0",
        "--scale_estimation_images=6", "--report_to=none", "--push_to_hub", "--hub_model_id=me/vae", "--license=mit",
        f"--output_dir={out}"])

    # 6 training images, batch 3: 2 steps an epoch.
    assert sorted(p.name for p in (out / "samples").glob("reconstruction_*.png")) == [
        "reconstruction_0000000.png", "reconstruction_0000002.png", "reconstruction_0000004.png"]
    assert [save.name for save in saves] == ["save-1", "save-2"]
    assert [upload["message"] for upload in hub.uploads] == ["Epoch 1", "End of training"]
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(hub.uploads[1]["files"])
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag is None and card.data.tags == ["latent-diffusion", "autoencoder"]
    assert card.data.license == "mit"
    assert 'AutoencoderKL.from_pretrained("me/vae")' in card_usage(out)


# ------------------------------------------------------------------------------------------------
# Flags that need text, and --help

TAKES_NO_VALUE = {"train_text_encoder", "pre_compute_text_embeddings", "text_encoder_use_attention_mask",
                  "skip_save_text_encoder"}


def text_flag_argv(name: str) -> list[str]:
    return [f"--{name}"] if name in TAKES_NO_VALUE else [f"--{name}", "a photo of sks person"]


REQUIRED = {
    LATENT: ["--vae_name_or_path", "some/vae", "--train_data_dir", "data"],
    DREAMBOOTH: ["--pretrained_model_name_or_path", "some/base", "--instance_data_dir", "photos"],
    VAE: ["--train_data_dir", "data"],
}


@pytest.mark.parametrize("name", sorted(__import__("uldm.args", fromlist=["TEXT_ONLY_FLAGS"]).TEXT_ONLY_FLAGS))
def test_each_flag_that_needs_text_is_refused_with_why_and_what_to_do(name, tmp_path, expect_input_error):
    from uldm.args import TEXT_ONLY_FLAGS

    out = tmp_path / "out"
    error = expect_input_error(run_script, DREAMBOOTH, [*REQUIRED[DREAMBOOTH], "--output_dir", out, *text_flag_argv(name)])
    assert f"--{name} needs text, and this model takes none" in error
    assert "an unconditional model is trained and samples without a prompt" in error
    assert TEXT_ONLY_FLAGS[name] in error and "Remove it from the command line" in error
    assert not out.exists(), "refused before anything is written"


@pytest.mark.parametrize("script", [LATENT, VAE])
def test_the_other_trainers_refuse_text_flags_too_naming_all_of_them(script, tmp_path, expect_input_error):
    argv = [*REQUIRED[script], "--output_dir", tmp_path / "out", "--validation_prompt", "a face", "--caption_column",
            "text", "--train_text_encoder"]
    error = expect_input_error(run_script, script, argv)
    assert "--validation_prompt, --caption_column, --train_text_encoder need text" in error
    assert "Remove them" in error and "validation grids are drawn from fixed noise" in error


# diffusers' flags each trainer accepts, with a phrase of diffusers' own help text where --help must show it.
DIFFUSERS_HELP = {
    "--train_batch_size": "Batch size (per device) for the training dataloader.",
    "--eval_batch_size": "The number of images to generate for evaluation",
    "--save_images_epochs": "How often to save images during training",
    "--save_model_epochs": "How often to save the model during training",
    "--enable_xformers_memory_efficient_attention": "Whether or not to use xformers.",
    "--local_rank": "For distributed training: local_rank",
    "--push_to_hub": "Whether or not to push the model to the Hub.",
    "--hub_token": "The token to use to push to the Model Hub.",
    "--hub_model_id": "The name of the repository to keep in sync with the local `output_dir`.",
    "--hub_private_repo": "Whether or not to create a private repository.",
    "--lr_num_cycles": "Number of hard resets of the lr in cosine_with_restarts scheduler.",
    "--lr_power": "Power factor of the polynomial scheduler.",
    "--use_8bit_adam": "Whether or not to use 8-bit Adam from bitsandbytes",
    "--set_grads_to_none": "Save more memory by using setting grads to None instead of zero.",
    "--report_to": "The integration to report the results and logs to",
    "--logging_dir": "TensorBoard log directory",
    "--variant": "Variant of the model files of the pretrained model identifier from huggingface.co/models",
}
COMMON_FLAGS = [
    "--output_dir", "--overwrite_output_dir", "--seed", "--resolution", "--center_crop", "--train_batch_size",
    "--eval_batch_size", "--num_validation_images", "--dataloader_num_workers", "--num_epochs", "--num_train_epochs",
    "--max_train_steps", "--save_images_epochs", "--save_model_epochs", "--gradient_accumulation_steps",
    "--gradient_checkpointing", "--learning_rate", "--scale_lr", "--lr_scheduler", "--lr_warmup_steps",
    "--lr_num_cycles", "--lr_power", "--use_8bit_adam", "--adam_beta1", "--adam_beta2", "--adam_weight_decay",
    "--adam_epsilon", "--max_grad_norm", "--use_ema", "--ema_inv_gamma", "--ema_power", "--ema_max_decay",
    "--push_to_hub", "--hub_token", "--hub_model_id", "--hub_private_repo", "--logger", "--report_to",
    "--logging_dir", "--local_rank", "--mixed_precision", "--allow_tf32", "--ddpm_num_inference_steps",
    "--validation_steps", "--validation_scheduler", "--checkpointing_steps", "--checkpoints_total_limit",
    "--resume_from_checkpoint", "--enable_xformers_memory_efficient_attention", "--set_grads_to_none", "--revision",
    "--variant", "--instance_prompt", "--class_prompt", "--validation_prompt", "--train_text_encoder",
]
SCRIPT_FLAGS = {
    LATENT: ["--dataset_name", "--dataset_config_name", "--model_config_name_or_path", "--train_data_dir",
             "--cache_dir", "--random_flip", "--prediction_type", "--ddpm_num_steps", "--ddpm_beta_schedule",
             "--offset_noise", "--snr_gamma", "--pretrained_model_name_or_path"],
    DREAMBOOTH: ["--pretrained_model_name_or_path", "--instance_data_dir", "--class_data_dir",
                 "--with_prior_preservation", "--prior_loss_weight", "--num_class_images", "--sample_batch_size",
                 "--prior_generation_precision", "--offset_noise", "--snr_gamma"],
    VAE: ["--dataset_name", "--dataset_config_name", "--model_config_name_or_path", "--train_data_dir", "--cache_dir",
          "--random_flip"],
}


@pytest.mark.parametrize("script", [LATENT, DREAMBOOTH, VAE])
def test_help_shows_diffusers_flags_in_diffusers_words(script, capsys):
    with pytest.raises(SystemExit) as stop:
        run_script(script, ["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    shown = set(text.replace(",", " ").replace("=", " ").split())
    missing = [flag for flag in COMMON_FLAGS + SCRIPT_FLAGS[script] if flag not in shown]
    assert not missing, f"--help of {script} lacks {missing}"
    squeezed = "".join(text.split())  # argparse wraps lines (also at hyphens)
    unsaid = [flag for flag, words in DIFFUSERS_HELP.items() if "".join(words.split()) not in squeezed]
    assert not unsaid, f"--help of {script} does not say what diffusers says for {unsaid}"


# ------------------------------------------------------------------------------------------------
# The meaning of single flags


def parsed(script: str, *argv):
    import importlib

    return importlib.import_module(script).parse_args([*REQUIRED[script], "--output_dir", "out", *map(str, argv)])


def test_diffusers_names_reach_the_configs_with_their_meaning(monkeypatch):
    import types

    from uldm.args import hub_config, training_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))  # --use_8bit_adam checks it
    args = parsed(DREAMBOOTH, "--num_train_epochs", 3, "--lr_num_cycles", 4, "--lr_power", 2.5, "--use_8bit_adam",
                  "--logging_dir", "tb", "--overwrite_output_dir", "--validation_scheduler", "DDPMScheduler")
    config = training_config(args)
    assert (config.loop.num_epochs, config.loop.logging_dir, config.loop.overwrite_output_dir) == (3, "tb", True)
    assert (config.optimizer.lr_num_cycles, config.optimizer.lr_power, config.optimizer.use_8bit_adam) == (4, 2.5, True)
    assert args.validation_scheduler == "ddpm"
    latent = parsed(LATENT, "--logger", "wandb", "--eval_batch_size", 8, "--ddpm_num_inference_steps", 1000)
    assert (latent.report_to, latent.num_validation_images, latent.validation_inference_steps) == ("wandb", 8, 1000)
    assert hub_config(latent).report_to == "wandb"
    assert parsed(LATENT).offset_noise == 0.0 and parsed(LATENT, "--offset_noise").offset_noise == 0.1
    assert parsed(LATENT, "--offset_noise", 0.05).offset_noise == 0.05
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert parsed(VAE, "--local_rank", 0).local_rank == 3, "diffusers' rule: the launcher's LOCAL_RANK wins"


def test_logger_wandb_with_a_token_on_the_command_line_is_refused():
    from uldm.errors import InputError

    with pytest.raises(InputError, match="You cannot use both --report_to=wandb and --hub_token"):
        parsed(LATENT, "--logger", "wandb", "--push_to_hub", "--hub_token", "hf_x")


def test_an_unknown_validation_scheduler_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        parsed(LATENT, "--validation_scheduler", "PNDMScheduler")
    assert "unknown sampler 'PNDMScheduler'" in capsys.readouterr().err


def test_8bit_adam_without_bitsandbytes_says_what_to_do(few_images, tiny_vae_dir, tmp_path, expect_input_error):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    error = expect_input_error(run_script, LATENT, latent_training_args(few_images, tiny_vae_dir, tmp_path / "o",
                                                                        use_8bit_adam=True))
    assert "--use_8bit_adam needs bitsandbytes" in error and "pip install bitsandbytes" in error


def test_8bit_adam_without_bitsandbytes_is_refused_before_dreambooth_generates_class_images(
        variant_base, tmp_path, expect_input_error):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    instance, class_dir, out = tmp_path / "me", tmp_path / "class", tmp_path / "dreambooth-me"
    make_blob_images(instance, 2, seed=3)
    command = [*diffusers_dreambooth_command(variant_base, instance, class_dir, out), "--use_8bit_adam"]
    assert "--use_8bit_adam needs bitsandbytes" in expect_input_error(run_script, DREAMBOOTH, command)
    assert not class_dir.exists() and not out.exists(), "nothing generated or written before the refusal"


def test_offset_noise_adds_a_constant_per_sample_and_channel_and_keeps_the_timesteps():
    from uldm.diffusion import LossConfig, build_noise_scheduler, noisy_latents_and_target

    scheduler = build_noise_scheduler()
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    _, steps, plain = noisy_latents_and_target(scheduler, latents, torch.Generator().manual_seed(0))
    noisy, steps_offset, target = noisy_latents_and_target(scheduler, latents, torch.Generator().manual_seed(0),
                                                            LossConfig(offset_noise=0.1))
    assert torch.equal(steps, steps_offset)
    offset = target - plain  # epsilon prediction: the target is the noise
    assert offset.abs().max() > 0.01
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-6), "constant over each channel"
    assert torch.allclose(offset[:, :, 0, 0].std(), torch.tensor(0.1), rtol=0.8)
    assert torch.allclose(noisy, scheduler.add_noise(latents, target, steps))


def test_prior_generation_precision_overrides_the_runs_autocast():
    from uldm.sampling import sampling_autocast

    class Run:  # what sampling_autocast needs of an Accelerator
        device = torch.device("cpu")

        @staticmethod
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with sampling_autocast(Run, None):
        assert (a @ b).dtype == torch.bfloat16, "default: the run's mixed precision"
    with Run.autocast(), sampling_autocast(Run, "fp32"):
        assert (a @ b).dtype == torch.float32
    with sampling_autocast(Run, "fp16"):
        assert (a @ b).dtype == torch.float16

