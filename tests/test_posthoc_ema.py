"""Post-hoc EMA: power-function tracking is exact, synthesis reproduces tracked profiles and matches an
untracked one, resume continues bit for bit, and synthesize_ema.py writes loadable pipelines."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_kl_vae, build_tiny_unet, walk_with_snapshots
from uldm.errors import InputError
from uldm.training.posthoc_ema import (
    MAX_SIGMA_REL, PowerFunctionEMA, Snapshot, gamma_to_sigma_rel, list_snapshots, sigma_rel_to_gamma, solve_coefficients,
    synthesize_state_dicts,
)


def flat(state_dict: dict) -> torch.Tensor:
    return torch.cat([state_dict[key].double().flatten() for key in sorted(state_dict)])


def tiny_mlp(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(dtype)


class NoisyRegression:
    """A short, noisy training run (Adam, high learning rate), so that EMA lengths give different weights.
    Batch k depends only on (seed, k): a run can be split anywhere and continued."""

    def __init__(self, model, seed: int = 0):
        self.model, self.seed = model, seed
        self.optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
        self.true_w = torch.randn(4, 1, generator=torch.Generator().manual_seed(1234))

    def train(self, steps, *trackers):
        for step in steps:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
            x = torch.randn(16, 4, generator=generator)
            y = torch.sin(x @ self.true_w) + 0.3 * torch.randn(16, 1, generator=generator)
            loss = ((self.model(x) - y) ** 2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            for tracker in trackers:
                tracker.step(self.model.parameters(), step)


# --------------------------------------------------------------------------------------------
# Profiles


def test_gamma_and_sigma_rel_are_inverse_and_match_edm2_values():
    # EDM2 (Sec. 3): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-10)
    for bad in (0.0, -0.1, MAX_SIGMA_REL, 0.3):
        with pytest.raises(InputError, match="between 0 and"):
            sigma_rel_to_gamma(bad)


def test_tracking_is_the_power_function_average_of_the_weights_seen():
    """(a) After t steps the average weights step k by (k^(g+1) - (k-1)^(g+1)) / t^(g+1)."""
    model = tiny_mlp(dtype=torch.float64)
    tracker = PowerFunctionEMA(model, sigma_rels=(0.05, 0.10))
    generator = torch.Generator().manual_seed(0)
    sequence = []
    for step in range(1, 41):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
        sequence.append(torch.cat([p.flatten() for p in model.parameters()]).clone())
        tracker.step(model.parameters(), step)
        if step in (1, 7, 40):
            for sigma_rel in tracker.sigma_rels:
                gamma = sigma_rel_to_gamma(sigma_rel)
                k = torch.arange(1, step + 1, dtype=torch.float64)
                weights = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / step ** (gamma + 1)
                direct = (weights[:, None] * torch.stack(sequence)).sum(0)
                averaged = tracker.averaged_state_dict(sigma_rel)
                tracked = torch.cat([averaged[name].flatten() for name, _ in model.named_parameters()])
                torch.testing.assert_close(tracked, direct, rtol=1e-10, atol=1e-12)
    # The two profiles really differ (the test would not notice a sigma_rel mix-up otherwise).
    assert not torch.allclose(flat(tracker.averaged_state_dict(0.05)), flat(tracker.averaged_state_dict(0.10)))


def test_tracking_in_float32_of_float32_weights_and_refusing_a_step_backwards():
    model = tiny_mlp()
    tracker = PowerFunctionEMA(model, sigma_rels=(0.1,))
    assert tracker.averages[0][0].dtype == torch.float32
    tracker.step(model.parameters(), 1)
    with pytest.raises(ValueError, match="not after the last step"):
        tracker.step(model.parameters(), 1)
    with pytest.raises(InputError, match="different values"):
        PowerFunctionEMA(model, sigma_rels=(0.1, 0.1))


# --------------------------------------------------------------------------------------------
# Synthesis


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """400 steps of a small model, profiles 0.05 and 0.10 snapshotted every 20 steps, and two more
    profiles (0.075 between them, 0.15 beyond) tracked directly without snapshots."""
    snapshot_dir = tmp_path_factory.mktemp("snapshots")
    model = tiny_mlp()
    tracked = PowerFunctionEMA(model, (0.05, 0.10), snapshot_dir=snapshot_dir, snapshot_steps=20)
    direct = PowerFunctionEMA(model, (0.075, 0.15))
    NoisyRegression(model).train(range(1, 401), tracked, direct)
    return tracked, direct, list_snapshots(snapshot_dir)


def test_snapshots_are_written_every_n_steps_with_their_profile(short_run):
    tracked, _, snapshots = short_run
    assert sorted({s.step for s in snapshots}) == list(range(20, 401, 20))
    assert sorted({s.sigma_rel for s in snapshots}) == [0.05, 0.10]
    assert all(s.gamma == pytest.approx(sigma_rel_to_gamma(s.sigma_rel)) for s in snapshots)
    assert not list(tracked.snapshot_dir.glob(".*")), "no temporary files are left behind"


def test_synthesising_a_tracked_profile_reproduces_its_weights(short_run):
    """(b)"""
    tracked, _, snapshots = short_run
    for result in synthesize_state_dicts(snapshots, [0.05, 0.10]):
        assert result.step == 400 and result.fit_error < 1e-6
        torch.testing.assert_close(flat(result.state_dict), flat(tracked.averaged_state_dict(result.sigma_rel)),
                                   rtol=1e-6, atol=1e-7)


def test_a_synthesised_profile_matches_one_tracked_directly(short_run):
    """(c) Tolerance: the synthesised weights are within 1% of the distance from the directly tracked
    profile to the nearer of the two snapshotted ones (measured: about 0.2%)."""
    tracked, direct, snapshots = short_run
    for result in synthesize_state_dicts(snapshots, [0.075, 0.15]):
        reference = flat(direct.averaged_state_dict(result.sigma_rel))
        nearest_tracked = min((flat(tracked.averaged_state_dict(s)) - reference).norm() for s in (0.05, 0.10))
        error = (flat(result.state_dict) - reference).norm()
        assert error < 0.01 * nearest_tracked, (result.sigma_rel, error.item(), nearest_tracked.item())
        assert result.fit_error < 0.01


def test_synthesis_uses_only_snapshots_up_to_the_step_asked_for(short_run):
    tracked, _, snapshots = short_run
    (early,) = synthesize_state_dicts(snapshots, [0.1], at_step=200)
    assert early.step == 200 and max(s.step for s, _ in early.coefficients) == 200
    (tracked_then,) = [s for s in snapshots if s.step == 200 and s.sigma_rel == 0.1]
    torch.testing.assert_close(flat(early.state_dict), flat(load_file(tracked_then.path)), rtol=1e-6, atol=1e-7)
    with pytest.raises(InputError, match="no snapshots of step 210"):
        synthesize_state_dicts(snapshots, [0.1], at_step=210)


def test_a_profile_the_snapshots_cannot_fit_is_refused():
    steps, gammas = [100, 200, 100, 200], [sigma_rel_to_gamma(s) for s in (0.05, 0.05, 0.1, 0.1)]
    assert solve_coefficients(steps, gammas, 200, sigma_rel_to_gamma(0.01)).fit_error > 0.5
    # Refused before any file is read (these paths do not exist).
    snapshots = [Snapshot(Path(f"missing-{t}-{g}"), t, gamma_to_sigma_rel(g), g) for t, g in zip(steps, gammas)]
    with pytest.raises(InputError, match="cannot be reconstructed well"):
        synthesize_state_dicts(snapshots, [0.01], max_fit_error=0.2)
    with pytest.raises(InputError, match="No post-hoc EMA snapshots"):
        synthesize_state_dicts([], [0.1])


# --------------------------------------------------------------------------------------------
# Resume


def make_accelerator():
    from accelerate import Accelerator

    from uldm.testing import reset_accelerate_state

    reset_accelerate_state()
    return Accelerator(cpu=True)


def test_resume_through_accelerate_continues_exactly_and_sets_aside_the_abandoned_snapshots(tmp_path):
    """(d) Saved with accelerator.save_state mid-run, restored into a fresh object with load_state:
    the averages and the snapshots written afterwards equal those of an uninterrupted run, bit for bit."""
    from uldm.testing import reset_accelerate_state

    uninterrupted_model = tiny_mlp()
    uninterrupted = PowerFunctionEMA(uninterrupted_model, snapshot_dir=tmp_path / "whole", snapshot_steps=20)
    NoisyRegression(uninterrupted_model).train(range(1, 61), uninterrupted)

    model = tiny_mlp()
    run = NoisyRegression(model)
    tracker = PowerFunctionEMA(model, snapshot_dir=tmp_path / "split", snapshot_steps=20)
    run.train(range(1, 31), tracker)
    try:
        accelerator = make_accelerator()
        accelerator.register_for_checkpointing(tracker)
        accelerator.save_state(str(tmp_path / "checkpoint-30"))
        saved_model = copy.deepcopy(model.state_dict())
        saved_optimizer = copy.deepcopy(run.optimizer.state_dict())
        # The interrupted run went on past the checkpoint (with other data) and wrote a snapshot at 40.
        run.seed = 7
        run.train(range(31, 46), tracker)
        assert (tmp_path / "split" / "ema-000000040-sigma_rel-0.05.safetensors").exists()

        resumed_model = tiny_mlp(seed=99)  # other initial weights: everything must come from the checkpoint
        resumed_model.load_state_dict(saved_model)
        resumed_run = NoisyRegression(resumed_model)
        resumed_run.optimizer.load_state_dict(saved_optimizer)
        resumed = PowerFunctionEMA(resumed_model, snapshot_dir=tmp_path / "split", snapshot_steps=20)
        accelerator = make_accelerator()
        accelerator.register_for_checkpointing(resumed)
        accelerator.load_state(str(tmp_path / "checkpoint-30"))
        assert resumed.last_step == 30
        resumed_run.train(range(31, 61), resumed)
    finally:
        reset_accelerate_state()

    for sigma_rel in uninterrupted.sigma_rels:
        assert torch.equal(flat(resumed.averaged_state_dict(sigma_rel)), flat(uninterrupted.averaged_state_dict(sigma_rel)))
    split, whole = list_snapshots(tmp_path / "split"), list_snapshots(tmp_path / "whole")
    assert [(s.step, s.sigma_rel) for s in split] == [(s.step, s.sigma_rel) for s in whole]
    for a, b in zip(split, whole):  # (not byte for byte: safetensors orders the metadata at random)
        assert torch.equal(flat(load_file(a.path)), flat(load_file(b.path))), a.path.name
    aside = list((tmp_path / "split").glob("superseded-after-step-30/*.safetensors"))
    assert sorted(p.name for p in aside) == ["ema-000000040-sigma_rel-0.05.safetensors",
                                             "ema-000000040-sigma_rel-0.1.safetensors"]


def test_restoring_other_profiles_is_refused():
    model = tiny_mlp()
    state = PowerFunctionEMA(model, (0.05, 0.10)).state_dict()
    with pytest.raises(InputError, match="--ema_sigma_rels 0.05 0.1"):
        PowerFunctionEMA(model, (0.05, 0.15)).load_state_dict(state)


# --------------------------------------------------------------------------------------------
# synthesize_ema.py


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny saved pipeline with the snapshots of 20 'training' steps (random walks of the UNet weights)."""
    from diffusers import DDPMScheduler

    from pipeline_latent_uncond import UnconditionalLatentPipeline

    folder = tmp_path_factory.mktemp("run") / "ldm"
    unet = build_tiny_unet()
    tracker = walk_with_snapshots(unet, folder / "ema_snapshots", steps=20, step_size=0.01)
    pipeline = UnconditionalLatentPipeline(unet=unet, vae=build_tiny_kl_vae(), scheduler=DDPMScheduler(clip_sample=False),
                                           latent_scaling_factor=0.5)
    pipeline.save_pretrained(folder)
    return folder, tracker


def run_synthesize(argv):
    import synthesize_ema

    return synthesize_ema.main([str(a) for a in argv])


def test_script_writes_a_loadable_pipeline_per_sigma_rel(saved_run, tmp_path):
    """(e)"""
    from uldm.pipeline_loading import load_pipeline

    run_dir, tracker = saved_run
    out = tmp_path / "phema"
    run_synthesize([run_dir, "--sigma_rel", 0.05, 0.08, "--output_dir", out])
    original = load_pipeline(run_dir)
    (expected_08,) = synthesize_state_dicts(list_snapshots(run_dir / "ema_snapshots"), [0.08])
    for sigma_rel, expected in ((0.05, tracker.averaged_state_dict(0.05)), (0.08, expected_08.state_dict)):
        folder = out / f"sigma_rel_{sigma_rel:g}"
        pipeline = load_pipeline(folder)
        torch.testing.assert_close(flat(pipeline.unet.state_dict()), flat(expected), rtol=1e-6, atol=1e-7)
        assert not torch.equal(flat(pipeline.unet.state_dict()), flat(original.unet.state_dict()))
        assert torch.equal(flat(pipeline.vae.state_dict()), flat(original.vae.state_dict()))
        assert pipeline.latent_scale == 0.5
        record = json.loads((folder / "posthoc_ema.json").read_text())
        assert record["sigma_rel"] == sigma_rel and record["step"] == 20
        assert sum(entry["weight"] for entry in record["snapshots"]) == pytest.approx(1.0)
        pipeline.set_progress_bar_config(disable=True)
        images = pipeline(batch_size=1, num_inference_steps=2, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    summary = json.loads((out / "posthoc_ema.json").read_text())
    assert [r["sigma_rel"] for r in summary["results"]] == [0.05, 0.08]
    assert not list(out.glob(".*")), "no temporary folders are left behind"


def test_score_seam_keeps_only_the_best(saved_run, tmp_path):
    from uldm.training.posthoc_ema import write_synthesized_pipelines

    run_dir, _ = saved_run
    scores = {0.05: 3.0, 0.08: 1.0, 0.12: 2.0}
    candidates = synthesize_state_dicts(list_snapshots(run_dir / "ema_snapshots"), list(scores))
    seen = []

    def score(pipeline):  # stands in for FID: identify the candidate by its weights
        weights = flat(pipeline.unet.state_dict())
        for candidate in candidates:
            if torch.allclose(weights, flat(candidate.state_dict)):
                seen.append(candidate.sigma_rel)
                return scores[candidate.sigma_rel]
        raise AssertionError("the pipeline scored holds none of the candidates' weights")

    results = write_synthesized_pipelines(run_dir, list(scores), tmp_path, score=score, keep_only_best=True,
                                          targets_per_pass=2)
    assert seen == [0.05, 0.08, 0.12]
    assert [r.folder is not None for r in results] == [False, True, False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["posthoc_ema.json", "sigma_rel_0.08"]
    assert json.loads((tmp_path / "posthoc_ema.json").read_text())["best_sigma_rel"] == 0.08


def test_sweep_scores_each_ema_by_fid_and_keeps_the_lowest(saved_run, tmp_path, capsys):
    import shutil

    from conftest import make_blob_images
    from uldm.pipeline_loading import load_pipeline
    from uldm.metrics import fid
    from uldm.metrics.fid_validation import FidScorer, PipelineFid

    run_dir = tmp_path / "run"
    shutil.copytree(saved_run[0], run_dir)
    make_blob_images(tmp_path / "data", 16)
    (run_dir / "training_args.json").write_text(json.dumps({"train_data_dir": str(tmp_path / "data"),
                                                            "resolution": 32, "center_crop": True}))
    sweep = [run_dir, "--sweep", "--sigma_rel", 0.05, 0.08, 0.12, "--validation_fid_images", 12,
             "--fid_feature_extractor", "random-conv", "--validation_inference_steps", 2, "--device", "cpu"]
    out = tmp_path / "best"
    run_synthesize(sweep + ["--output_dir", out])
    printed = capsys.readouterr().out
    summary = json.loads((out / "posthoc_ema.json").read_text())
    scores = {r["sigma_rel"]: r["score"] for r in summary["results"]}
    assert len(set(scores.values())) == 3, "each EMA scores differently"
    best = min(scores, key=scores.get)
    assert summary["best_sigma_rel"] == best
    assert sorted(p.name for p in out.iterdir()) == ["fid_sweep.md", "posthoc_ema.json", f"sigma_rel_{best:g}"]
    table = (out / "fid_sweep.md").read_text()
    assert table in printed and f"| {best:g} **(best)** | {scores[best]:.3f}" in table
    for sigma_rel, value in scores.items():
        assert f"{value:.3f}" in table

    # The pipeline kept is the best one: scored again, it gives its FID; the reference came from the cache.
    (cached,) = (run_dir / "fid_reference").glob("reference-*.safetensors")
    reference = fid.load_stored_features(cached, fid.RandomConvFeatures())
    assert len(reference) == 16
    kept = load_pipeline(out / f"sigma_rel_{best:g}")
    kept.set_progress_bar_config(disable=True)
    scorer = FidScorer(fid.RandomConvFeatures(), reference, num_images=12, num_inference_steps=2)
    assert PipelineFid(scorer, "dpmsolver++")(kept) == pytest.approx(scores[best], rel=1e-4)

    run_synthesize(sweep + ["--output_dir", tmp_path / "all", "--keep_all"])
    assert sorted(p.name for p in (tmp_path / "all").glob("sigma_rel_*")) == [
        "sigma_rel_0.05", "sigma_rel_0.08", "sigma_rel_0.12"]
    again = json.loads((tmp_path / "all" / "posthoc_ema.json").read_text())
    assert {r["sigma_rel"]: r["score"] for r in again["results"]} == pytest.approx(scores)

    expect_refusal(capsys, [run_dir, "--sweep", "--sigma_rel", 0.1, "--output_dir", tmp_path / "x"],
                   "--validation_fid_images")
    # A sigma_rel the snapshots cannot make is refused before anything is scored or written (even in a later pass).
    unfit = sweep[:2] + ["--sigma_rel", 0.05, 0.08, 0.12, 0.15, 0.01] + sweep[6:]
    expect_refusal(capsys, unfit + ["--keep_all", "--output_dir", tmp_path / "unfit"], "cannot be reconstructed well")
    assert not (tmp_path / "unfit").exists()
    (run_dir / "training_args.json").unlink()
    expect_refusal(capsys, sweep + ["--output_dir", tmp_path / "y"], "training_args.json")


def expect_refusal(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        run_synthesize(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    return err


def test_script_refuses_bad_input_with_a_message(saved_run, tmp_path, capsys):
    run_dir, _ = saved_run
    out = tmp_path / "out"
    expect_refusal(capsys, [run_dir, "--sigma_rel", 0.3, "--output_dir", out], "between 0 and")
    expect_refusal(capsys, [tmp_path, "--sigma_rel", 0.1, "--output_dir", out], "No post-hoc EMA snapshots")
    expect_refusal(capsys, [run_dir, "--sigma_rel", 0.01, "--output_dir", out], "cannot be reconstructed well")
    expect_refusal(capsys, [run_dir, "--sigma_rel", 0.1, "--at_step", 7, "--output_dir", out], "no snapshots of step 7")

    # Snapshots of another (wider) UNet next to this pipeline.
    other = tmp_path / "other"
    wide = build_tiny_unet(block_out_channels=(32, 32))
    tracker = PowerFunctionEMA(wide, snapshot_dir=other / "ema_snapshots", snapshot_steps=1)
    tracker.step(wide.parameters(), 1)
    expect_refusal(capsys, [run_dir, "--snapshot_dir", other / "ema_snapshots", "--sigma_rel", 0.1,
                            "--output_dir", out], "do not fit this model")
    # Snapshots of two models mixed in one folder.
    for path in (run_dir / "ema_snapshots").glob("ema-000000005-*"):
        (other / "ema_snapshots" / path.name).write_bytes(path.read_bytes())
    expect_refusal(capsys, [run_dir, "--snapshot_dir", other / "ema_snapshots", "--sigma_rel", 0.1,
                            "--output_dir", out], "snapshots of different models")
    assert not out.exists(), "nothing is written when the input is refused"


def test_two_processes_average_identically_and_only_the_main_one_writes(tmp_path):
    import subprocess

    from conftest import REPO_ROOT, subprocess_env, torchrun_command

    command = torchrun_command(REPO_ROOT / "tests" / "posthoc_ema_worker.py", tmp_path)
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert states[0]["last_step"] == states[1]["last_step"] == 10
    for ours, theirs in zip(states[0]["averages"], states[1]["averages"]):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not (tmp_path / "rank1").exists(), "only the main process writes snapshots"
    assert sorted(p.name for p in (tmp_path / "rank0" / "ema_snapshots").iterdir()) == [
        "ema-000000005-sigma_rel-0.05.safetensors", "ema-000000005-sigma_rel-0.1.safetensors",
        "ema-000000010-sigma_rel-0.05.safetensors", "ema-000000010-sigma_rel-0.1.safetensors"]


def test_training_script_options_build_the_tracker(tmp_path):
    import argparse

    from uldm.args import add_posthoc_ema_args, config_from
    from uldm.training.posthoc_ema import PosthocEmaConfig, build_posthoc_ema
    from uldm.testing import reset_accelerate_state

    parser = argparse.ArgumentParser()
    add_posthoc_ema_args(parser)

    def config(*argv):
        args = parser.parse_args(list(argv))
        return config_from(PosthocEmaConfig, args, ema_sigma_rels=tuple(args.ema_sigma_rels)) if args.use_posthoc_ema else None

    model = tiny_mlp()
    try:
        accelerator = make_accelerator()
        assert build_posthoc_ema(model, config(), accelerator, max_train_steps=1000, output_dir=tmp_path) is None
        tracker = build_posthoc_ema(model, config("--use_posthoc_ema", "--ema_snapshot_dtype", "float16"), accelerator,
                                    max_train_steps=1000, output_dir=tmp_path)
        assert tracker.sigma_rels == [0.05, 0.10] and tracker.snapshot_steps == 50
        assert tracker.snapshot_dir == tmp_path / "ema_snapshots"
        for step in range(1, 51):
            tracker.step(model.parameters(), step)
        (snapshot, _) = list_snapshots(tmp_path / "ema_snapshots")
        assert all(v.dtype == torch.float16 for v in load_file(snapshot.path).values())
        with pytest.raises(InputError, match="at least 1"):
            build_posthoc_ema(model, config("--use_posthoc_ema", "--ema_snapshot_steps", "0"), accelerator,
                              max_train_steps=1000, output_dir=tmp_path)
    finally:
        reset_accelerate_state()


def test_a_tied_weight_is_averaged_under_each_of_its_names():
    model = tiny_mlp()
    model.tied = model[0]  # the same Linear under a second name
    tracker = PowerFunctionEMA(model, sigma_rels=(0.1,))
    tracker.step(model.parameters(), 1)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    tracker.step(model.parameters(), 2)
    averaged = tracker.averaged_state_dict(0.1)
    assert torch.equal(averaged["tied.weight"], averaged["0.weight"])
    assert not torch.equal(averaged["0.weight"], model[0].weight.detach())
    model.load_state_dict(averaged)
