"""uldm.hub and uldm.model_card: what goes up to the Hub, what stays local, what happens when the Hub
cannot be reached, and the model card's metadata. Offline: huggingface_hub's calls are replaced."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants

from uldm.args import add_hub_args, hub_config
from uldm.errors import InputError
from uldm.hub import HubUploader, check_hub_config, files_to_upload, public_arguments, retry_command
from uldm.model_card import write_model_card

from conftest import FakeHub

# What a run writes into --output_dir (train_unconditional_latent.py, after resuming once, with EMA
# snapshots, the latent cache and TensorBoard logs), and what of it belongs on the model page.
SHARED = [
    "README.md", "card_validation_0000200.png", "loss_curve.png", "metrics.jsonl", "model_index.json",
    "pipeline_latent_uncond.py", "samples/validation_0000100.png", "samples/validation_0000200.png",
    "samples/validation_metrics.jsonl", "scheduler/scheduler_config.json", "training_args.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
LOCAL_ONLY = [
    "checkpoint-100/model.safetensors", "checkpoint-100/optimizer.bin", "checkpoint-100/random_states_0.pkl",
    "checkpoint-100/training_state.json", "checkpoint-100/training_args.json", "checkpoint-100/README.md",
    ".tmp-checkpoint-200/model.safetensors", ".tmp-checkpoint-200/training_state.json",
    "logs/train_unconditional_latent/events.out.tfevents.1700000000.host.1.0",
    "latent_cache/meta.json", "latent_cache/part-00000/mean.npy", "latent_cache/part-00000/done",
    "latent_cache/part-00001/mean.tmp.npy",
    "ema_snapshots/epoch-0002/unet/diffusion_pytorch_model.safetensors", "ema_snapshots/epoch-0002/model_index.json",
    "samples/.validation_0000300.png.4242.tmp", "training_state.json.tmp", ".DS_Store",
    "samples/.ipynb_checkpoints/validation_0000100-checkpoint.png",
    "__pycache__/pipeline_latent_uncond.cpython-312.pyc",
]


def make_output_folder(root: Path, names: list[str]) -> Path:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": name}) if name.endswith(".json") else f"content of {name}\n")
    return root


def folder_state(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_args(output_dir, *argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default=str(output_dir))
    parser.add_argument("--report_to", default="tensorboard")
    parser.add_argument("--latent_cache_dir", default=None)
    add_hub_args(parser)
    return parser.parse_args([str(a) for a in argv])


def run_config(output_dir, *argv):
    """The HubConfig of a run with these arguments (built the way the trainers build it)."""
    return hub_config(run_args(output_dir, *argv))


# -- flags and checks -------------------------------------------------------------------------------


def test_hub_flags_are_diffusers_flags_with_their_help(tmp_path):
    parser = argparse.ArgumentParser()
    add_hub_args(parser)
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["push_to_hub"] == "Whether or not to push the model to the Hub."
    assert helps["hub_token"] == "The token to use to push to the Model Hub."
    assert helps["hub_model_id"] == "The name of the repository to keep in sync with the local `output_dir`."
    assert helps["hub_private_repo"] == "Whether or not to create a private repository."
    args = parser.parse_args(["--push_to_hub", "--hub_model_id", "me/faces", "--hub_private_repo"])
    assert (args.push_to_hub, args.hub_model_id, args.hub_token, args.hub_private_repo) == (True, "me/faces", None, True)
    assert parser.parse_args([]).push_to_hub is False


@pytest.mark.parametrize("report_to", ["wandb", "tensorboard,wandb"])
def test_a_token_on_the_command_line_is_refused_with_wandb(tmp_path, report_to):
    config = run_config(tmp_path / "out", "--push_to_hub", "--hub_token", "hf_secret", "--report_to", report_to)
    with pytest.raises(InputError, match="hf auth login") as error:
        check_hub_config(config)
    assert "wandb records every command-line argument" in str(error.value)
    check_hub_config(run_config(tmp_path / "out", "--push_to_hub", "--hub_token", "hf_secret"))  # tensorboard: fine
    check_hub_config(run_config(tmp_path / "out", "--push_to_hub", "--report_to", report_to))  # logged in: fine


def test_an_output_folder_name_that_cannot_be_a_repository_needs_hub_model_id(tmp_path):
    with pytest.raises(InputError, match="--hub_model_id NAME"):
        check_hub_config(run_config(tmp_path / "my faces!", "--push_to_hub"))
    with pytest.raises(InputError, match="^--hub_model_id is not a valid"):
        check_hub_config(run_config(tmp_path / "out", "--push_to_hub", "--hub_model_id", "a/b/c"))
    check_hub_config(run_config(tmp_path / "my faces!", "--push_to_hub", "--hub_model_id", "me/faces"))
    check_hub_config(run_config(tmp_path / "my faces!"))  # nothing to push: nothing to check


def test_hub_flags_without_push_to_hub_are_named_in_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="uldm.hub"):
        check_hub_config(run_config(tmp_path / "out", "--hub_model_id", "me/faces", "--hub_private_repo"))
    assert "--hub_model_id, --hub_private_repo given without --push_to_hub" in caplog.text


def test_public_arguments_never_hold_the_token(tmp_path):
    args = run_args(tmp_path / "out", "--push_to_hub", "--hub_token", "hf_secret")
    public = public_arguments(args)
    assert public["hub_token"] is None and public["push_to_hub"] is True
    assert args.hub_token == "hf_secret", "the namespace itself is left alone"


# -- what goes up -----------------------------------------------------------------------------------


def test_the_output_folder_goes_up_without_checkpoints_logs_cache_snapshots_or_temporary_files(tmp_path, monkeypatch):
    out = make_output_folder(tmp_path / "ffhq256-ldm", SHARED + LOCAL_ONLY)
    before = folder_state(out)
    hub = FakeHub(monkeypatch)
    uploader = HubUploader.from_config(run_config(out, "--push_to_hub", "--hub_private_repo"))
    assert uploader.upload_and_wait() is True

    assert [upload["files"] for upload in hub.uploads] == [sorted(SHARED)]
    assert hub.uploads[0]["repo_id"] == "someone/ffhq256-ldm", "diffusers' default: the output folder's name"
    assert hub.uploads[0]["message"] == "End of training"
    assert all(repo == {"repo_id": "ffhq256-ldm", "private": True, "exist_ok": True} for repo in hub.repos)
    assert files_to_upload(out, uploader.ignore_patterns) == sorted(SHARED)
    assert folder_state(out) == before
    assert uploader.location == "someone/ffhq256-ldm", "the card can name the repository with its namespace"


@pytest.mark.parametrize("result", [
    ["adapter_config.json", "adapter_model.safetensors"],  # DreamBooth --use_lora (peft layout)
    ["pytorch_lora_weights.safetensors"],                   # diffusers' LoRA layout
    ["config.json", "diffusion_pytorch_model.safetensors", "reconstructions.png",
     "samples/reconstruction_0000050.png"],                 # train_vae.py
])
def test_adapters_and_vaes_go_up_with_their_card(tmp_path, monkeypatch, result):
    common = ["README.md", "loss_curve.png", "training_args.json", "metrics.jsonl"]
    out = make_output_folder(tmp_path / "run", common + result + LOCAL_ONLY)
    hub = FakeHub(monkeypatch)
    assert HubUploader.from_config(run_config(out, "--push_to_hub", "--hub_model_id", "me/run")).upload_and_wait()
    assert hub.uploads[0]["files"] == sorted(common + result)
    assert hub.uploads[0]["repo_id"] == "me/run"


def test_folders_of_the_run_inside_the_output_folder_stay_local_wherever_they_are(tmp_path, monkeypatch):
    out = tmp_path / "run"
    shared = ["README.md", "model_index.json", "unet/config.json", "cache_notes.txt"]
    local = ["tb/events.out.tfevents.1", "cache/latents/meta.json", "class_images/00001.png"]
    make_output_folder(out, shared + local)
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir")
    parser.add_argument("--logging_dir", default="logs")
    parser.add_argument("--latent_cache_dir")
    parser.add_argument("--class_data_dir")
    add_hub_args(parser)
    config = hub_config(parser.parse_args(["--output_dir", str(out), "--push_to_hub", "--logging_dir", "tb",
                                           "--latent_cache_dir", str(out / "cache" / "latents"),
                                           "--class_data_dir", str(out / "class_images")]))
    hub = FakeHub(monkeypatch)
    assert HubUploader.from_config(config).upload_and_wait()
    assert hub.uploads[0]["files"] == sorted(shared)

    # Folders outside the output folder add no pattern (and do not exclude look-alikes inside it).
    elsewhere = hub_config(parser.parse_args(["--output_dir", str(out), "--latent_cache_dir", str(tmp_path / "cache"),
                                              "--class_data_dir", str(tmp_path / "class_images")]))
    assert elsewhere.ignore_patterns == hub_config(parser.parse_args(["--output_dir", str(out)])).ignore_patterns


def test_relative_folders_of_the_run_are_found_from_the_working_directory(tmp_path, monkeypatch):
    """--latent_cache_dir and --class_data_dir are relative to where the command runs (--logging_dir to the
    output folder, as in diffusers)."""
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    for name in ("--output_dir", "--logging_dir", "--latent_cache_dir", "--class_data_dir"):
        parser.add_argument(name)
    add_hub_args(parser)
    config = hub_config(parser.parse_args(["--output_dir", "outputs/run", "--logging_dir", "tb",
                                           "--latent_cache_dir", "outputs/run/cache", "--class_data_dir", "class"]))
    assert config.ignore_patterns[-2:] == ["tb/*", "cache/*"]


def test_only_the_main_process_uploads(tmp_path, monkeypatch):
    out = make_output_folder(tmp_path / "run", SHARED)
    hub = FakeHub(monkeypatch)
    uploader = HubUploader.from_config(run_config(out, "--push_to_hub"), is_main_process=False)
    assert uploader.upload_in_background("Epoch 2") is None
    assert uploader.upload_and_wait() is False
    assert hub.repos == [] and hub.uploads == []
    off = HubUploader.from_config(run_config(out), is_main_process=True)  # no --push_to_hub
    assert off.upload_and_wait() is False and hub.uploads == []


def test_intermediate_uploads_run_in_the_background_and_the_final_one_waits_for_them(tmp_path, monkeypatch):
    out = make_output_folder(tmp_path / "run", SHARED)
    hub = FakeHub(monkeypatch)
    uploader = HubUploader.from_config(run_config(out, "--push_to_hub"))
    hub.release.clear()  # the network is slow: the first upload does not finish ...
    first = uploader.upload_in_background("Epoch 2")
    assert first is not None and not first.done(), "training goes on while it uploads"
    assert uploader.upload_in_background("Epoch 4") is None, "... so the next save does not queue another"
    hub.release.set()
    first.result(timeout=30)
    assert uploader.upload_in_background("Epoch 6").result(timeout=30)
    assert uploader.upload_and_wait() is True
    assert [upload["message"] for upload in hub.uploads] == ["Epoch 2", "Epoch 6", "End of training"]


def test_a_failed_background_upload_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
    out = make_output_folder(tmp_path / "run", SHARED)
    hub = FakeHub(monkeypatch, fail_with=ConnectionError("network is unreachable"))
    uploader = HubUploader.from_config(run_config(out, "--push_to_hub"))
    with caplog.at_level(logging.INFO, logger="uldm.hub"):
        future = uploader.upload_in_background("Epoch 2")
        concurrent_wait(future)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not be reached" in warnings[0] and "tried again" in warnings[0]
    hub.fail_with = None
    assert uploader.upload_and_wait() is True and hub.uploads[0]["files"] == sorted(SHARED)


def concurrent_wait(future) -> None:
    import concurrent.futures

    concurrent.futures.wait([future], timeout=30)
    assert future.done()


# -- the Hub out of reach ----------------------------------------------------------------------------


def test_offline_the_run_keeps_everything_and_one_message_says_how_to_upload(tmp_path, caplog):
    assert constants.is_offline_mode(), "tests/conftest.py sets HF_HUB_OFFLINE=1"
    out = make_output_folder(tmp_path / "ffhq256-ldm", SHARED + LOCAL_ONLY)
    before = folder_state(out)
    with caplog.at_level(logging.INFO, logger="uldm.hub"):
        uploader = HubUploader.from_config(run_config(out, "--push_to_hub", "--hub_model_id", "me/faces"))
        assert uploader.upload_in_background("Epoch 2") is None, "offline: nothing is tried during the run"
        start_messages = len(caplog.records)
        assert uploader.upload_and_wait() is False
    assert folder_state(out) == before
    final = [r for r in caplog.records[start_messages:] if r.levelno >= logging.WARNING]
    assert len(final) == 1, [r.getMessage() for r in final]
    message = final[0].getMessage()
    assert "failed: offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert f"Everything is saved locally in {out}" in message
    assert "Traceback" not in caplog.text and final[0].exc_info is None
    command = message.splitlines()[-1].strip()
    assert command.startswith(f"HF_HUB_OFFLINE=0 hf upload me/faces {out} --repo-type model --exclude 'checkpoint-*'")
    assert command == retry_command("me/faces", out, uploader.ignore_patterns, offline=True)


def http_error(status: int, text: str):
    from huggingface_hub.errors import HfHubHTTPError

    try:  # the HTTP client of huggingface_hub 2.x, else 1.x
        import httpx2 as httpx
    except ImportError:
        import httpx
    response = httpx.Response(status, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    return HfHubHTTPError(f"{status} Client Error", response=response, server_message=text)


@pytest.mark.parametrize("error, reason", [
    (http_error(401, "Invalid credentials in Authorization header"), "the Hub refused the token (HTTP 401"),
    (http_error(403, "You don't have the rights to create a model under the namespace"), "may not write"),
    (http_error(500, "Internal Error"), "the Hub answered HTTP 500: Internal Error"),
    (TimeoutError("timed out"), "the Hub could not be reached (TimeoutError: timed out)"),
])
def test_hub_errors_are_one_message_with_the_reason_and_the_retry_command(tmp_path, monkeypatch, caplog, error, reason):
    out = make_output_folder(tmp_path / "run", SHARED)
    FakeHub(monkeypatch, fail_with=error)
    uploader = HubUploader(repo_id="me/run", output_dir=out, private=True)
    with caplog.at_level(logging.WARNING, logger="uldm.hub"):
        assert uploader.upload_and_wait() is False
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert reason in message and "Traceback" not in message
    assert message.splitlines()[-1].strip() == retry_command("me/run", out, uploader.ignore_patterns, private=True)
    assert message.splitlines()[-1].strip().endswith("--private")


def test_the_retry_command_uploads_the_same_files_with_the_hf_command_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from huggingface_hub.cli.hf import app

    out = make_output_folder(tmp_path / "run", SHARED + LOCAL_ONLY)
    uploader = HubUploader(repo_id="me/run", output_dir=out)
    argv = shlex.split(retry_command("me/run", out, uploader.ignore_patterns))
    assert argv[:2] == ["hf", "upload"]
    hub = FakeHub(monkeypatch)
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    assert hub.uploads[0]["files"] == sorted(SHARED)


def test_a_file_that_holds_the_token_is_never_uploaded(tmp_path, monkeypatch, caplog):
    out = make_output_folder(tmp_path / "run", SHARED)
    (out / "training_args.json").write_text(json.dumps({"hub_token": "hf_secret_123"}))
    hub = FakeHub(monkeypatch)
    uploader = HubUploader(repo_id="me/run", output_dir=out, token="hf_secret_123")
    with caplog.at_level(logging.WARNING, logger="uldm.hub"):
        assert uploader.upload_and_wait() is False
    assert hub.uploads == []
    assert "training_args.json contains the Hub token" in caplog.text
    assert "hf_secret_123" not in caplog.text


# -- the model card -----------------------------------------------------------------------------------


def card_args(**values) -> dict:
    """A run's arguments as the trainers pass them to the card (uldm.args.training_config: no secrets)."""
    return public_arguments(argparse.Namespace(**{"resolution": 32, "learning_rate": 1e-4, "hub_token": None, **values}))


def test_the_card_metadata_parses_with_huggingface_hub(tmp_path):
    from PIL import Image

    out = tmp_path / "dreambooth-me"
    out.mkdir()
    grid = tmp_path / "grid.png"
    Image.new("RGB", (8, 8)).save(grid)
    path = write_model_card(out, "DreamBooth", "A fine-tune.", card_args(hub_token="hf_secret"),
                            {"Samples": grid}, {"steps": 30}, None,
                            tags=["dreambooth", "lora"], base_model="someone/ffhq256-ldm", license="cc-by-nc-sa-4.0",
                            location="me/dreambooth-me")
    card = ModelCard.load(path)
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.tags == ["latent-diffusion", "unconditional-image-generation", "dreambooth", "lora"]
    assert card.data.base_model == "someone/ffhq256-ldm"
    assert card.data.license == "cc-by-nc-sa-4.0"
    text = path.read_text()
    assert text.startswith("---\n") and "\n---\n\n# DreamBooth\n\nA fine-tune.\n\n**Samples**\n\n![Samples](card_grid.png)" in text
    assert (out / "card_grid.png").is_file()
    assert "| steps | 30 |" in text
    assert 'DiffusionPipeline.from_pretrained("me/dreambooth-me", trust_remote_code=True)' in text
    arguments = json.loads(text.split("```json\n")[1].split("```")[0])
    assert arguments == {"resolution": 32, "learning_rate": 1e-4, "hub_token": None}
    assert "hf_secret" not in text


def test_the_card_keeps_its_old_call_and_look(tmp_path):
    out = tmp_path / "ffhq256-ldm"
    out.mkdir()
    path = write_model_card(out, title="Unconditional latent diffusion model", summary="A UNet.", arguments=card_args(),
                            images={"Samples": None, "Loss": out / "loss_curve.png"}, facts={"steps": 3})
    text = path.read_text()
    assert text.split("---\n")[1] == (
        "library_name: diffusers\npipeline_tag: unconditional-image-generation\n"
        "tags:\n- latent-diffusion\n- unconditional-image-generation\n")
    assert "\n# Unconditional latent diffusion model\n\nA UNet.\n\n## Facts\n" in text, "missing images are left out"
    assert 'from_pretrained("ffhq256-ldm", trust_remote_code=True)' in text
    card = ModelCard.load(path)
    assert card.data.base_model is None and card.data.license is None


def test_a_local_base_model_stays_out_of_the_metadata_and_a_vae_card_has_no_pipeline_tag(tmp_path):
    base = tmp_path / "outputs" / "ffhq256-seed"
    base.mkdir(parents=True)
    out = tmp_path / "vae"
    out.mkdir()
    card = ModelCard.load(write_model_card(out, "VAE", "An autoencoder.", card_args(), base_model=str(base),
                                           pipeline_tag=None, tags=["autoencoder"]))
    assert card.data.base_model is None, "the Hub only takes ids of models on the Hub"
    assert card.data.pipeline_tag is None
    assert card.data.tags == ["latent-diffusion", "autoencoder"]
