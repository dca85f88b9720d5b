"""Shared fixtures: tiny models built in code from the repository's presets, generated images.

Nothing here downloads anything; every model is randomly initialised from configs/.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Keep the test-suite inside its 2-core budget and away from the network: the hub is never contacted,
# whatever the caller's environment says (tests of "hub id unreachable" messages rely on this).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def build_tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DModel

    from uldm.presets import read_json_preset

    torch.manual_seed(seed)
    return UNet2DModel(**{**read_json_preset("tiny", "unet"), **overrides})


def build_tiny_kl_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    from uldm.presets import read_json_preset

    torch.manual_seed(seed)
    return AutoencoderKL(**{**read_json_preset("tiny-kl-f4", "vae"), **overrides})


def build_tiny_vq_vae(seed: int = 0):
    """A VQModel shaped like CompVis VQ-f4 (3 latent channels, f4), but tiny."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=64,
        vq_embed_dim=3,
        norm_num_groups=8,
        sample_size=32,
    )


def build_pooling_autoencoder(scaling_factor: float = 3.0, shift_factor: float = 0.35):
    """An AutoencoderTiny (f4, 4 latent channels) set by hand, not trained: the latents are the image averaged
    over 4x4 pixels (RGB in [0, 1], the 4th channel 0), and decoding repeats each latent pixel 4x4 times.
    Unlike a random VAE, its decoded images are the model's latents seen directly, so a model that learns
    the data makes samples that look like the (blocky) training images."""
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny(encoder_block_out_channels=(4, 4, 4), decoder_block_out_channels=(4, 4, 4),
                          num_encoder_blocks=(0, 0, 0), num_decoder_blocks=(0, 0, 0), latent_channels=4,
                          upsampling_scaling_factor=2, scaling_factor=scaling_factor, shift_factor=shift_factor)
    with torch.no_grad():
        for conv in [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]:
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
            channels = min(conv.in_channels, conv.out_channels, 3)
            if conv.stride == (2, 2):  # the 2x2 block under each output pixel, averaged
                for c in range(channels):
                    conv.weight[c, c, 1:, 1:] = 0.25
            else:
                for c in range(channels):
                    conv.weight[c, c, 1, 1] = 1.0
    return vae


def make_blob_images(folder: Path, count: int, size: int = 32, seed: int = 0) -> list[Path]:
    """Simple, learnable images: a coloured disc at a random place on a plain background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for index in range(count):
        background = rng.integers(0, 80, size=3)
        colour = rng.integers(150, 256, size=3)
        cy, cx = rng.uniform(0.3, 0.7, size=2) * size
        radius = rng.uniform(0.15, 0.3) * size
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        pixels = np.where(inside[..., None], colour, background).astype(np.uint8)
        path = folder / f"img_{index:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Running the scripts


def run_script(module_name: str, argv: list[str]):
    """Run a top-level script's main() in this process (much faster than a subprocess)."""
    from uldm.testing import run_script_in_this_process

    return run_script_in_this_process(module_name, argv)


def to_argv(options: dict) -> list[str]:
    """Command-line arguments from {name: value}: True is a bare flag, None and False are left out."""
    argv = []
    for key, value in options.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def latent_training_args(images, vae_dir, output_dir, **overrides) -> list[str]:
    """Command-line arguments for a short train_unconditional_latent.py run on the tiny presets.

    An override of None leaves that option out (the script's default applies)."""
    options = {
        "train_data_dir": images,
        "vae_name_or_path": vae_dir,
        "model_config_name_or_path": "tiny",
        "resolution": 32,
        "train_batch_size": 4,
        "max_train_steps": 12,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "validation_steps": 0,
        "num_validation_images": 4,
        "validation_inference_steps": 3,
        "checkpointing_steps": 0,
        "report_to": "none",
        "output_dir": output_dir,
    }
    return to_argv({**options, **overrides})


def strip_checksums(checkpoint: Path) -> None:
    """Make a checkpoint look like one written before checksums were recorded (of its files and of its state)."""
    state_file = checkpoint / "training_state.json"
    state = json.loads(state_file.read_text())
    del state["files"], state["state_sha256"]
    state_file.write_text(json.dumps(state))


def make_command_recorder(bin_dir: Path, record: Path, names=("accelerate",)) -> Path:
    """A stand-in executable that appends its command line (without the program) as one JSON line to `record`,
    also linked under each of `names` in `bin_dir`: put `bin_dir` first on PATH. Returns the stand-in."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "record"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    for name in names:
        (bin_dir / name).symlink_to(fake)
    return fake


def path_with(folder: Path) -> str:
    """$PATH with `folder` in front."""
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "ACCELERATE_USE_CPU": "1"})
    env.update({key: str(value) for key, value in extra.items()})
    return env


def free_port() -> int:
    """A TCP port nobody listens on now (so torchrun runs of parallel test sessions never meet)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script: str | Path, *arguments, processes: int = 2, launcher: tuple = ()) -> list[str]:
    """`torchrun --nproc_per_node N --master_port <free> [launcher options] script ...`; with ACCELERATE_USE_CPU=1
    (subprocess_env) the processes join as accelerate's MULTI_CPU (gloo)."""
    return [venv_bin("torchrun"), "--nproc_per_node", str(processes), "--master_port", str(free_port()),
            *launcher, str(script), *map(str, arguments)]


def walk_with_snapshots(unet, snapshot_dir: Path, steps: int, step_size: float, snapshot_steps: int = 5):
    """'Training' without data: `steps` seeded random-walk steps of the UNet's weights, tracked by post-hoc EMA with
    a snapshot every `snapshot_steps` steps into `snapshot_dir`. Returns the tracker."""
    from uldm.training.posthoc_ema import PowerFunctionEMA

    tracker = PowerFunctionEMA(unet, snapshot_dir=snapshot_dir, snapshot_steps=snapshot_steps)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=step_size)
        tracker.step(unet.parameters(), step)
    return tracker


def venv_bin(name: str) -> str:
    """A console script of the interpreter running the tests (accelerate, torchrun)."""
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny-kl"
    build_tiny_kl_vae().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def pooling_vae_dir(tmp_path_factory):
    """`build_pooling_autoencoder` saved: a first stage whose latents are the images themselves, downscaled (FID
    of a model trained on it means something)."""
    folder = tmp_path_factory.mktemp("pooling-vae") / "vae"
    build_pooling_autoencoder().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def train_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train") / "images"
    make_blob_images(folder, 24)
    return folder


# --------------------------------------------------------------------------------------------
# Repeated tricks


class FakeHub:
    """Stands in for the Hub (tests/test_hub.py, trainer runs with --push_to_hub): records create_repo and
    upload_folder calls; upload_folder selects the files the way huggingface_hub's does (filter_repo_objects
    over the folder, relative POSIX paths) and records their SHA-256 at the time of the upload."""

    def __init__(self, monkeypatch, namespace: str = "someone", fail_with: Exception | None = None):
        self.namespace, self.fail_with = namespace, fail_with
        self.repos, self.uploads = [], []
        self.release = threading.Event()
        self.release.set()
        hub = self
        from huggingface_hub import HfApi, RepoUrl, constants
        from huggingface_hub.utils import filter_repo_objects

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            hub.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
            full = repo_id if "/" in repo_id else f"{hub.namespace}/{repo_id}"
            return RepoUrl(f"https://huggingface.co/{full}")

        def upload_folder(api, *, repo_id, folder_path, commit_message=None, allow_patterns=None,
                          ignore_patterns=None, **kwargs):
            hub.release.wait(timeout=30)
            if hub.fail_with is not None:
                raise hub.fail_with
            root = Path(folder_path)
            names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            files = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
            digests = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in files}
            hub.uploads.append({"repo_id": repo_id, "message": commit_message, "files": files, "digests": digests,
                                **kwargs})
            return f"https://huggingface.co/{repo_id}/commit/{len(hub.uploads)}"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)



@pytest.fixture
def expect_input_error(capsys):
    """`expect_input_error(run, *args)` calls `run(*args)`, asserts that it stops the way every script stops on bad
    input (a message, exit code 2) and returns what it printed to stderr."""

    def check(run, *args, **kwargs) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            run(*args, **kwargs)
        assert stop.value.code == 2, f"exit code {stop.value.code!r}, not 2"
        return capsys.readouterr().err

    return check


@pytest.fixture
def sigterm_after_step(monkeypatch):
    """`sigterm_after_step(N)`: the next training run receives a real SIGTERM right after logging step N (the
    loop then stops at the next step boundary with a checkpoint, as on pre-emption)."""
    import signal

    import uldm.training

    original_log = uldm.training.MetricsWriter.log

    def arm(stop_after: int) -> None:
        def log_then_signal(self, values, step: int):
            original_log(self, values, step=step)
            if step == stop_after and "loss" in values:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(uldm.training.MetricsWriter, "log", log_then_signal)

    yield arm
    monkeypatch.setattr(uldm.training.MetricsWriter, "log", original_log)
