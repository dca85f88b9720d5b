"""bench/bench_quality.py in --quick mode: every part runs and the result says what it measured.

A smoke test: the figures of a few training steps mean nothing, except that real faces must score far better
than untrained models (else the scorer could not tell anything apart)."""

from __future__ import annotations

import json

import pytest

from bench import bench_quality


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_quick_quality_benchmark_writes_levers_pixel_space_and_references(tmp_path):
    results_dir = tmp_path / "results"
    bench_quality.main(["--quick", "--results_dir", str(results_dir), "--report", str(tmp_path / "report.md"),
                        "--levers", "p2", "zero_snr", "--work_dir", str(tmp_path / "work")])
    result = json.loads((results_dir / "quality.json").read_text())
    configs, pixel, references = (result["results"][key] for key in ("configs", "pixel", "references"))
    assert list(configs)[:3] == ["baseline", "p2", "zero_snr"]
    for name, config in configs.items():
        assert [run["seed"] for run in config["runs"]] == [0, 1]
        assert all(run["steps"] == 4 and run["train_s"] > 0 and run["fid"] > 0 for run in config["runs"])
        if name != "baseline":
            paired = config["against_baseline"]
            expected = [run["fid"] - base["fid"] for run, base in zip(config["runs"], configs["baseline"]["runs"])]
            assert paired["fid_difference_mean"] == pytest.approx(sum(expected) / 2)
            assert paired["seeds_better"] == sum(d < 0 for d in expected)
    # The pixel run got the latent baseline's training time, in steps of its own measured step time.
    step_s, budget = result["results"]["pixel_step_s"], configs["baseline"]["train_s_mean"]
    assert pixel["1x"]["planned_steps"] == max(1, round(budget / step_s))
    assert pixel["1x"]["sample_s_per_image_mean"] > 0
    # Real held-out faces score far better than models trained for 4 steps.
    assert references["heldout_faces"]["fid"] < 0.5 * configs["baseline"]["fid_mean"]
    assert result["results"]["vae_train_s"] > 0
    assert (tmp_path / "work" / "grids" / "baseline.png").is_file()
    assert "Latent against pixel space" in (tmp_path / "report.md").read_text()
