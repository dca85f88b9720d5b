"""bench/: every benchmark runs in --quick mode and writes a complete result JSON and the Markdown report.

Smoke tests only: no assertion is made about speed.
"""

from __future__ import annotations

import json

import torch

from bench import bench_gpu, bench_train_step, report, run_all

COMMON_KEYS = {"name", "title", "quick", "machine", "started", "duration_s", "load_at_start", "load_at_end",
               "settings", "results", "tables", "targets", "notes"}


def read_result(results_dir, name) -> dict:
    result = json.loads((results_dir / f"{name}.json").read_text())
    assert COMMON_KEYS <= set(result), f"{name}.json lacks {COMMON_KEYS - set(result)}"
    assert result["name"] == name and result["quick"] is True
    assert result["machine"]["torch"] == torch.__version__
    assert result["machine"]["cpu_model"] and result["machine"]["cpu_cores"] >= 1
    assert len(result["load_at_start"]) == 3 and all(load >= 0 for load in result["load_at_start"])
    for table in result["tables"]:
        assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"])
    return result


def assert_positive(mapping: dict, *keys: str) -> None:
    for key in keys:
        value = mapping[key]
        assert isinstance(value, (int, float)) and value > 0, f"{key} = {value!r}"


def test_every_benchmark_runs_quickly_and_writes_results_and_report(tmp_path):
    results_dir, report_path = tmp_path / "results", tmp_path / "benchmarks.md"
    run_all.main(["--quick", "--results_dir", str(results_dir), "--report", str(report_path)])

    cache = read_result(results_dir, "cache_latents")["results"]
    assert_positive(cache, "cache_build_s", "cache_build_s_per_image")
    assert list(cache["unets"]) == ["tiny"]
    speeds = cache["unets"]["tiny"]
    assert_positive(speeds, "images_per_sec_without_cache", "images_per_sec_with_cache", "speedup_steady_state")
    assert [entry["epochs"] for entry in speeds["amortised"]] == [1, 10, 100]
    for entry in speeds["amortised"]:
        assert_positive(entry, "images_per_sec", "speedup")
    # Spreading the one-off encoding over more epochs can only bring the cached speed closer to steady state.
    amortised = [entry["images_per_sec"] for entry in speeds["amortised"]]
    assert amortised == sorted(amortised) and amortised[-1] < speeds["images_per_sec_with_cache"]

    train_step = read_result(results_dir, "train_step")["results"]
    assert {config["space"] for config in train_step["configs"].values()} == {"latent", "pixel"}
    for config in train_step["configs"].values():
        assert_positive(config, "parameters", "seconds_per_image", "memory_per_image_bytes", "expected_fixed_bytes")
        sizes = [m["batch_size"] for m in config["measurements"]]
        assert sizes == sorted(sizes) and len(sizes) == 2
        for measurement in config["measurements"]:
            assert_positive(measurement, "seconds_per_step", "memory_bytes")
    assert_positive(train_step["pixel_over_latent"], "time_ratio", "memory_per_image_ratio")
    measured = json.loads((results_dir / "train_step.json").read_text())
    bench_train_step.main(["--rereport", "--results_dir", str(results_dir), "--report", str(report_path)])
    rebuilt = json.loads((results_dir / "train_step.json").read_text())
    assert rebuilt["tables"] == measured["tables"] and rebuilt["results"] == measured["results"], \
        "rebuilding the report from saved measurements changes nothing when nothing else changed"

    sampling = read_result(results_dir, "sampling")["results"]
    assert [run["scheduler"] for run in sampling["runs"]] == ["ddpm", "ddim", "dpmsolver++", "unipc", "euler"]
    for run in sampling["runs"]:
        assert_positive(run, "images_per_sec", "decode_seconds", "unet_seconds_per_step")
        assert 0 < run["decode_share"] < 1

    data = read_result(results_dir, "data")["results"]
    assert [(run["path"][:8], run["num_workers"]) for run in data["loader"]["runs"]] == [
        (path, workers) for path in ("per item", "gathered") for workers in (0, 1, 2)]
    for run in data["loader"]["runs"]:
        assert_positive(run, "latents_per_sec", "latents_per_cpu_sec")
    assert all(entry["image_files_opened"] == 0 for entry in data["restart"]["sizes"].values())
    assert_positive(data["restart"], "ratio_resume", "first_pass_images_per_sec")
    assert data["memory"]["processes"][0]["cache"]["Rss"] > 0

    gpu = read_result(results_dir, "gpu")
    if not torch.cuda.is_available():
        assert gpu["results"]["skipped"] is True and "No CUDA device" in gpu["notes"][0]

    markdown = report_path.read_text()
    for name in run_all.BENCHMARKS:
        assert read_result(results_dir, name)["title"] in markdown
    assert report.cpu_model() in markdown and "Quick mode" in markdown
    assert markdown.count("| scheduler | steps |") == 1


def test_gpu_benchmark_code_runs_on_the_cpu(tmp_path):
    variants = ["fp32", "fp32, classic attention", "bf16, channels_last"]
    result = bench_gpu.main(["--quick", "--device", "cpu", "--variants", *variants,
                             "--results_dir", str(tmp_path), "--report", str(tmp_path / "benchmarks.md")])
    measured = result["results"]["variants"]
    assert [variant["variant"] for variant in measured] == variants
    for variant in measured:
        assert_positive(variant, "train_images_per_sec", "sampling_unet_images_per_sec", "train_speedup")
    assert measured[0]["train_speedup"] == 1.0
