"""Choosing the guidance weight by measurement (sweep_guidance.py; docs/quality.md, "Choosing the guidance weight").

* FID/KID per guidance weight (`sweep_weights`), and per EMA length of the guide where its run saved post-hoc EMA
  snapshots (`GuideEmaLengths`): a table (`weight_table`), a curve (`uldm.plots.plot_guidance_sweep`), and the best
  weight stored as the pipeline's default (`keep_best`) where the pipeline can carry its guide (`why_not_saved`).
* For a DreamBooth result, the fidelity-diversity curves (`fidelity_curves`): subject similarity against the variety
  between samples, over the guidance weight (guided by its base), the LoRA scale and the training steps, so one sees
  which dial gives more subject at the same variety.

Every sample set is drawn from the same seeds, so two points differ only by the dial.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import InputError
from .metrics.fid_validation import FID_COLUMNS, PipelineFid, markdown_table, sweep_table

logger = logging.getLogger(__name__)

SWEEP_NAME = "guidance_sweep"  # <output_dir>/guidance_sweep.md, .json, .png
CURVES_NAME = "fidelity_diversity"  # the DreamBooth curves, likewise
FID_WEIGHTS = (1.0, 1.5, 2.0, 3.0)
DREAMBOOTH_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
LORA_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
UNGUIDED = 1.0


def check_dial_values(values: Sequence[float] | None, option: str) -> list[float]:
    """The values of a dial (weights, LoRA scales), in the given order without repeats; InputError when there are
    none or one is negative."""
    if not values:
        raise InputError(f"{option} needs at least one value (e.g. {option} 1 1.5 2 3).")
    negative = [value for value in values if value < 0]
    if negative:
        raise InputError(f"{option} must not be negative, got {negative}: 0 is the guide alone (or no LoRA), 1 the "
                         "model alone, above 1 away from the guide.")
    return list(dict.fromkeys(float(value) for value in values))


# --------------------------------------------------------------------------------------------
# FID/KID per weight


@dataclass
class GuideEmaLengths:
    """EMA lengths of the guide, each synthesised from its run's post-hoc EMA snapshots (uldm.training.posthoc_ema,
    as synthesize_ema.py does). `check` refuses lengths the snapshots cannot make before anything is sampled."""

    snapshots: list
    sigma_rels: list[float]
    at_step: int
    max_fit_error: float

    @classmethod
    def check(cls, snapshot_dir: str | os.PathLike, sigma_rels: Sequence[float], guide: torch.nn.Module,
              at_step: int | None = None, max_fit_error: float = 0.2) -> "GuideEmaLengths":
        from .training.posthoc_ema import (check_shapes_fit, check_sigma_rel, list_snapshots, profile_fits,
                                           snapshot_shapes, snapshots_for_step)

        sigma_rels = list(dict.fromkeys(check_sigma_rel(value) for value in sigma_rels))
        snapshots = list_snapshots(snapshot_dir)
        used, step = snapshots_for_step(snapshots, at_step)
        profile_fits(used, sigma_rels, step, max_fit_error)
        check_shapes_fit(snapshot_shapes(snapshots[-1].path), guide, f"The guide's snapshots in {snapshot_dir}")
        return cls(snapshots, sigma_rels, step, max_fit_error)

    def load(self, guide: torch.nn.Module, sigma_rel: float) -> None:
        """Put the EMA of `sigma_rel` into the guide's weights (one length at a time: one float64 copy in memory)."""
        from .training.posthoc_ema import synthesize_state_dicts

        (synthesized,) = synthesize_state_dicts(self.snapshots, [sigma_rel], self.at_step, self.max_fit_error)
        guide.load_state_dict(synthesized.state_dict)


def fid_per_weight(pipeline, guide, weights: Sequence[float], score: PipelineFid,
                   interval: tuple[float, float] | None = None, guide_sigma_rel: float | None = None,
                   unguided: dict | None = None) -> list[dict]:
    """One row per weight: {"guidance_scale", "guide_sigma_rel", "fid", "kid"}. `unguided`, a row of w = 1 measured
    before (it does not depend on the guide), is reused instead of sampled again."""
    rows = []
    for weight in weights:
        if weight == UNGUIDED and unguided is not None:
            result = {"fid": unguided["fid"], "kid": unguided["kid"]}
        else:
            score(pipeline, guide, weight, interval)
            result = score.results[-1]
        rows.append({"guidance_scale": weight, "guide_sigma_rel": guide_sigma_rel, **result})
        logger.info("w %g%s: FID %.3f, KID %.5f", weight, "" if guide_sigma_rel is None else
                    f" (guide sigma_rel {guide_sigma_rel:g})", result["fid"], result["kid"])
    return rows


def sweep_weights(pipeline, guide, weights: Sequence[float], score: PipelineFid,
                  interval: tuple[float, float] | None = None, ema_lengths: GuideEmaLengths | None = None) -> list[dict]:
    """FID/KID of every weight, for each of the guide's EMA lengths when given (a weight x sigma_rel table)."""
    if ema_lengths is None:
        return fid_per_weight(pipeline, guide, weights, score, interval)
    rows: list[dict] = []
    for sigma_rel in ema_lengths.sigma_rels:
        ema_lengths.load(guide, sigma_rel)
        unguided = next((row for row in rows if row["guidance_scale"] == UNGUIDED), None)
        rows += fid_per_weight(pipeline, guide, weights, score, interval, sigma_rel, unguided)
    return rows


def best_row(rows: Sequence[dict]) -> dict:
    return min(rows, key=lambda row: row["fid"])


def weight_table(rows: Sequence[dict], description: str) -> str:
    columns = [("guidance weight", lambda row: f"{row['guidance_scale']:g}"
                + (" (unguided)" if row["guidance_scale"] == UNGUIDED else ""))]
    if any(row.get("guide_sigma_rel") is not None for row in rows):
        columns.append(("guide sigma_rel", lambda row: f"{row['guide_sigma_rel']:g}"))
    return sweep_table(rows, description, [*columns, *FID_COLUMNS])


def why_not_saved(pipeline, guide, source: str | os.PathLike) -> str | None:
    """Why the best weight cannot become the default of the pipeline folder `source` (None: it can)."""
    from diffusers import UNet2DModel

    from .lora import holds_lora_adapter

    if not (Path(source) / "model_index.json").is_file():
        return f"{source} is not a local pipeline folder"
    if holds_lora_adapter(source):
        return f"{source} holds a LoRA adapter, not a whole pipeline"
    if getattr(pipeline, "vae", None) is None:
        return "a pixel-space DDPMPipeline folder has no place for a guide"
    if not isinstance(guide, UNet2DModel):
        return "the guide is the pipeline's own UNet with its LoRA switched off, which a saved pipeline cannot hold"
    return None


def keep_best(pipeline, guide, best: dict, interval: tuple[float, float] | None, folder: str | os.PathLike) -> None:
    """Save the pipeline into `folder` (atomically: uldm.saving) with the best weight as its default: with the guide
    as a component, or without one when unguided sampling scored best. The guide must hold the best row's weights."""
    from .saving import save_pretrained_atomically

    if best["guidance_scale"] == UNGUIDED:
        pipeline.set_guidance(None)
    else:
        pipeline.set_guidance(guide, best["guidance_scale"], interval)
    save_pretrained_atomically(pipeline, folder, "the pipeline with its best guidance weight")


# --------------------------------------------------------------------------------------------
# DreamBooth: fidelity against diversity


@dataclass
class SubjectMeter:
    """Measures samples against the instance photos: fidelity (DINO, else CLIP-I, else the distance to the photos
    as DreamBooth's validation logs it) and variety (that encoder's diversity, else the mean pairwise distance
    between samples), under the keys of the run's metrics.jsonl."""

    references: object  # uldm.dreambooth.SubjectReferences
    embeddings: object | None = None  # uldm.metrics.subject_similarity.InstanceEmbeddings

    @property
    def keys(self) -> tuple[str, str]:
        if self.embeddings is None:
            return "instance_distance", "sample_spread"
        metric = "dino" if "dino" in self.embeddings.encoders else "clip_i"
        return metric, f"div_{metric}"

    @property
    def labels(self) -> tuple[str, str]:
        if self.embeddings is None:
            return ("distance to the nearest instance photo (RMS, 32 px; lower: more subject)",
                    "mean distance between two samples (RMS, 32 px)")
        name = {"dino": "DINO", "clip_i": "CLIP-I"}[self.keys[0]]
        return f"{name} similarity to the instance photos", f"{name} diversity (1 - similarity between samples)"

    @property
    def lower_is_more_subject(self) -> bool:
        return self.embeddings is None

    def measure(self, latents: torch.Tensor, images: np.ndarray) -> dict[str, float]:
        values = self.references.measure(latents, images)
        if self.embeddings is not None:
            scores = self.embeddings.score(images)
            values.update({key: value for key, value in scores.items() if key in ("dino", "clip_i", "div_dino",
                                                                                  "div_clip_i") and value is not None})
        return values

    def point(self, dial: str, value: float, values: dict) -> dict:
        fidelity, diversity = self.keys
        return {"dial": dial, "value": value, "fidelity": values[fidelity], "diversity": values[diversity], **values}


@dataclass
class Draw:
    """The samples of one point: the same starting noise every time, in batches."""

    noise: torch.Tensor
    num_inference_steps: int
    batch_size: int = 16

    def __call__(self, pipeline, **options) -> tuple[torch.Tensor, np.ndarray]:
        from .validation import samples_from_noise

        parts = [samples_from_noise(pipeline, chunk.to(pipeline.device), self.num_inference_steps, **options)
                 for chunk in self.noise.split(self.batch_size)]
        return torch.cat([latents.cpu() for latents, _ in parts]), np.concatenate([images for _, images in parts])


GUIDANCE_DIAL, LORA_DIAL, STEPS_DIAL = "guidance weight (guide: base)", "LoRA scale", "training step"


def guidance_curve(pipeline, guide, weights: Sequence[float], meter: SubjectMeter, draw: Draw,
                   interval: tuple[float, float] | None = None) -> list[dict]:
    return [meter.point(GUIDANCE_DIAL, weight, meter.measure(*draw(pipeline, guide=guide, guidance_scale=weight,
                                                                  guidance_interval=interval)))
            for weight in weights]


def lora_scale_curve(pipeline, scales: Sequence[float], meter: SubjectMeter, draw: Draw) -> list[dict]:
    """Unguided samples with the LoRA adapter scaled (set_adapters); none for a result without an adapter."""
    adapters = pipeline.get_active_adapters() if hasattr(pipeline, "get_active_adapters") else []
    if not adapters:
        return []
    points = []
    try:
        for scale in scales:
            pipeline.set_adapters(adapters, [scale] * len(adapters))
            points.append(meter.point(LORA_DIAL, scale, meter.measure(*draw(pipeline, guidance_scale=UNGUIDED))))
    finally:
        pipeline.set_adapters(adapters, [1.0] * len(adapters))
    return points


def training_curve(run_dir: str | os.PathLike, meter: SubjectMeter) -> list[dict]:
    """The run's own validations (metrics.jsonl rows with the meter's keys), where present."""
    from .training import read_metrics
    from .training.records import METRICS_FILE

    if not (Path(run_dir) / METRICS_FILE).is_file():
        return []
    fidelity, diversity = meter.keys
    return [meter.point(STEPS_DIAL, row["step"], row) for row in read_metrics(run_dir, having=fidelity)
            if isinstance(row.get(diversity), (int, float))]


@dataclass
class FidelityCurves:
    curves: dict[str, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def fidelity_curves(pipeline, guide, weights: Sequence[float], lora_scales: Sequence[float], meter: SubjectMeter,
                    draw: Draw, run_dir: str | os.PathLike | None,
                    interval: tuple[float, float] | None = None) -> FidelityCurves:
    result = FidelityCurves({GUIDANCE_DIAL: guidance_curve(pipeline, guide, weights, meter, draw, interval)})
    result.curves[LORA_DIAL] = lora_scale_curve(pipeline, lora_scales, meter, draw)
    if not result.curves[LORA_DIAL]:
        result.notes.append("No LoRA scale curve: the result is a full fine-tune (no adapter to scale).")
    result.curves[STEPS_DIAL] = training_curve(run_dir, meter) if run_dir is not None else []
    if not result.curves[STEPS_DIAL]:
        result.notes.append(f"No training-step curve: the run folder has no validation rows with "
                            f"{' and '.join(meter.keys)} in metrics.jsonl.")
    else:
        result.notes.append("The training-step points are the run's validation samples (its own noise, count and "
                            "sampler), not this sweep's.")
    return result


def curves_table(curves: dict[str, list[dict]], meter: SubjectMeter, description: str) -> str:
    fidelity, diversity = meter.labels
    rows = [point for points in curves.values() for point in points]
    columns = [("dial", lambda row: row["dial"]), ("value", lambda row: f"{row['value']:g}"),
               (fidelity, lambda row: f"{row['fidelity']:.4f}"), (diversity, lambda row: f"{row['diversity']:.4f}")]
    return markdown_table(rows, description, columns)
