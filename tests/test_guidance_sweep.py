"""sweep_guidance.py: the guidance weight chosen by FID (and kept as the pipeline's default), the DreamBooth
fidelity-diversity curves, and bad input refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import build_tiny_kl_vae, build_tiny_unet, make_blob_images, walk_with_snapshots
from pipeline_latent_uncond import UnconditionalLatentPipeline
from uldm.diffusion import build_noise_scheduler
from uldm.first_stage import load_saved_model
from uldm.metrics import fid
from uldm.metrics.fid_validation import FidScorer, PipelineFid

FID_IMAGES, STEPS = 8, 2


class TinyFeatures(nn.Module):
    """Fixed random conv features of uint8 images, 32 of them (as test_evaluate's): FID and KID cost nothing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.2)
            self.conv.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(images.float() / 127.5 - 1))
        return F.adaptive_avg_pool2d(features, 2).flatten(1)


def save_pipeline(unet_seed: int, folder: Path) -> Path:
    UnconditionalLatentPipeline(unet=build_tiny_unet(seed=unet_seed), vae=build_tiny_kl_vae(),
                                scheduler=build_noise_scheduler(), latent_scaling_factor=0.7).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run's pipeline with its training images, and a guide of the same latent space with post-hoc EMA snapshots."""
    root = tmp_path_factory.mktemp("sweep")
    make_blob_images(root / "data", 12)
    main = save_pipeline(0, root / "main")
    (main / "training_args.json").write_text(json.dumps({"train_data_dir": str(root / "data"), "resolution": 32,
                                                         "center_crop": True}))
    torch.jit.save(torch.jit.script(TinyFeatures()), root / "features.pt")
    guide = save_pipeline(1, root / "guide")
    walk_with_snapshots(build_tiny_unet(seed=1), guide / "ema_snapshots", steps=10, step_size=0.02)
    return {"root": root, "main": main, "guide": guide, "data": root / "data", "features": root / "features.pt"}


def run_sweep(argv):
    import sweep_guidance

    return sweep_guidance.main([str(a) for a in argv])


def fid_options(runs) -> list:
    return ["--fid_images", FID_IMAGES, "--num_inference_steps", STEPS, "--scheduler", "dpmsolver++",
            "--fid_feature_extractor", runs["features"], "--device", "cpu"]


def cached_scorer(run: Path, features: Path) -> PipelineFid:
    extractor = fid.build_feature_extractor(str(features))
    (cached,) = (run / "fid_reference").glob("reference-*.safetensors")
    reference = fid.load_stored_features(cached, extractor)
    return PipelineFid(FidScorer(extractor, reference, FID_IMAGES, STEPS), "dpmsolver++")


def test_the_sweep_writes_its_table_and_curve_and_keeps_the_best_weight_as_the_default(runs, tmp_path, capsys):
    run = shutil.copytree(runs["main"], tmp_path / "run")
    run_sweep([run, "--guide", runs["guide"], "--guidance_scales", 0, 1, 2, 3, *fid_options(runs)])
    printed = capsys.readouterr().out
    record = json.loads((run / "guidance_sweep.json").read_text())
    fids = {row["guidance_scale"]: row["fid"] for row in record["rows"]}
    assert list(fids) == [0, 1, 2, 3] and len(set(fids.values())) == 4
    best = min(fids, key=fids.get)
    assert record["best"]["guidance_scale"] == best and record["saved_as_default"]
    table = (run / "guidance_sweep.md").read_text()
    assert table in printed and "| 1 (unguided) |" in table
    assert f"| {best:g}{' (unguided)' if best == 1 else ''} **(best)** | {fids[best]:.3f}" in table
    assert (run / "guidance_sweep.png").stat().st_size > 0

    score = cached_scorer(run, runs["features"])
    reloaded = load_saved_model(run)
    assert score(reloaded) == pytest.approx(fids[1], rel=1e-4), "w = 1 is the unguided FID"
    if best == 1:
        assert reloaded.guide is None and reloaded.config.guidance_scale == 1
    else:
        assert reloaded.config.guidance_scale == best and reloaded.guide is not None
        assert score(reloaded, reloaded.guide, reloaded.config.guidance_scale) == pytest.approx(fids[best], rel=1e-4)
        reloaded.set_progress_bar_config(disable=True)  # the default a plain call uses is the guided one
        noise = dict(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
        guided = reloaded(**noise).images
        noise["generator"] = torch.Generator().manual_seed(0)
        assert torch.equal(guided, reloaded(guide=reloaded.guide, guidance_scale=best, **noise).images)


def test_a_weight_by_ema_length_table_with_no_save_leaves_the_pipeline_alone(runs, tmp_path, capsys):
    run = shutil.copytree(runs["main"], tmp_path / "run")
    before = (run / "model_index.json").read_text()
    run_sweep([run, "--guide", runs["guide"], "--guidance_scales", 1, 2, "--guide_sigma_rels", 0.05, 0.1, "--no_save",
               "--output_dir", tmp_path / "out", *fid_options(runs)])
    record = json.loads((tmp_path / "out" / "guidance_sweep.json").read_text())
    assert [(r["guidance_scale"], r["guide_sigma_rel"]) for r in record["rows"]] == [(1, 0.05), (2, 0.05), (1, 0.1), (2, 0.1)]
    assert record["rows"][0]["fid"] == record["rows"][2]["fid"], "w = 1 does not depend on the guide"
    assert record["rows"][1]["fid"] != record["rows"][3]["fid"]
    assert not record["saved_as_default"] and "--no_save" in capsys.readouterr().out
    assert (run / "model_index.json").read_text() == before and not (run / "guide").exists()


@pytest.mark.parametrize("change, message", [
    ({"--guide": "no/such/guide"}, "Could not load the guide"),
    ({"--guidance_scales": []}, "--guidance_scales needs at least one value"),
    ({"--guidance_scales": [1, -2]}, "must not be negative"),
    ({"--guide_sigma_rels": [0.5]}, "sigma_rel"),
])
def test_bad_input_is_refused_before_anything_is_written(runs, tmp_path, expect_input_error, change, message):
    run = shutil.copytree(runs["main"], tmp_path / "run")
    before = sorted(path.name for path in run.iterdir())
    options = {"--guide": runs["guide"], "--guidance_scales": [1, 2], **change}
    argv = [run] + [item for option, value in options.items()
                    for item in [option, *(value if isinstance(value, list) else [value])]]
    err = expect_input_error(run_sweep, argv + fid_options(runs))
    assert message in err and "Traceback" not in err
    assert sorted(path.name for path in run.iterdir()) == before


def test_the_dreambooth_curves_of_a_lora_result_over_weight_lora_scale_and_steps(runs, tmp_path, capsys):
    from test_guides import lora_result

    result = lora_result(runs["main"], tmp_path / "lora")
    rows = [{"step": step, "instance_distance": 0.3 - step / 1000, "sample_spread": 0.2, "instance_latent_distance": 1.0,
             "sample_latent_spread": 1.0} for step in (0, 50, 100)]
    (result / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [{"step": 1, "loss": 0.5}, *rows]))
    photos = tmp_path / "photos"
    make_blob_images(photos, 3, seed=3)
    run_sweep([result, "--instance_data_dir", photos, "--guidance_scales", 0, 1, 3, "--lora_scales", 0, 1,
               "--num_samples", 3, "--num_inference_steps", STEPS, "--device", "cpu"])
    printed = capsys.readouterr().out
    record = json.loads((result / "fidelity_diversity.json").read_text())
    curves = record["curves"]
    assert [[p["value"] for p in points] for points in curves.values()] == [[0, 1, 3], [0, 1], [0, 50, 100]]
    guided, scaled, _ = curves.values()
    assert guided[1]["fidelity"] == pytest.approx(scaled[1]["fidelity"]), "w = 1 is LoRA scale 1 unguided"
    assert guided[0]["fidelity"] != pytest.approx(guided[1]["fidelity"])
    assert (result / "fidelity_diversity.md").read_text().split("\n")[0] in printed
    assert (result / "fidelity_diversity.png").stat().st_size > 0
