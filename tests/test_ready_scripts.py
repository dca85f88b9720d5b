"""The ready-made scripts in scripts/ only pass arguments that the training scripts accept."""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT

RECIPES = [("train_ffhq256_seed.sh",), ("train_ffhq256_ldm_paper.sh",), ("train_small_dataset.sh", "pokemon"),
           ("train_small_dataset.sh", "flowers")]

# Stands in for `accelerate`: records the command line it was given instead of training.
FAKE_ACCELERATE = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, sys
    with open(os.environ["RECORD_TO"], "w") as handle:
        json.dump(sys.argv[1:], handle)
""")


def test_every_training_recipe_is_checked():
    assert {p.name for p in (REPO_ROOT / "scripts").glob("train_*.sh")} == {r[0] for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=" ".join)
def test_recipe_arguments_parse(recipe, tmp_path):
    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text(FAKE_ACCELERATE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "argv.json"
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "RECORD_TO": str(record)}
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / recipe[0]), *recipe[1:]], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    argv = json.loads(record.read_text())
    assert argv[0] == "launch"
    script = next(i for i, arg in enumerate(argv) if arg.endswith(".py"))
    module = importlib.import_module(argv[script][:-3])
    args = module.parse_args(argv[script + 1:])
    assert args.output_dir
