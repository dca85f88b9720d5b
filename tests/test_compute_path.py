"""The compute path of the training loop: losses read back once per logging interval (and a NaN still stops the
run before anything trained from it is saved), torch.compile, fused/foreach AdamW, EMA with foreach, the frozen
VAE's dtype, and the engine settings (DeepSpeed's clipping, FSDP1 refused)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import uldm.training
from conftest import build_tiny_unet, latent_training_args, run_script
from uldm.training import EmaConfig, LoopConfig, OptimizerConfig, build_ema, build_optimizer, read_metrics

SCRIPT = "train_unconditional_latent"


# --------------------------------------------------------------------------------------------
# Read-backs and the non-finite stop


def test_a_nan_between_read_backs_stops_before_the_next_checkpoint_and_names_its_step(
        train_images, tiny_vae_dir, tmp_path, monkeypatch, expect_input_error):
    """--logging_steps 100 with accumulation 2: over 4 steps (8 micro-batches) the losses are read back only before
    the two checkpoints. A NaN loss in step 3 is found before checkpoint-4 is written: checkpoint-2 stays, the
    message names step 3, and the steps before it are in metrics.jsonl."""
    import train_unconditional_latent

    calls = {"micro_batches": 0, "read_backs": 0}
    original_loss, original_read_back = train_unconditional_latent.weighted_loss, uldm.training.StepRecords.read_back

    def loss_with_a_nan_in_step_3(*args, **kwargs):
        calls["micro_batches"] += 1
        loss = original_loss(*args, **kwargs)
        return loss * float("nan") if calls["micro_batches"] == 5 else loss  # micro-batch 5 = step 3's first

    def counted_read_back(self, accelerator):
        calls["read_backs"] += 1
        return original_read_back(self, accelerator)

    monkeypatch.setattr(train_unconditional_latent, "weighted_loss", loss_with_a_nan_in_step_3)
    monkeypatch.setattr(uldm.training.StepRecords, "read_back", counted_read_back)
    out = tmp_path / "out"
    argv = latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=6, gradient_accumulation_steps=2,
                                checkpointing_steps=2, logging_steps=100)
    message = expect_input_error(run_script, SCRIPT, argv)

    assert "NaN or infinite at step 3 (micro-batch 5)" in message and "checkpoint-2, is intact" in message
    assert calls == {"micro_batches": 8, "read_backs": 2}  # step 4 ran: the NaN was not seen before its read-back
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model_index.json").exists()
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert [row["step"] for row in read_metrics(out, having="loss")] == [1, 2]


def test_metrics_keep_one_row_per_step_whatever_the_logging_interval(train_images, tiny_vae_dir, tmp_path):
    """The rows of a run read back every 4 steps are those of a run read back every step (same losses, learning
    rates and epochs), with images/s averaged over each interval."""
    common = dict(max_train_steps=6, gradient_accumulation_steps=2, use_ema=True, lr_scheduler="cosine")
    every_step, every_fourth = tmp_path / "every_step", tmp_path / "every_fourth"
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, every_step, logging_steps=1, **common))
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, every_fourth, logging_steps=4, **common))
    a, b = read_metrics(every_step, having="loss"), read_metrics(every_fourth, having="loss")
    assert [row["step"] for row in b] == [1, 2, 3, 4, 5, 6]
    for row_a, row_b in zip(a, b):
        assert set(row_a) == set(row_b)
        for key in ("loss", "lr", "epoch", "ema_decay"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-6, abs=1e-9), key
    assert b[0]["images_per_sec"] == b[3]["images_per_sec"]  # steps 1-4: one interval
    assert b[4]["images_per_sec"] == b[5]["images_per_sec"]  # steps 5-6: the last one, cut short by the end


# --------------------------------------------------------------------------------------------
# torch.compile


def test_a_compiled_run_trains_like_an_eager_one_without_graph_breaks(train_images, tiny_vae_dir, tmp_path):
    """--torch_compile compiles the UNet (inductor: about a minute on 2 CPU cores, the reason this is the one
    compiled test); its losses equal the eager run's within rounding and the saved pipeline is a plain UNet."""
    from diffusers import UNet2DModel
    from torch._dynamo.utils import counters

    common = dict(max_train_steps=3, train_batch_size=4, learning_rate=1e-3)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, eager, **common))
    counters.clear()
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, compiled, torch_compile=True, **common))

    assert counters["frames"]["ok"] > 0, "nothing was compiled"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    a, b = read_metrics(eager, having="loss"), read_metrics(compiled, having="loss")
    assert len(a) == len(b) == 3
    for row_a, row_b in zip(a, b):
        assert row_b["loss"] == pytest.approx(row_a["loss"], rel=1e-4)
    unet = UNet2DModel.from_pretrained(compiled / "unet")  # keys without torch.compile's _orig_mod. prefix
    reference = UNet2DModel.from_pretrained(eager / "unet")
    worst = max((p - q).abs().max().item() for p, q in zip(unet.parameters(), reference.parameters()))
    assert worst < 1e-4


# --------------------------------------------------------------------------------------------
# Optimiser and EMA implementations


def _parameters_with_gradients(seed: int = 0):
    model = build_tiny_unet(seed)
    generator = torch.Generator().manual_seed(1)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-2
    return model


def test_adamw_is_fused_where_torch_has_it_and_equals_the_single_tensor_loop():
    config = OptimizerConfig(learning_rate=1e-2)
    assert uldm.training.adamw_implementation("cpu") == {"fused": True}  # torch >= 2.4 fuses AdamW on the CPU
    assert uldm.training.adamw_implementation("meta") == {"foreach": True}
    reference, tuned = _parameters_with_gradients(), _parameters_with_gradients()
    loop_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(config.adam_beta1, config.adam_beta2),
                                       weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, foreach=False)
    optimizer = build_optimizer(tuned.parameters(), config, 1e-2, device="cpu")
    assert optimizer.defaults["fused"] is True
    for _ in range(3):
        loop_optimizer.step()
        optimizer.step()
    for p, q in zip(reference.parameters(), tuned.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(p, q) for p, q in zip(build_tiny_unet(0).parameters(), tuned.parameters()))


def test_ema_steps_with_foreach_and_averages_like_the_default():
    from diffusers.training_utils import EMAModel

    model = build_tiny_unet(0)
    ema = build_ema(model, EmaConfig(ema_max_decay=0.9))
    assert ema.foreach
    reference = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    for step in range(3):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * (step + 1))
        ema.step(model.parameters())
        reference.step(model.parameters())
    for average, expected in zip(ema.shadow_params, reference.shadow_params):
        torch.testing.assert_close(average, expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# The frozen VAE's dtype


def test_the_frozen_vae_is_fp32_unless_bf16_pays_off_or_is_asked_for():
    from uldm.vae import vae_dtype_for

    assert vae_dtype_for("bf16") is torch.bfloat16  # encodes every step: bf16 is faster and cannot overflow
    assert vae_dtype_for("bf16", cache_latents=True) is torch.float32  # encoded once and stored: accurate
    assert vae_dtype_for("fp16") is torch.float32  # SD's VAE overflows in fp16
    assert vae_dtype_for("no") is vae_dtype_for(None) is torch.float32
    assert vae_dtype_for("fp16", "fp16") is torch.float16  # asked for (an fp16-safe VAE)
    assert vae_dtype_for("bf16", "fp32") is torch.float32


# --------------------------------------------------------------------------------------------
# Engines


@pytest.mark.parametrize("max_grad_norm", [0.0, 2.5])
def test_deepspeed_gets_the_clipping_threshold_even_when_it_is_zero(tmp_path, max_grad_norm):
    """accelerate fills DeepSpeed's "auto" gradient_clipping with 1.0 at prepare; 0 (no clipping) must survive it."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1)
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"
    uldm.training.write_deepspeed_settings(plugin.deepspeed_config,
                                           LoopConfig(output_dir=str(tmp_path), train_batch_size=4,
                                                      max_grad_norm=max_grad_norm))
    # What accelerator.prepare does with the config (accelerate 1.15, _prepare_deepspeed).
    plugin.deepspeed_config_process(must_match=False, gradient_clipping=1.0, train_micro_batch_size_per_gpu=4,
                                    train_batch_size=8)
    assert plugin.deepspeed_config["gradient_clipping"] == max_grad_norm
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4


def test_fsdp1_is_refused_before_anything_is_written(train_images, tiny_vae_dir, tmp_path, monkeypatch,
                                                     expect_input_error):
    monkeypatch.setenv("ULDM_TEST_FORCE_FSDP", "1")
    out = tmp_path / "out"
    message = expect_input_error(run_script, SCRIPT, latent_training_args(train_images, tiny_vae_dir, out))
    assert "FSDP1 is not supported" in message and "fsdp_version: 2" in message
    assert not out.exists()


def test_no_logging_interval_below_one(train_images, tiny_vae_dir, tmp_path, expect_input_error):
    message = expect_input_error(run_script, SCRIPT, latent_training_args(train_images, tiny_vae_dir, tmp_path / "o",
                                                                           logging_steps=0))
    assert "--logging_steps must be at least 1" in message


def test_asking_for_fsdp_where_accelerate_runs_without_it_is_said(tmp_path, monkeypatch, caplog):
    """On CPUs accelerate ignores ACCELERATE_USE_FSDP (what `accelerate launch --config_file fsdp.yaml` exports)."""
    from uldm.testing import reset_accelerate_state

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    reset_accelerate_state()
    try:
        with caplog.at_level("WARNING", logger="uldm.training"):
            accelerator = uldm.training.make_accelerator(LoopConfig(output_dir=str(tmp_path / "out"), report_to="none"))
        assert not uldm.training.is_fsdp(accelerator)
    finally:
        reset_accelerate_state()
    assert "FSDP was asked for (ACCELERATE_USE_FSDP=true), but accelerate runs" in caplog.text
