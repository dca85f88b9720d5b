"""Two real processes (CPU, gloo, torchrun): when one rank's save fails, both stop with the message, at once;
then both resume together, past a damaged checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import time

from conftest import REPO_ROOT, subprocess_env, torchrun_command
from uldm.training import checkpoints as ckpt
from uldm.training import read_metrics

# Runs a script with torch.save failing with ENOSPC on rank 1 for the files of checkpoint-4 (its
# random_states_1.pkl: the only file that rank writes), as a full disk would make it fail.
FAILING_RANK_1 = """\
import errno, os, runpy, sys
import torch

real_save = torch.save

def save(obj, f, *args, **kwargs):
    if os.environ.get("RANK") == "1" and ".tmp-checkpoint-4" in str(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return real_save(obj, f, *args, **kwargs)

torch.save = save
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def test_when_one_rank_cannot_write_its_part_every_rank_stops_with_the_message(train_images, tiny_vae_dir, tmp_path):
    out, wrapper = tmp_path / "out", tmp_path / "failing_rank_1.py"
    wrapper.write_text(FAILING_RANK_1)
    training = [
        "--train_data_dir", str(train_images), "--vae_name_or_path", str(tiny_vae_dir),
        "--model_config_name_or_path", "tiny", "--resolution", "32", "--train_batch_size", "2",
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "0",
        "--num_validation_images", "0", "--report_to", "none", "--output_dir", str(out),
    ]
    # The launcher stops the other workers as soon as it sees one fail: give both time to report, with room for a
    # loaded machine (3 s was not always enough beside other work; each rank exits by itself within seconds).
    command = torchrun_command(wrapper, REPO_ROOT / "train_unconditional_latent.py", *training,
                               launcher=("--monitor_interval", "20"))
    started = time.monotonic()
    # Without the agreement the main process would wait in a barrier for the gloo timeout (30 minutes).
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error: Could not write checkpoint-4" in line]
    assert len(errors) == 2, f"each rank prints the message once:\n{result.stderr[-4000:]}"
    for line in errors:
        assert "the disk is full (No space left on device)" in line
        assert "checkpoint-2 is intact" in line and line.rstrip().endswith("[process 1 of 2 failed; all processes stopped]")
    assert result.stderr.count("exitcode  : 2") == 2, f"both ranks exit with status 2:\n{result.stderr[-3000:]}"
    tracebacks = result.stderr.split("Traceback (most recent call last):")[1:]
    assert all("bin/torchrun" in tb.splitlines()[1] for tb in tracebacks), "only the launcher's own traceback"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert ckpt.checkpoint_problems(out / "checkpoint-2") == []
    assert not (out / ".tmp-checkpoint-4").exists()

    # Both ranks resume together: a damaged newer checkpoint-3 is skipped (verified once, on rank 0) and the
    # run goes on from checkpoint-2 on both.
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    weights = out / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    resume = torchrun_command(REPO_ROOT / "train_unconditional_latent.py", *training, "--resume_from_checkpoint", "latest")
    result = subprocess.run(resume, env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("it is damaged: model.safetensors is truncated") == 1, "warned once, by rank 0"
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "random_states_1.pkl").is_file()
    assert ckpt.checkpoint_problems(out / "checkpoint-4") == []
    print(f"two-process fault test, failing run: {elapsed:.1f} s")
