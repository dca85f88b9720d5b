"""FID/KID of a model, not of a folder of samples: while it trains (`--validation_fid_images`) and when
choosing among its EMAs (`synthesize_ema.py --sweep`).

A `FidScorer` draws `num_images` samples with a fast sampler, image i always from seed + i (so two
scores differ only because the model did), spread over the processes of a run; the features are
gathered in image order, so the score is the same with 1 or 8 processes. The reference features are
extracted once (also spread over the processes) and cached by `uldm.metrics.fid`'s reference cache, keyed by
the images, their preprocessing and the extractor: a resumed run, a second run on the same data and
the sweep after training reuse them. The reference defaults to the training images preprocessed as in
training (`fid.ReferenceImages` of the training data set), as LDM scores its FIDs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from . import fid
from ..errors import InputError
from ..sampling import batches, generators_for_indices
from ..saving import decided_by_main_process

logger = logging.getLogger(__name__)

REFERENCE_CACHE_DIR_NAME = "fid_reference"  # default cache folder inside --output_dir (kept off the Hub)
# FID samples are drawn from other seeds than the validation grid's fixed noise.
FID_SEED_OFFSET = 10_000_019


@dataclass(frozen=True)
class FidConfig:
    """FID/KID of samples at each validation (the command line's names; 0 images: off)."""

    validation_fid_images: int = 0
    fid_feature_extractor: str = "inception"
    inception_weights: str | None = None
    fid_reference: str | None = None  # a folder of images or a stored features file; default: the training images
    reference_stats_cache: str | None = None  # default: <output_dir>/fid_reference
    fid_batch_size: int = 64
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    @property
    def enabled(self) -> bool:
        return self.validation_fid_images > 0


# --------------------------------------------------------------------------------------------
# Sharing work between the processes


def shard_indices(count: int, num_processes: int, process_index: int) -> range:
    """Process p's contiguous share of items 0..count-1; shares differ in length by at most one, so none is
    empty when count >= num_processes."""
    per_process, extra = divmod(count, num_processes)
    start = process_index * per_process + min(process_index, extra)
    return range(start, start + per_process + (process_index < extra))


def gather_in_order(local: torch.Tensor, count: int, num_processes: int, gather: Callable[[torch.Tensor], torch.Tensor]):
    """All processes' rows for items 0..count-1, in item order, from each process' `shard_indices` share.

    Every process must call it. Shares are padded to the same length for `gather` (accelerate's
    all-gather, which concatenates in process order); the padding is dropped again."""
    longest = math.ceil(count / num_processes)
    padding = local.new_zeros((longest - len(local), *local.shape[1:]))
    gathered = gather(torch.cat([local, padding]))
    rows = [p * longest + i for p in range(num_processes) for i in range(len(shard_indices(count, num_processes, p)))]
    return gathered[rows]


def check_enough_items(count: int, num_processes: int, what: str) -> None:
    if count < num_processes:
        raise InputError(f"{what} ({count}) must be at least the number of processes ({num_processes}): each "
                         "process scores a share of them.")


class OneProcess:
    """What FidScorer needs of an Accelerator, for a script that runs in one process (synthesize_ema.py)."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def autocast(self):
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass


def features_in_order(images, count: int, extractor: nn.Module, accelerator, batch_size: int,
                      description: str) -> torch.Tensor:
    """Features of items 0..count-1 of `images` (a data set of 3 x H x W uint8 tensors, or a function giving
    the N x 3 x H x W uint8 tensors of a list of indices, called one batch at a time so that only features are
    kept), each process extracting its share; all of them, in order, on every process. Every process must call it."""
    own = list(shard_indices(count, accelerator.num_processes, accelerator.process_index))
    chunks = [own]
    if callable(images):  # sampled one batch at a time
        chunks = tqdm(list(batches(own, batch_size)), desc=description, unit="batch",
                      disable=not accelerator.is_main_process)
    parts = []
    for chunk in chunks:
        dataset = _Tensors(images(chunk)) if callable(images) else Subset(images, chunk)
        with torch.autocast(accelerator.device.type, enabled=False):  # features in fp32, whatever the run's precision
            parts.append(fid.extract_features(dataset, extractor, batch_size=batch_size, device=accelerator.device,
                                              desc=description, progress=accelerator.is_main_process and not callable(images)))
    gathered = gather_in_order(torch.cat(parts).to(accelerator.device), count, accelerator.num_processes,
                               accelerator.gather)
    return gathered.cpu()


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tensors[index]


# --------------------------------------------------------------------------------------------
# The reference


def reference_features(reference: fid.ReferenceImages | str | os.PathLike, extractor: nn.Module, accelerator,
                       cache_dir: str | os.PathLike | None, batch_size: int = 64) -> torch.Tensor | None:
    """The reference's features on the main process (None on the others): read from a stored features file
    (`reference` a path), or from the cache, or extracted by all processes together and then cached."""
    if not isinstance(reference, fid.ReferenceImages):
        return fid.load_stored_features(reference, extractor) if accelerator.is_main_process else None
    cache_path = description = None
    if cache_dir is not None:
        cache_path, description = fid.reference_cache_path(reference, extractor, cache_dir)
    cached = decided_by_main_process(accelerator, lambda: cache_path is not None and cache_path.is_file())
    if cached:
        return fid.load_cached_features(cache_path) if accelerator.is_main_process else None
    check_enough_items(len(reference), accelerator.num_processes, "The FID reference's images")
    features = features_in_order(reference, len(reference), extractor, accelerator, batch_size, "FID reference features")
    if accelerator.is_main_process and cache_path is not None:
        fid.save_reference_features(cache_path, features, description)
    accelerator.wait_for_everyone()
    return features if accelerator.is_main_process else None


# --------------------------------------------------------------------------------------------
# Scoring a model


@torch.no_grad()
def sample_uint8(pipeline, indices: Sequence[int], seed: int, num_inference_steps: int, batch_size: int) -> torch.Tensor:
    """Samples `indices` (image i from seed + i) as N x 3 x H x W uint8, quantised as a saved PNG is."""
    chunks = []
    for batch in batches(list(indices), batch_size):
        images = pipeline(batch_size=len(batch), num_inference_steps=num_inference_steps,
                          generator=generators_for_indices(seed, batch), output_type="pt").images
        chunks.append(images.float().mul(255).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(chunks)


@dataclass
class FidScorer:
    """FID/KID of a pipeline's `num_images` samples (image i from `seed` + i, the same at every call) against
    `reference` features (N x D, held by the main process; None on the others)."""

    extractor: nn.Module
    reference: torch.Tensor | None
    num_images: int
    num_inference_steps: int
    seed: int = 0
    batch_size: int = 64
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def score(self, pipeline, accelerator=None) -> dict[str, float] | None:
        """{"fid", "kid"} on the main process, None on the others; every process must call it."""
        accelerator = accelerator or OneProcess(pipeline.device)

        def samples(indices) -> torch.Tensor:
            with accelerator.autocast():
                return sample_uint8(pipeline, indices, self.seed + FID_SEED_OFFSET, self.num_inference_steps,
                                    self.batch_size)

        features = features_in_order(samples, self.num_images, self.extractor, accelerator, self.batch_size,
                                     "FID samples")
        if not accelerator.is_main_process:
            return None
        kid, _, _ = fid.kid_from_features(self.reference, features, self.kid_subsets, self.kid_subset_size,
                                          seed=self.seed, device=accelerator.device)
        return {"fid": fid.fid_from_features(self.reference, features, accelerator.device), "kid": kid}

    def score_training_model(self, loop, make_pipeline: Callable[[Any], Any]) -> dict[str, float] | None:
        """Score the model of a TrainingLoop as validation samples it (EMA weights, eval mode, autocast)."""
        from ..validation import sampling_model

        with sampling_model(loop) as model:
            return self.score(make_pipeline(model), loop.accelerator)


def load_feature_extractor(config: FidConfig) -> nn.Module:
    """The configured extractor (InputError when its file is missing); says once when its FIDs are not
    comparable with published ones."""
    extractor = fid.build_feature_extractor(config.fid_feature_extractor, config.inception_weights)
    if config.fid_feature_extractor == "random-conv":
        logger.warning(fid.RANDOM_FEATURES_CAVEAT)
    return extractor.eval()


def check_reference_option(reference: str | None) -> None:
    if reference is not None and not (Path(reference).is_dir() or Path(reference).is_file()):
        raise InputError(f"--fid_reference {reference} does not exist: give a folder of reference images or a "
                         "features file of the reference cache (reference-*.safetensors).")


def build_reference(config: FidConfig, training_images, resolution: int, center_crop: bool, seed: int):
    """What the samples are compared with: --fid_reference (a folder, read like training, or a stored features
    file), else the training images as training preprocesses them."""
    check_reference_option(config.fid_reference)
    if config.fid_reference is None:
        return fid.ReferenceImages(training_images)
    if Path(config.fid_reference).is_file():
        return Path(config.fid_reference)
    return fid.ReferenceImages(fid.reference_folder(config.fid_reference, resolution, center_crop, seed))


def training_images(data_config, train_set, files):
    """The training images as a data set (the FID reference): `train_set` itself, or, when it holds cached latents,
    the readable files it was encoded from (nothing is opened until the reference features are extracted)."""
    from ..data import ImageFolderDataset, build_image_dataset

    if not hasattr(train_set, "gather"):
        return train_set
    if files:
        return ImageFolderDataset(files, Path(data_config.train_data_dir), data_config.preprocessing, data_config.seed)
    return build_image_dataset(data_config)


def build_fid_scorer(config: FidConfig, extractor: nn.Module, reference, accelerator, output_dir: str | os.PathLike,
                     num_inference_steps: int, seed: int = 0) -> FidScorer:
    """A FidScorer with the reference features ready (every process must call this)."""
    check_enough_items(config.validation_fid_images, accelerator.num_processes, "--validation_fid_images")
    cache_dir = config.reference_stats_cache or Path(output_dir) / REFERENCE_CACHE_DIR_NAME
    features = reference_features(reference, extractor, accelerator, cache_dir, config.fid_batch_size)
    if accelerator.is_main_process:
        where = reference if not isinstance(reference, fid.ReferenceImages) else f"{len(reference)} images"
        logger.info("FID/KID of %d samples (%d sampler steps) against %s (%d x %d features; cache %s)",
                    config.validation_fid_images, num_inference_steps, where, *features.shape, cache_dir)
    return FidScorer(extractor, features, config.validation_fid_images, num_inference_steps, seed,
                     config.fid_batch_size, config.kid_subsets, config.kid_subset_size)


def fid_history(output_dir: str | os.PathLike) -> str:
    """The FID/KID rows of a run's metrics.jsonl as a small table (the quick start prints it)."""
    from ..training import read_metrics

    rows = read_metrics(output_dir, having="fid")
    lines = ["   step      FID       KID"]
    lines += [f"{row['step']:>7}  {row['fid']:7.2f}  {row.get('kid', float('nan')):8.4f}" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Choosing among candidates (synthesize_ema.py --sweep)


def saved_training_arguments(pipeline_dir: Path) -> dict:
    path = Path(pipeline_dir) / "training_args.json"
    if not path.is_file():
        raise InputError(f"{pipeline_dir} has no training_args.json, which says what the training images were and how "
                         "they were preprocessed; the FID reference cannot be read like them. Give the training run's "
                         "output folder, or a stored features file with --fid_reference.")
    return json.loads(path.read_text())


def training_run_reference(config: FidConfig, pipeline_dir: Path, seed: int):
    """--fid_reference, else the training images of the run saved in `pipeline_dir`; folders are read as the run
    read its data (its resolution; cached latents imply centre crops, as in training)."""
    import argparse

    from .. import args as cli
    from ..data import DataConfig, build_image_dataset

    if config.fid_reference is not None and Path(config.fid_reference).is_file():
        return build_reference(config, None, 0, True, seed)  # stored features: no images to read
    saved = saved_training_arguments(pipeline_dir)
    run_args = argparse.Namespace(**saved)
    center_crop = cli.center_crop_of(run_args)
    images = None
    if config.fid_reference is None:
        data = cli.config_from(DataConfig, run_args, center_crop=center_crop)
        try:
            images = build_image_dataset(data)
        except (InputError, OSError) as error:
            raise InputError(f"The training images of {pipeline_dir} cannot be read ({error}); give the FID "
                             "reference with --fid_reference.") from error
    return build_reference(config, images, saved["resolution"], center_crop, seed)


def sweep_scorer(config: FidConfig, pipeline_dir: str | os.PathLike, num_inference_steps: int, seed: int = 0,
                 device: str | torch.device = "cpu") -> FidScorer:
    """The FidScorer of a sweep after training, in one process: the reference of `training_run_reference`, its
    features cached with the training run's (<pipeline_dir>/fid_reference unless --reference_stats_cache)."""
    extractor = load_feature_extractor(config)
    reference = training_run_reference(config, Path(pipeline_dir), seed)
    return build_fid_scorer(config, extractor, reference, OneProcess(device), pipeline_dir, num_inference_steps, seed)


class PipelineFid:
    """`score(pipeline) -> FID` for `posthoc_ema.write_synthesized_pipelines`: samples the pipeline's models with
    the sampler named `scheduler_name` on `device`; every result (FID and KID) is kept in `results`. With a
    `guide`, the samples are guided by it with `guidance_scale` (and `guidance_interval`), whatever the pipeline's
    own guidance; without one they are unguided."""

    def __init__(self, scorer: FidScorer, scheduler_name: str, device: str | torch.device = "cpu"):
        self.scorer, self.scheduler_name, self.device = scorer, scheduler_name, torch.device(device)
        self.results: list[dict[str, float]] = []

    def __call__(self, pipeline, guide=None, guidance_scale: float = 1.0,
                 guidance_interval: tuple[float, float] | None = None) -> float:
        from ..sampling import with_sampler

        pipeline.to(self.device)
        sampler = with_sampler(pipeline, self.scheduler_name)
        if guide is not None:
            sampler.set_guidance(guide, guidance_scale, guidance_interval)
        result = self.scorer.score(sampler, OneProcess(self.device))
        self.results.append(result)
        return result["fid"]


# A column of a table: its header and how a row's value reads.
Column = tuple[str, Callable[[dict[str, Any]], str]]
FID_COLUMNS: tuple[Column, ...] = (("FID", lambda row: f"{row['fid']:.3f}"), ("KID", lambda row: f"{row['kid']:.5f}"))
SIGMA_REL_COLUMNS: tuple[Column, ...] = (
    ("sigma_rel", lambda row: f"{row['sigma_rel']:g}"),
    *FID_COLUMNS,
    ("profile fit error", lambda row: f"{row['fit_error']:.1e}"),
    ("kept", lambda row: row["folder"] or "-"),
)


def markdown_table(rows: Sequence[dict[str, Any]], description: str, columns: Sequence[Column],
                   best: dict[str, Any] | None = None) -> str:
    """Markdown under a description line: one row per item, `best` (one of `rows`) marked in its first column."""
    lines = [description, "", "| " + " | ".join(header for header, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = [show(row) for _, show in columns]
        cells[0] += " **(best)**" if row is best else ""
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_table(rows: Sequence[dict[str, Any]], description: str,
                columns: Sequence[Column] = SIGMA_REL_COLUMNS) -> str:
    """Markdown: one row per candidate (by default synthesize_ema's: sigma_rel, FID, KID, profile fit error, kept
    folder), the best (lowest FID) marked."""
    return markdown_table(rows, description, columns, best=min(rows, key=lambda row: row["fid"]))
