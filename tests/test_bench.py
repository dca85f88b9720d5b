"""bench/: every benchmark runs in --quick mode and writes a complete result JSON and the Markdown report.

Smoke tests only: no assertion is made about speed.
"""

from __future__ import annotations

import json

import torch

import pytest

from bench import bench_compile, bench_gpu, bench_guidance, bench_train_step, harness, report, run_all

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

    compiled = read_result(results_dir, "compile")["results"]["unets"]["tiny"]
    assert "compile_error" not in compiled["compile"], compiled["compile"].get("compile_error")
    assert_positive(compiled["compile"], "eager_step_s", "compiled_step_s", "speedup", "compiled_first_step_s")
    assert compiled["compile"]["equal_within_tolerance"] is True
    assert compiled["compile"]["graph_breaks"] == {} and compiled["compile"]["explain"]["graph_count"] == 1
    # Compiling costs time once; a restart over the inductor cache pays much less of it.
    assert compiled["compile"]["compiled_first_step_s"] > compiled["compile"]["compiled_step_s"]
    assert compiled["restart"]["first_step_s"] < compiled["compile"]["compiled_first_step_s"]
    assert_positive(compiled["channels_last"], "contiguous_step_s", "channels_last_step_s")
    assert set(compiled["optimizer"]["step_s"]) == set(harness.OPTIMIZERS)
    assert all(d <= bench_compile.WEIGHTS_RTOL for d in compiled["optimizer"]["weights_relative_difference"].values())
    assert compiled["ema"]["average_relative_difference"] <= bench_compile.WEIGHTS_RTOL
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

    guidance = read_result(results_dir, "guidance")["results"]
    assert {"unguided@2", "unguided@4"} <= set(guidance["configs"])
    assert set(guidance["best"]) == set(bench_guidance.GUIDES)
    for entry in guidance["best"].values():
        assert entry["same_steps"]["seeds"] == entry["same_compute"]["seeds"] == 2
    assert guidance["verdict"].startswith(("Guidance beat", "Guidance did not beat"))
    assert (results_dir / "guidance.png").is_file()
    assert list(guidance["dreambooth"]) == list(bench_guidance.DREAMBOOTH_VARIANTS)
    # Weight 0 samples the base alone: the same model and noise for every fine-tune, so the same point.
    at_zero = [points[0] for points in guidance["dreambooth"].values()]
    assert all(point["weight"] == 0 for point in at_zero)
    assert all(point["instance_distance"] == pytest.approx(at_zero[0]["instance_distance"], rel=1e-4)
               for point in at_zero)

    distill = read_result(results_dir, "distill")["results"]
    assert {"teacher dpmsolver++@25", "teacher dpmsolver++@2", "teacher unipc@2", "student@1", "student@2",
            "LoRA student@1"} <= set(distill["configs"])
    assert all(cost["teacher_s"] > 0 and cost["student_s"] > 0 for cost in distill["costs"])
    assert any(line.startswith("At 2 steps the student scored") for line in distill["verdicts"])
    assert [point["steps"] for point in distill["dreambooth"]["fine-tune + the base's LoRA student"]] == [1, 2]
    assert (results_dir / "distill.png").is_file()

    markdown = report_path.read_text()
    for name in run_all.BENCHMARKS:
        assert read_result(results_dir, name)["title"] in markdown
    assert report.cpu_model() in markdown and "Quick mode" in markdown
    assert markdown.count("| scheduler | steps |") == 1


def test_gpu_benchmark_code_runs_on_the_cpu(tmp_path):
    result = bench_gpu.main(["--quick", "--device", "cpu", "--variants", "fp32", "bf16", "--peak_tflops", "2", "1",
                             "--results_dir", str(tmp_path), "--report", str(tmp_path / "benchmarks.md")])
    rows = result["results"]["rows"]
    assert [(r["variant"], r["data_path"], r["step"]) for r in rows] == [
        ("fp32", "cache", "loop"), ("fp32", "encode", "loop"),
        ("bf16", "cache", "loop"), ("bf16", "encode", "loop"), ("bf16", "cache", "tuned")]
    settings = result["settings"]
    assert_positive(settings, "unet_training_gflops_per_image", "vae_encode_gflops_per_image")
    for row in rows:
        assert_positive(row, "images_per_sec", "ms_per_step", "first_step_s", "unet_tflops", "mfu")
        peak = 2.0 if row["precision"] == "bf16" else 1.0
        assert row["mfu"] == pytest.approx(row["unet_tflops"] / peak)
        assert row["mfu_with_vae"] > row["mfu"] if row["data_path"] == "encode" else row["mfu_with_vae"] == row["mfu"]
    assert rows[1]["ratio_to_baseline"] == 1.0
    checks = {check["dtype"]: check for check in result["results"]["vae_precision_check"]}
    assert set(checks) == {"fp32", "bf16", "fp16"} and checks["bf16"]["nonfinite_latents"] == 0
    assert 0 < checks["bf16"]["latents_relative_difference"] < 0.1
    parts = result["results"]["parts"]
    assert set(parts["optimizer"]["step_s"]) == {"fused", "foreach", "for-loop"}
    assert set(parts["ema"]["step_s"]) == {"foreach", "default (for-loop)"}
