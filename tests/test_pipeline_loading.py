"""UnconditionalLatentPipeline keeps diffusers' pipeline contract: uldm.pipeline_loading.load_pipeline takes the
options of DiffusionPipeline.from_pretrained and errs and logs like it (without running code from the folder),
save_pretrained takes diffusers' options, components and config round-trip.

What diffusers' PipelineTesterMixin (tests/pipelines/test_pipelines_common.py) checks, and where it is
checked here (written for this project, not copied):
  save_load_local (pickle weights, log of every loaded component) -> test_pickled_pipeline_loads_back_...
  serialization_with_variants, loading_with_variants, ..._incorrect_variants_raises_error -> test_variant_*
  dtype_dict, dtype_alias -> test_dtype_*; save_load_float16 (GPU there) -> test_dtype_* (bfloat16 on CPU)
  pipeline_with_accelerator_device_map -> test_device_map_*
  components_function -> test_components_and_parameters_rebuild_the_pipeline; to_dtype -> test_to_dtype_*
  pipeline_call_signature -> test_call_takes_diffusers_unconditional_arguments
  inference_batch_consistent / _single_identical, dict_tuple_outputs_equivalent, callback_inputs ->
  tests/test_pipeline.py (generators per image, output types, callbacks).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import build_tiny_kl_vae, build_tiny_unet
from pipeline_latent_uncond import UnconditionalLatentPipeline
from uldm.pipeline_loading import NotAPipelineError, load_pipeline

LOADER_LOG = "diffusers.pipelines.pipeline_utils"


def tiny_pipeline(**config) -> UnconditionalLatentPipeline:
    pipe = UnconditionalLatentPipeline(unet=build_tiny_unet(), vae=build_tiny_kl_vae(scaling_factor=0.18215),
                                       scheduler=DDIMScheduler(clip_sample=False), **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A saved tiny pipeline (safetensors) and the sample it gives."""
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("loading") / "pipeline"
    pipe.save_pretrained(folder)
    return folder, sample(pipe)


@contextlib.contextmanager
def captured_log(name: str, level=logging.INFO):
    """Records of one logger. diffusers' loggers do not propagate to the root logger, so caplog misses them."""
    logger = logging.getLogger(name)
    records, handler, old_level = [], logging.Handler(), logger.level
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def messages(records) -> str:
    return "\n".join(record.getMessage() for record in records)


def model_dtypes(pipe) -> dict:
    return {"unet": pipe.unet.dtype, "vae": pipe.vae.dtype}


# ---------------------------------------------------------------------------------------------- saving


def test_pickled_pipeline_loads_back_identical_and_the_loader_logs_every_component(tmp_path):
    pipe = tiny_pipeline()
    folder = tmp_path / "pickled"
    pipe.save_pretrained(folder, safe_serialization=False)
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    with captured_log(LOADER_LOG) as records:
        loaded = load_pipeline(folder)
    log = messages(records)
    for name, class_name in (("unet", "UNet2DModel"), ("vae", "AutoencoderKL"), ("scheduler", "DDIMScheduler")):
        assert f"Loaded {name} as {class_name} from `{name}` subfolder of {folder}." in log
    np.testing.assert_allclose(sample(loaded), sample(pipe), atol=1e-6)


def test_variant_is_saved_per_model_and_loaded_per_model(tmp_path):
    pipe = tiny_pipeline()
    folder = tmp_path / "variants"
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=False)
    for model in ("unet", "vae"):
        assert (folder / model / "diffusion_pytorch_model.fp16.bin").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    loaded = load_pipeline(folder, variant="fp16")
    for name in ("unet", "vae"):
        original, back = dict(getattr(pipe, name).named_parameters()), dict(getattr(loaded, name).named_parameters())
        assert original.keys() == back.keys()
        assert all(torch.equal(original[key], back[key]) for key in original)

    # diffusers' rule: each model takes the variant where it has one, the plain weights otherwise.
    build_tiny_kl_vae(seed=5, scaling_factor=0.18215).save_pretrained(folder / "vae", safe_serialization=False)
    (folder / "vae" / "diffusion_pytorch_model.fp16.bin").unlink()
    mixed = load_pipeline(folder, variant="fp16")
    assert torch.equal(mixed.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert torch.equal(mixed.vae.encoder.conv_in.weight, build_tiny_kl_vae(seed=5).encoder.conv_in.weight)


def test_variant_that_no_model_has_gives_diffusers_error(saved):
    folder, _ = saved
    with pytest.raises(ValueError, match=r"You are trying to load the model files of the `variant=fp16`"):
        load_pipeline(folder, variant="fp16")


def test_use_safetensors_refuses_pickled_weights(tmp_path):
    folder = tmp_path / "pickled"
    tiny_pipeline().save_pretrained(folder, safe_serialization=False)
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        load_pipeline(folder, use_safetensors=True)


def test_push_to_hub_uploads_the_folder_with_its_pipeline_file(tmp_path, monkeypatch):
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    uploads = []

    class CreatedRepo:
        repo_id = "someone/tiny-uldm"

    def record_upload(self, folder, repo_id, **options):
        uploads.append((repo_id, {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()},
                        json.loads((Path(folder) / "model_index.json").read_text())))

    monkeypatch.setattr(pipeline_utils, "create_repo", lambda repo_id, **options: CreatedRepo())
    monkeypatch.setattr(UnconditionalLatentPipeline, "_upload_folder", record_upload)
    tiny_pipeline().save_pretrained(str(tmp_path / "tiny-uldm"), push_to_hub=True, repo_id="someone/tiny-uldm",
                                    commit_message="first")
    ((repo_id, files, index),) = uploads
    assert repo_id == "someone/tiny-uldm"
    assert {"model_index.json", "pipeline_latent_uncond.py", "README.md", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "scheduler/scheduler_config.json"} <= files
    assert index["_class_name"] == ["pipeline_latent_uncond", "UnconditionalLatentPipeline"]


# -------------------------------------------------------------------------------------- components, dtypes


def test_components_and_parameters_rebuild_the_pipeline(saved):
    folder, expected = saved
    pipe = load_pipeline(folder)
    assert set(pipe.components) == {"unet", "vae", "scheduler", "guide"}  # the guide: optional, None here
    assert pipe.parameters == {"latent_scaling_factor": pytest.approx(0.18215), "latent_shift_factor": 0.0,
                               "guidance_scale": 1.0, "guidance_interval_low": None, "guidance_interval_high": None}
    rebuilt = UnconditionalLatentPipeline(**pipe.components, **pipe.parameters)
    np.testing.assert_allclose(sample(rebuilt), expected, atol=1e-6)


def test_call_takes_diffusers_unconditional_arguments():
    parameters = inspect.signature(UnconditionalLatentPipeline.__call__).parameters
    assert "batch_size" in parameters
    for name in ("num_inference_steps", "generator", "latents", "output_type", "return_dict", "callback_on_step_end",
                 "callback_on_step_end_tensor_inputs"):
        assert parameters[name].default is not inspect.Parameter.empty, name


def test_to_dtype_moves_every_model():
    pipe = tiny_pipeline()
    pipe.to(dtype=torch.bfloat16)
    assert model_dtypes(pipe) == {"unet": torch.bfloat16, "vae": torch.bfloat16}
    assert np.isfinite(sample(pipe)).all()


def test_dtype_for_all_models_and_its_older_name_torch_dtype(saved):
    folder, expected = saved
    as_bf16 = load_pipeline(folder, dtype=torch.bfloat16)
    assert model_dtypes(as_bf16) == {"unet": torch.bfloat16, "vae": torch.bfloat16}
    older_name = load_pipeline(folder, torch_dtype=torch.bfloat16)
    assert model_dtypes(older_name) == {"unet": torch.bfloat16, "vae": torch.bfloat16}
    assert np.abs(sample(as_bf16) - expected).max() < 0.1  # the same model, in lower precision
    with pytest.raises(ValueError, match="both `dtype` and `torch_dtype`"):
        load_pipeline(folder, dtype=torch.float16, torch_dtype=torch.float16)
    with captured_log(LOADER_LOG, logging.WARNING) as records:
        not_a_dtype = load_pipeline(folder, dtype="half")
    assert "is not a `torch.dtype`. Defaulting to `torch.float32`" in messages(records)
    assert model_dtypes(not_a_dtype) == {"unet": torch.float32, "vae": torch.float32}


def test_dtype_per_component_with_a_default(saved):
    folder, _ = saved
    per_component = {"unet": torch.bfloat16, "default": torch.float16}
    mixed = load_pipeline(folder, dtype=per_component)
    assert model_dtypes(mixed) == {"unet": torch.bfloat16, "vae": torch.float16}
    no_default = load_pipeline(folder, dtype={"vae": torch.bfloat16})
    assert model_dtypes(no_default) == {"unet": torch.float32, "vae": torch.bfloat16}


# ----------------------------------------------------------------------------------- devices and options


def test_device_map_to_one_device_gives_the_same_samples(saved):
    folder, expected = saved
    on_cpu = load_pipeline(folder, device_map="cpu")
    assert on_cpu.hf_device_map == "cpu" and on_cpu.unet.device.type == "cpu"
    np.testing.assert_allclose(sample(on_cpu), expected, atol=1e-6)
    balanced = load_pipeline(folder, device_map="balanced")  # no accelerator: as is
    np.testing.assert_allclose(sample(balanced), expected, atol=1e-6)


def test_device_map_and_low_cpu_mem_usage_errors_are_diffusers(saved):
    folder, expected = saved
    with pytest.raises(NotImplementedError, match="auto not supported. Supported strategies are: balanced"):
        load_pipeline(folder, device_map="auto")
    with pytest.raises(ValueError, match="`device_map` must be a string"):
        load_pipeline(folder, device_map={"unet": "cpu"})
    with pytest.raises(ValueError, match="cannot set `low_cpu_mem_usage` to False while using device_map"):
        load_pipeline(folder, device_map="cpu", low_cpu_mem_usage=False)
    slow = load_pipeline(folder, low_cpu_mem_usage=False)
    np.testing.assert_allclose(sample(slow), expected, atol=1e-6)


def test_options_that_name_code_or_files_diffusers_dropped_are_refused_and_unknown_ones_warned_about(saved):
    folder, expected = saved
    with pytest.raises(ValueError, match="custom_pipeline='my_pipeline' names code to run"):
        load_pipeline(folder, custom_pipeline="my_pipeline")
    with pytest.raises(ValueError, match="DDUF files is no longer supported"):
        load_pipeline(folder, dduf_file="model.dduf")
    with pytest.raises(ValueError, match="must be an instance of `PipelineQuantizationConfig`"):
        load_pipeline(folder, quantization_config={"load_in_8bit": True})
    with captured_log(LOADER_LOG, logging.WARNING) as records:
        pipe = load_pipeline(folder, not_an_option=1, trust_remote_code=True, disable_mmap=True, force_download=True)
    assert "Keyword arguments {'not_an_option': 1} are not expected by UnconditionalLatentPipeline and will be " \
           "ignored." in messages(records)
    np.testing.assert_allclose(sample(pipe), expected, atol=1e-6)


def test_components_passed_in_are_used_as_they_are(saved):
    folder, _ = saved
    vae = build_tiny_kl_vae(seed=3, scaling_factor=0.18215)
    scheduler = DDPMScheduler(clip_sample=False)
    with captured_log(LOADER_LOG) as records:
        pipe = load_pipeline(folder, vae=vae, scheduler=scheduler, dtype=torch.bfloat16)
    assert pipe.vae is vae and pipe.scheduler is scheduler and pipe.vae.dtype == torch.float32
    assert pipe.unet.dtype == torch.bfloat16
    assert "Loaded unet as" in messages(records) and "Loaded vae as" not in messages(records)


def test_a_pipeline_in_a_subfolder_loads(tmp_path, saved):
    folder, expected = saved
    shutil.copytree(folder, tmp_path / "repo" / "pipelines" / "tiny")
    pipe = load_pipeline(tmp_path / "repo", subfolder="pipelines/tiny")
    np.testing.assert_allclose(sample(pipe), expected, atol=1e-6)


def test_missing_folder_is_both_diffusers_value_error_and_a_file_not_found_error(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_pipeline(str(tmp_path / "a" / "b" / "c"))
    with pytest.raises(NotAPipelineError) as error:
        load_pipeline(tmp_path)
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ValueError)


# ---------------------------------------------------------------------------------------------- the hub


def fake_hub_cache(cache_dir: Path, repo_id: str, pipeline_folder: Path, subfolder: str = "") -> Path:
    """A Hugging Face hub cache holding one snapshot of `repo_id` (what an earlier download leaves), with a
    poisoned copy of the pipeline file: loading must never import it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(pipeline_folder, snapshot / subfolder)
    (snapshot / subfolder / "pipeline_latent_uncond.py").write_text('raise RuntimeError("folder code executed")\n')
    return snapshot


def test_hub_id_loads_from_the_cache_offline_without_running_its_code(tmp_path, saved):
    folder, expected = saved
    fake_hub_cache(tmp_path / "cache", "someone/tiny-uldm", folder)
    pipe = load_pipeline("someone/tiny-uldm", cache_dir=tmp_path / "cache")
    assert type(pipe) is UnconditionalLatentPipeline and pipe.name_or_path == "someone/tiny-uldm"
    np.testing.assert_allclose(sample(pipe), expected, atol=1e-6)

    fake_hub_cache(tmp_path / "cache2", "someone/collection", folder, subfolder="tiny")
    in_subfolder = load_pipeline("someone/collection", subfolder="tiny", cache_dir=tmp_path / "cache2",
                                 local_files_only=True)
    np.testing.assert_allclose(sample(in_subfolder), expected, atol=1e-6)
    with pytest.raises(OSError, match="may be offline"):
        load_pipeline("someone/tiny-uldm", cache_dir=tmp_path / "cache", revision="no-such-branch")


def test_online_download_fetches_one_format_and_variant_and_never_a_python_file(saved, monkeypatch):
    """With the hub reachable (faked here), the files asked for are diffusers' choice: safetensors unless
    use_safetensors=False, the variant where a model has it, nothing of components passed in, no .py."""
    import huggingface_hub

    folder, expected = saved
    weights = "diffusion_pytorch_model"
    repo_files = ["model_index.json", "pipeline_latent_uncond.py", "README.md", "scheduler/scheduler_config.json",
                  "unet/config.json", f"unet/{weights}.safetensors", f"unet/{weights}.fp16.safetensors",
                  f"unet/{weights}.bin", "unet/helper.py", "vae/config.json", f"vae/{weights}.safetensors",
                  f"vae/{weights}.bin"]
    requests = []

    def fake_snapshot_download(repo_id, allow_patterns, ignore_patterns, **options):
        requests.append((sorted(allow_patterns), ignore_patterns, options["local_files_only"]))
        return str(folder)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **options: repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **options: str(folder / filename))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    configs = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"]

    pipe = load_pipeline("someone/tiny-uldm")
    np.testing.assert_allclose(sample(pipe), expected, atol=1e-6)
    assert requests[-1] == (sorted(configs + [f"unet/{weights}.safetensors", f"vae/{weights}.safetensors"]),
                            ["*.py", "*.pyc"], False)
    with pytest.raises(ValueError, match="variant=fp16"):  # the saved folder has no fp16 files
        load_pipeline("someone/tiny-uldm", variant="fp16")
    assert requests[-1][0] == sorted(configs + [f"unet/{weights}.fp16.safetensors", f"vae/{weights}.safetensors"])
    with pytest.raises(OSError, match=r"diffusion_pytorch_model\.bin"):  # and it has no .bin files
        load_pipeline("someone/tiny-uldm", use_safetensors=False, vae=build_tiny_kl_vae(scaling_factor=0.18215))
    assert requests[-1][0] == sorted(["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                                      f"unet/{weights}.bin"])
