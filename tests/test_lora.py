"""LoRA the way diffusers users load it: the pipeline's load_lora_weights / save_lora_weights / fuse_lora /
unfuse_lora / unload_lora_weights / set_adapters on a UNet2DModel, files in diffusers' LoRA layout (and
peft's older layout still loading), and a pipeline file that needs no peft unless LoRA is used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from safetensors import safe_open

from conftest import REPO_ROOT, build_tiny_kl_vae, build_tiny_unet
from pipeline_latent_uncond import UnconditionalLatentPipeline
from uldm.pipeline_loading import load_pipeline

peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def base_pipeline() -> UnconditionalLatentPipeline:
    pipe = UnconditionalLatentPipeline(unet=build_tiny_unet(), vae=build_tiny_kl_vae(scaling_factor=0.18215),
                                       scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe) -> np.ndarray:
    return pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def trained_adapter(seed: int = 1, rank: int = 4, alpha: float = 8.0, other_rank: bool = True):
    """The base pipeline with an adapter whose B matrices are not zero (as after training), alpha != rank
    (scale 2) and (other_rank) one module of another rank: all three must come back from the file."""
    pipe = base_pipeline()
    rank_pattern = {"^down_blocks.1.attentions.0.to_q": 2} if other_rank else {}
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="gaussian",
                             rank_pattern=rank_pattern)
    peft.inject_adapter_in_model(config, pipe.unet, adapter_name="default")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return pipe


def save_adapter(pipe, folder: Path) -> Path:
    layers = peft.get_peft_model_state_dict(pipe.unet, adapter_name="default")
    UnconditionalLatentPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                                  unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A saved adapter, the samples with it, and the samples of the base alone."""
    pipe = trained_adapter()
    folder = save_adapter(pipe, tmp_path_factory.mktemp("lora") / "adapter")
    return folder, sample(pipe), sample(base_pipeline())


def test_saved_file_is_diffusers_lora_layout_with_the_adapter_config_in_its_metadata(adapter):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    folder, _, _ = adapter
    assert sorted(p.name for p in folder.iterdir()) == ["pytorch_lora_weights.safetensors"]
    with safe_open(folder / "pytorch_lora_weights.safetensors", "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "unet.down_blocks.1.attentions.0.to_q.lora_A.weight" in keys
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (4, 8.0)
    assert sorted(config["unet.target_modules"]) == sorted(TARGETS)
    # diffusers' own reader sees the same weights and metadata.
    state_dict, _, diffusers_metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(folder), return_lora_metadata=True)
    assert sorted(state_dict) == sorted(keys) and diffusers_metadata["unet.r"] == 4


def test_loaded_adapter_gives_the_trained_samples_with_its_rank_alpha_and_targets(adapter):
    folder, with_adapter, base = adapter
    assert np.abs(with_adapter - base).max() > 1e-2  # the adapter changes the samples, so the checks can fail
    pipe = base_pipeline()
    pipe.load_lora_weights(folder)
    config = pipe.unet.peft_config["default_0"]
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8.0, set(TARGETS))
    assert pipe.unet.down_blocks[1].attentions[0].to_q.lora_A["default_0"].weight.shape[0] == 2  # rank_pattern
    np.testing.assert_allclose(sample(pipe), with_adapter, atol=1e-5)
    from_dict = base_pipeline()
    state_dict, _ = UnconditionalLatentPipeline.lora_state_dict(folder)
    from_dict.load_lora_weights(state_dict, adapter_name="me")  # a state dict: ranks from shapes, alpha = rank
    assert from_dict.unet.peft_config["me"].r == 4


def test_adapter_names_weights_and_switching_them_off(adapter):
    folder, with_adapter, base = adapter
    pipe = base_pipeline()
    pipe.load_lora_weights(folder, adapter_name="me")
    with pytest.raises(ValueError, match="Adapter name me already in use"):
        pipe.load_lora_weights(folder, adapter_name="me")
    assert pipe.get_active_adapters() == ["me"] and pipe.get_list_adapters() == {"unet": ["me"]}
    pipe.set_adapters("me", 0.0)
    np.testing.assert_allclose(sample(pipe), base, atol=1e-5)
    pipe.set_adapters(["me"], [1.0])
    np.testing.assert_allclose(sample(pipe), with_adapter, atol=1e-5)
    pipe.disable_lora()
    np.testing.assert_allclose(sample(pipe), base, atol=1e-5)
    pipe.enable_lora()
    np.testing.assert_allclose(sample(pipe), with_adapter, atol=1e-5)
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters("someone-else")
    with pytest.raises(ValueError, match="Length of adapter names 1 is not equal to the length of their weights 2"):
        pipe.set_adapters(["me"], [1.0, 0.5])
    pipe.delete_adapters("me")
    assert pipe.get_list_adapters() == {}
    np.testing.assert_allclose(sample(pipe), base, atol=1e-5)


def test_fuse_unfuse_unload_and_saving_the_fused_pipeline(adapter, tmp_path):
    folder, with_adapter, base = adapter
    pipe = base_pipeline()
    pipe.load_lora_weights(folder)
    with pytest.raises(ValueError, match="carries LoRA adapters"):
        pipe.save_pretrained(tmp_path / "unfused")
    pipe.fuse_lora()
    assert pipe.num_fused_loras == 1 and pipe.fused_loras == {"default_0"}
    np.testing.assert_allclose(sample(pipe), with_adapter, atol=1e-5)
    pipe.unfuse_lora()
    np.testing.assert_allclose(sample(pipe), with_adapter, atol=1e-5)  # unmerged, the adapter still acts
    pipe.unload_lora_weights()
    assert not hasattr(pipe.unet, "peft_config")
    np.testing.assert_allclose(sample(pipe), base, atol=1e-5)

    half = base_pipeline()
    half.load_lora_weights(folder)
    half.set_adapters("default_0", 0.5)
    at_half = sample(half)
    fused = base_pipeline()
    fused.load_lora_weights(folder)
    fused.fuse_lora(lora_scale=0.5)
    fused.unload_lora_weights()  # a plain UNet with the adapter folded in
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in fused.unet.modules())
    np.testing.assert_allclose(sample(fused), at_half, atol=1e-5)
    fused.save_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(sample(load_pipeline(tmp_path / "merged")), at_half, atol=1e-5)
    with pytest.raises(ValueError, match="text_encoder is not found"):
        fused.fuse_lora(components=["text_encoder"])


def test_hotswap_replaces_the_loaded_adapter_in_place(tmp_path):
    # peft 0.21's hotswap misses per-module ranks (rank_pattern) when it sets the scaling: uniform ranks here.
    folder = save_adapter(trained_adapter(seed=1, other_rank=False), tmp_path / "first")
    other = save_adapter(trained_adapter(seed=2, other_rank=False), tmp_path / "other")
    expected = base_pipeline()
    expected.load_lora_weights(other)
    pipe = base_pipeline()
    pipe.load_lora_weights(folder, adapter_name="x")
    layer = pipe.unet.down_blocks[1].attentions[0].to_k
    pipe.load_lora_weights(other, adapter_name="x", hotswap=True)
    assert pipe.unet.down_blocks[1].attentions[0].to_k is layer and pipe.get_list_adapters() == {"unet": ["x"]}
    np.testing.assert_allclose(sample(pipe), sample(expected), atol=1e-5)
    with pytest.raises(ValueError, match="no existing adapter by that name"):
        pipe.load_lora_weights(other, adapter_name="y", hotswap=True)


def test_peft_layout_of_earlier_dreambooth_runs_still_loads(adapter, tmp_path):
    """adapter_model.safetensors + adapter_config.json, as uldm/dreambooth.py wrote them before."""
    from safetensors.torch import save_file

    from uldm.lora import lora_base_model

    _, with_adapter, _ = adapter
    trained = trained_adapter()
    old = tmp_path / "old-run"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in peft.get_peft_model_state_dict(trained.unet).items()},
              old / "adapter_model.safetensors", metadata={"format": "pt"})
    config = trained.unet.peft_config["default"]
    config.base_model_name_or_path = "outputs/base"
    config.save_pretrained(str(old))
    pipe = base_pipeline()
    pipe.load_lora_weights(old)
    assert pipe.unet.peft_config["default_0"].lora_alpha == 8.0
    np.testing.assert_allclose(sample(pipe), with_adapter, atol=1e-5)
    assert lora_base_model(old) == "outputs/base"


def test_lora_keys_for_another_component_only_are_warned_about(adapter):
    pipe = base_pipeline()
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.loaders.lora_base")
    logger.addHandler(handler)
    try:
        pipe.load_lora_weights({"text_encoder.layer.lora_A.weight": torch.zeros(4, 8)})
    finally:
        logger.removeHandler(handler)
    assert "No LoRA keys associated to UNet2DModel found with the prefix='unet'" in records[0].getMessage()
    assert pipe.get_list_adapters() == {}
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights({"unet.conv_in.weight": torch.zeros(1)})


NO_PEFT_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys, torch
    assert importlib.util.find_spec("peft") is None, "peft is still importable"
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
    from pipeline_latent_uncond import UnconditionalLatentPipeline
    preset = lambda path: {k: v for k, v in json.load(open(path)).items() if not k.startswith("_")}
    pipe = UnconditionalLatentPipeline(unet=UNet2DModel(**preset("configs/unet/tiny.json")),
                                       vae=AutoencoderKL(**preset("configs/vae/tiny-kl-f4.json")),
                                       scheduler=DDIMScheduler(), latent_scaling_factor=0.5)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    try:
        pipe.load_lora_weights({"unet.conv_in.lora_A.weight": torch.zeros(1)})
    except ValueError as error:
        print("REFUSED:", error)
    """
)


def test_the_pipeline_file_imports_and_samples_without_peft(tmp_path):
    site_packages = Path(peft.__file__).resolve().parents[1]
    without_peft = tmp_path / "site-packages"
    without_peft.mkdir()
    for entry in site_packages.iterdir():
        if not entry.name.lower().startswith("peft"):
            (without_peft / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=f"{without_peft}{os.pathsep}{REPO_ROOT}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-S", "-c", NO_PEFT_SCRIPT], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED: PEFT backend is required for `load_lora_weights()`: pip install peft." in result.stdout


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from diffusers import DiffusionPipeline
    folder, adapter, out = sys.argv[1:4]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe).__module__
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(adapter)
    np.save(out, pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images)
    """
)


def test_diffusers_loader_with_trust_remote_code_loads_the_adapter_as_the_model_card_says(adapter, tmp_path):
    folder, with_adapter, _ = adapter
    base_pipeline().save_pretrained(tmp_path / "base")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    out = tmp_path / "images.npy"
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_SCRIPT, str(tmp_path / "base"), str(folder), str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), with_adapter, atol=1e-5)
