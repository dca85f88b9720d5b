"""The ready-made scripts in scripts/ only pass arguments that the training scripts accept."""

from __future__ import annotations

import importlib
import json
import os
import subprocess

import pytest

from conftest import REPO_ROOT, make_command_recorder, path_with

RECIPES = [("train_ffhq256_seed.sh",), ("train_ffhq256_ldm_paper.sh",), ("train_small_dataset.sh", "pokemon"),
           ("train_small_dataset.sh", "flowers")]


def test_every_training_recipe_is_checked():
    assert {p.name for p in (REPO_ROOT / "scripts").glob("train_*.sh")} == {r[0] for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=" ".join)
def test_recipe_arguments_parse(recipe, tmp_path):
    # A stand-in for `accelerate` records the command line it was given instead of training.
    record = tmp_path / "argv.json"
    make_command_recorder(tmp_path / "bin", record)
    env = {**os.environ, "PATH": path_with(tmp_path / "bin")}
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / recipe[0]), *recipe[1:]], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    argv = json.loads(record.read_text())
    assert argv[0] == "launch"
    script = next(i for i, arg in enumerate(argv) if arg.endswith(".py"))
    module = importlib.import_module(argv[script][:-3])
    args = module.parse_args(argv[script + 1:])
    assert args.output_dir
