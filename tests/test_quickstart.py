"""The offline demo: its data is deterministic and complete, and the quick start runs end to end, as a
shell script and as a notebook, from a copy of the repository outside the source tree (reduced steps)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, subprocess_env

HAS_DREAMBOOTH = (REPO_ROOT / "train_dreambooth_unconditional.py").is_file()
GRIDS = ["1_data.png", "2_reconstructions.png", "3_base_samples.png", "4_subject.png", "loss_vae.png", "loss_ldm.png"]
if HAS_DREAMBOOTH:
    GRIDS += ["5_dreambooth_samples.png", "loss_dreambooth.png"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------------------------
# Demo data


def test_demo_data_is_deterministic_and_complete(tmp_path):
    from uldm.demo_data import (
        BACKGROUNDS, EYE_STYLES, HAT_COLOURS, HEAD_COLOURS, HEAD_SHAPES, MOUTHS, SUBJECT, read_factors,
        write_demo_dataset,
    )

    first = write_demo_dataset(tmp_path / "a", num_images=200, num_subject_images=6, seed=3)
    again = write_demo_dataset(tmp_path / "b", num_images=200, num_subject_images=6, seed=3)
    smaller = write_demo_dataset(tmp_path / "c", num_images=20, num_subject_images=2, seed=3)
    other_seed = write_demo_dataset(tmp_path / "d", num_images=20, num_subject_images=2, seed=4)

    faces = sorted(first.faces_dir.glob("*.png"))
    subject = sorted(first.subject_dir.glob("*.png"))
    assert [p.name for p in faces] == [f"{i:05d}.png" for i in range(200)]
    assert [p.name for p in subject] == [f"{i:05d}.png" for i in range(6)]
    for path in faces + subject:
        twin = again.root / path.relative_to(first.root)
        assert np.array_equal(pixels(path), pixels(twin)), f"{path.name} differs between two runs"
    assert pixels(faces[0]).shape == (32, 32, 3)
    for index in range(20):  # image i does not depend on how many are drawn
        assert np.array_equal(pixels(faces[index]), pixels(smaller.faces_dir / faces[index].name))
    assert sum(not np.array_equal(pixels(faces[i]), pixels(other_seed.faces_dir / faces[i].name))
               for i in range(20)) >= 18, "another seed draws other faces"

    factors = read_factors(first.root)
    assert [row["file"] for row in factors] == [f"faces/{p.name}" for p in faces] + [f"subject/{p.name}" for p in subject]
    is_subject = [all(row[key] == value for key, value in SUBJECT.items()) for row in factors]
    assert is_subject == [False] * 200 + [True] * 6, "the subject is only in subject/, and only it is there"
    main = factors[:200]
    for name, levels in (("background", BACKGROUNDS), ("head_shape", HEAD_SHAPES), ("head_colour", HEAD_COLOURS),
                         ("eyes", EYE_STYLES), ("mouth", MOUTHS), ("hat", [*HAT_COLOURS, None])):
        assert {row[name] for row in main} == set(levels), f"every {name} occurs"
    subject_backgrounds = {row["background"] for row in factors[200:]}
    assert len(subject_backgrounds) > 1, "the subject is shown in several settings"
    for name in ("preview.png", "subject_preview.png"):
        assert (first.root / name).is_file()

    # A rerun with fewer images leaves no stale extras behind.
    write_demo_dataset(first.root, num_images=10, num_subject_images=2, seed=3)
    assert len(list(first.faces_dir.glob("*.png"))) == 10 and len(read_factors(first.root)) == 12


def test_make_demo_data_cli(tmp_path, expect_input_error):
    import make_demo_data

    make_demo_data.main(["--output_dir", str(tmp_path), "--num_images", "5", "--num_subject_images", "3",
                         "--resolution", "64"])
    assert pixels(tmp_path / "faces" / "00004.png").shape == (64, 64, 3)
    assert len(list((tmp_path / "subject").glob("*.png"))) == 3
    assert "--num_images must be at least 1" in expect_input_error(
        make_demo_data.main, ["--output_dir", str(tmp_path), "--num_images", "0"])


# --------------------------------------------------------------------------------------------
# Quick start


def copy_of_repository(destination: Path) -> Path:
    """What a fresh clone holds: tracked files and new files git would not ignore (no venv, outputs, caches)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout (e.g. an unpacked archive): copy without the usual clutter
        shutil.copytree(REPO_ROOT, destination, ignore=shutil.ignore_patterns(
            ".git", ".venv", "outputs", "data", "__pycache__", ".pytest_cache", ".ipynb_checkpoints"))
        return destination
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def check_latent_scale_is_the_vaes(out: Path) -> None:
    """The pipeline's latent scaling factor is the one saved in the VAE's config."""
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    model_index = json.loads((out / "ldm" / "model_index.json").read_text())
    assert model_index["latent_scaling_factor"] == pytest.approx(vae_config["scaling_factor"], rel=1e-9)


def check_quickstart_outputs(out: Path) -> None:
    for name in GRIDS:
        with Image.open(out / name) as image:
            image.verify()
    data = pixels(out / "1_data.png")
    assert data.shape[0] >= 4 * 32 and data.std() > 20, "a grid of varied faces"
    reconstructions = pixels(out / "2_reconstructions.png")
    assert reconstructions.shape[0] % 32 == 0 and reconstructions.shape[1] % 64 == 0, "pairs of 32 px images"
    assert pixels(out / "3_base_samples.png").shape == (4 * 32, 4 * 32, 3)
    check_latent_scale_is_the_vaes(out)
    check_fid_was_measured(out)


def check_fid_was_measured(out: Path) -> None:
    """FID/KID of the latent model at its (final) validation, drawn under its loss curve."""
    from uldm.training import read_metrics

    rows = read_metrics(out / "ldm", having="fid")
    assert rows and rows[-1]["fid"] > 0 and "kid" in rows[-1]
    with Image.open(out / "ldm" / "loss_curve.png") as figure:
        assert figure.height > 0.8 * figure.width, "the loss curve (7:4 alone) has its FID panel"


def test_quickstart_script_runs_from_a_clean_copy(tmp_path):
    repo = copy_of_repository(tmp_path / "repo")
    result = subprocess.run(["bash", "scripts/quickstart.sh", "--quick"], cwd=repo, capture_output=True, text=True,
                            env=subprocess_env(PYTHON=sys.executable), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = repo / "outputs" / "quickstart"
    check_quickstart_outputs(out)
    assert "Look at outputs/quickstart/" in result.stdout
    assert "FID/KID of 16 samples" in result.stdout and "random conv" in result.stdout
    assert re.search(r"^\s+6\s+\d+\.\d\d\s+-?\d\.\d{4}$", result.stdout, re.M), "the FID table"
    if not HAS_DREAMBOOTH:
        assert "Skipping DreamBooth" in result.stdout


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no python3 Jupyter kernel (pip install ipykernel)")
    repo = copy_of_repository(tmp_path / "repo")
    out = tmp_path / "notebook-outputs"
    for name, value in subprocess_env(QUICK=1, OUTPUT_DIR=out).items():
        monkeypatch.setenv(name, value)  # the kernel, and the commands it runs, inherit these
    notebook = nbformat.read(repo / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(repo / "notebooks")}})
    client.execute()
    check_quickstart_outputs_notebook(notebook, out)


def check_quickstart_outputs_notebook(notebook, out: Path) -> None:
    shown = sum(1 for cell in notebook.cells if cell.cell_type == "code"
                for output in cell.get("outputs", []) if "image/png" in output.get("data", {}))
    assert shown >= 6 + (2 if HAS_DREAMBOOTH else 0), "the grids are shown inline"
    for name in ("vae/reconstructions.png", "ldm/model_index.json", "samples_base/grid.png"):
        assert (out / name).is_file(), name
    if HAS_DREAMBOOTH:
        assert (out / "samples_dreambooth" / "grid.png").is_file()
    check_latent_scale_is_the_vaes(out)
    check_fid_was_measured(out)
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []))
    assert "FID/KID of 16 samples" in printed


def test_notebook_and_script_use_the_same_settings():
    script = (REPO_ROOT / "scripts" / "quickstart.sh").read_text()
    quick_block, full_block = re.search(r'if \[\[ "\$QUICK" == 1 \]\]; then(.*?)else(.*?)fi', script, re.S).groups()
    notebook = "".join(cell.source if isinstance(cell.source, str) else "".join(cell.source)
                       for cell in __import__("nbformat").read(REPO_ROOT / "notebooks" / "quickstart.ipynb", 4).cells)
    quick_nb, full_nb = re.search(r"if QUICK:(.*?)else:(.*?)\n\S", notebook, re.S).groups()

    def shell_settings(block):
        return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", block)}

    def python_settings(block):
        settings = {}
        for names, values in re.findall(r"^\s*([\w, ]+?)\s*=\s*([\d, ]+)$", block, re.M):
            settings.update(zip([n.strip() for n in names.split(",")], [int(v) for v in values.split(",")]))
        return settings

    assert shell_settings(quick_block) == python_settings(quick_nb)
    assert shell_settings(full_block) == python_settings(full_nb)
    assert len(shell_settings(full_block)) == 11
