"""sample.py and uldm/sampling.py: exact image counts, same pixels for 1 or 2 processes, resume, npz."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image

import sample as sample_script
from conftest import REPO_ROOT, build_tiny_kl_vae, build_tiny_unet, subprocess_env, venv_bin
from pipeline_latent_uncond import UnconditionalLatentPipeline
from uldm.diffusion import build_noise_scheduler
from uldm.pipeline_loading import load_pipeline
from uldm.sampling import (
    SCHEDULER_NAMES,
    generators_for_indices,
    make_image_grid,
    make_scheduler,
    missing_indices,
    sample_file_name,
    save_samples_npz,
)
from uldm.errors import InputError
from uldm.testing import reset_accelerate_state

NUM_IMAGES = 6
SAMPLE_ARGS = ["--num_images", str(NUM_IMAGES), "--num_inference_steps", "2", "--batch_size", "2",
               "--scheduler", "ddpm", "--seed", "7"]  # ddpm: every step draws noise from the per-image generators


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "tiny"
    pipeline = UnconditionalLatentPipeline(
        unet=build_tiny_unet(), vae=build_tiny_kl_vae(), latent_scaling_factor=0.18215,
        scheduler=build_noise_scheduler(),
    )
    pipeline.save_pretrained(folder)
    return folder


def sampler_command(pipeline: Path, output_dir: Path, *extra: str) -> list[str]:
    return [str(pipeline), "--output_dir", str(output_dir), *SAMPLE_ARGS, *extra]


def run_sampler_here(pipeline: Path, output_dir: Path, *extra: str) -> None:
    """sample.py's main() in this process: plain, single-process use (saves a slow interpreter start)."""
    # accelerate keeps process-wide state; start and leave it clean, as accelerate's own tests do.
    reset_accelerate_state()
    try:
        sample_script.main(sampler_command(pipeline, output_dir, *extra))
    finally:
        reset_accelerate_state()


def run_sampler_with_torchrun(pipeline: Path, output_dir: Path, *extra: str, processes: int = 2) -> None:
    command = [venv_bin("torchrun"), "--standalone", f"--nproc_per_node={processes}", str(REPO_ROOT / "sample.py"),
               *sampler_command(pipeline, output_dir, *extra)]
    result = subprocess.run(command, cwd=output_dir.parent, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def read_pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / sample_file_name(i))) for i in range(NUM_IMAGES)])


@pytest.fixture(scope="module")
def one_process_run(saved_pipeline, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("samples") / "one-process"
    run_sampler_here(saved_pipeline, output_dir, "--save_npz", "--save_grid", "--grid_rows", "2")
    return output_dir


def test_writes_exactly_the_requested_images_with_npz_grid_and_arguments(one_process_run, saved_pipeline):
    names = sorted(p.name for p in one_process_run.iterdir())
    assert names == [sample_file_name(i) for i in range(NUM_IMAGES)] + ["grid.png", "sample_args.json", "samples.npz"]
    images = read_pngs(one_process_run)
    assert images.shape == (NUM_IMAGES, 32, 32, 3) and images.dtype == np.uint8
    assert len({image.tobytes() for image in images}) == NUM_IMAGES  # every index got its own noise

    with np.load(one_process_run / "samples.npz") as npz:
        assert list(npz.keys()) == ["arr_0"]
        np.testing.assert_array_equal(npz["arr_0"], images)

    grid = np.asarray(Image.open(one_process_run / "grid.png"))
    assert grid.shape == (64, 64, 3)  # the first 4 images, 2 x 2
    np.testing.assert_array_equal(grid[:32, 32:], images[1])
    np.testing.assert_array_equal(grid[32:, :32], images[2])

    args = json.loads((one_process_run / "sample_args.json").read_text())
    assert args["pretrained_model_name_or_path"] == str(saved_pipeline) and args["seed"] == 7
    assert args["scheduler"] == "ddpm" and args["mixed_precision"] == "no"


def test_a_full_disk_while_packing_the_npz_says_so_and_leaves_no_partial_file(one_process_run, tmp_path,
                                                                             monkeypatch):
    import errno
    import shutil
    import zipfile

    from uldm.errors import SaveError

    folder = tmp_path / "samples"
    shutil.copytree(one_process_run, folder)
    npz = folder / "samples.npz"
    before = npz.read_bytes()

    class FullDiskZipFile(zipfile.ZipFile):
        """Takes the header and two images, then the disk is full."""

        def open(self, name, mode="r", **options):
            member = super().open(name, mode, **options)
            if mode == "w":
                real_write, writes = member.write, []

                def write(data):
                    if len(writes) == 3:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    writes.append(len(data))
                    return real_write(data)

                member.write = write
            return member

    monkeypatch.setattr(zipfile, "ZipFile", FullDiskZipFile)
    with pytest.raises(SaveError) as error:
        save_samples_npz(folder, NUM_IMAGES, npz)
    message = str(error.value)
    assert "Could not write the samples' samples.npz" in message and "the disk is full" in message
    assert "The sample images are kept" in message and "are free on that disk" in message
    assert npz.read_bytes() == before, "the earlier npz is untouched"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "no temporary file is left"
    assert len(list(folder.glob("*.png"))) == NUM_IMAGES + 1  # the samples and the grid


def test_two_processes_make_the_same_images_as_one(one_process_run, saved_pipeline, tmp_path):
    output_dir = tmp_path / "two-processes"
    run_sampler_with_torchrun(saved_pipeline, output_dir, "--save_npz")
    two = read_pngs(output_dir)
    one = read_pngs(one_process_run)
    # Batches are composed differently (1 process: [0,1][2,3][4,5]; 2 processes: [0,1][2] and [3,4][5]) and
    # thread counts differ; float rounding may move a channel by one level at most.
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1
    assert (one == two).mean() > 0.999
    with np.load(output_dir / "samples.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], two)


def test_resume_makes_only_the_missing_images(one_process_run, saved_pipeline, tmp_path):
    output_dir = tmp_path / "resumed"
    output_dir.mkdir()
    for path in one_process_run.glob("*.png"):
        (output_dir / path.name).write_bytes(path.read_bytes())
    (output_dir / "sample_args.json").write_text((one_process_run / "sample_args.json").read_text())
    for index in (1, 4):
        (output_dir / sample_file_name(index)).unlink()
    old = 1_000_000_000  # an old mtime, so any rewrite would show
    for index in (0, 2, 3, 5):
        os.utime(output_dir / sample_file_name(index), (old, old))

    run_sampler_here(saved_pipeline, output_dir)

    assert missing_indices(output_dir, NUM_IMAGES) == []
    for index in (0, 2, 3, 5):
        assert (output_dir / sample_file_name(index)).stat().st_mtime == old
    regenerated = read_pngs(output_dir)[[1, 4]]
    assert np.abs(regenerated.astype(int) - read_pngs(one_process_run)[[1, 4]]).max() <= 1
    assert not [p for p in output_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_resume_with_other_image_settings_is_refused(one_process_run, saved_pipeline):
    args = sample_script.parse_args([str(saved_pipeline), "--output_dir", str(one_process_run), *SAMPLE_ARGS])
    args.mixed_precision = "no"
    sample_script.check_resume_is_consistent(args, one_process_run)  # same settings: fine
    args.seed = 8
    with pytest.raises(InputError, match=r"other settings \(seed: 7 -> 8\)"):
        sample_script.check_resume_is_consistent(args, one_process_run)


# ------------------------------------------------------------------------------------------ helpers


def test_generators_for_indices_depend_only_on_seed_plus_index():
    first = [torch.randn(3, generator=g) for g in generators_for_indices(10, [0, 5])]
    again = [torch.randn(3, generator=g) for g in generators_for_indices(10, [5])]
    torch.testing.assert_close(first[1], again[0])
    assert not torch.equal(first[0], first[1])


def test_make_scheduler_keeps_the_saved_noise_schedule():
    saved = build_noise_scheduler()
    for name in SCHEDULER_NAMES:
        scheduler = make_scheduler(name, saved.config)
        torch.testing.assert_close(scheduler.betas, saved.betas)
    assert isinstance(make_scheduler("euler", saved.config), EulerDiscreteScheduler)
    dpm = make_scheduler("dpmsolver++", saved.config)
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="Unknown scheduler 'plms'"):
        make_scheduler("plms", saved.config)


def test_make_image_grid_fills_a_short_last_row():
    images = [Image.new("RGB", (4, 4), (40 * i, 0, 0)) for i in range(1, 6)]
    grid = np.asarray(make_image_grid(images, rows=2))
    assert grid.shape == (8, 12, 3)
    assert grid[4, 8].tolist() == [0, 0, 0] and grid[4, 0].tolist() == [160, 0, 0]


def test_npz_refuses_an_incomplete_folder(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / sample_file_name(0))
    with pytest.raises(FileNotFoundError, match="lacks 1 of 2 images, e.g. 000001.png"):
        save_samples_npz(tmp_path, 2, tmp_path / "samples.npz")


def test_a_lora_output_is_sampled_as_its_base_with_the_adapter(saved_pipeline, one_process_run, tmp_path):
    from uldm.lora import add_lora_adapter, lora_target_modules, save_lora_result

    unet = load_pipeline(saved_pipeline).unet
    add_lora_adapter(unet, rank=2, alpha=None, target_modules=lora_target_modules("attention+conv"))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: not the identity
    adapter = tmp_path / "dreambooth-lora"
    save_lora_result(unet, adapter, base_model=str(saved_pipeline))

    run_sampler_here(adapter, tmp_path / "samples")
    with_adapter = read_pngs(tmp_path / "samples")
    assert with_adapter.shape == read_pngs(one_process_run).shape
    assert not np.array_equal(with_adapter, read_pngs(one_process_run)), "the adapter changes the samples"


def test_evaluate_scores_only_the_samples_of_a_sample_folder_with_its_grid(one_process_run, tmp_path, capsys):
    """The README's sample-then-evaluate flow: grid.png (64 px, 2x2 of the 32-px samples) is not a sample."""
    import evaluate
    from test_evaluate import TinyFeatures

    extractor = TinyFeatures()
    results = evaluate.main(["--samples_dir", str(one_process_run), "--reference_dir", str(one_process_run),
                             "--device", "cpu", "--kid_subsets", "2", "--kid_subset_size", "3", "--batch_size", "4"],
                            feature_extractor=extractor)
    assert results["fid_kid"]["resolution"] == 32
    assert f"Scoring {NUM_IMAGES} images" in capsys.readouterr().out
    # the reference folder is read as any folder of images (grid included, resized); the samples are the 6 alone
    assert extractor.images_seen == NUM_IMAGES + NUM_IMAGES + 1
