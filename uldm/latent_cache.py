"""Encode the training set once and train from the stored latents.

For KL autoencoders the cache keeps the posterior's mean and std, so every epoch still draws a
fresh latent sample; with random flips it also keeps the moments of the mirrored image. The
cache lives in `<latent_cache_dir>/<key>/`, where the key digests the data set, the VAE, the
resolution, the crop and the flip setting, so a cache made under other settings is never
reused. All processes encode their own share; a `meta.json` written last marks a cache
complete, and only complete caches are read. This module only stores and reads latents; what
they mean (scale, samples, flips) is `uldm.latents`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .latents import RunningMoments, encode_moments

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_STORE_DTYPE = np.float16  # latents and stds are small numbers; halves the cache size


def cache_key(dataset_fingerprint: str, vae_fingerprint: str, preprocessing_key: str, with_flips: bool) -> str:
    text = f"v{CACHE_FORMAT_VERSION}|{dataset_fingerprint}|{vae_fingerprint}|{preprocessing_key}|flip={with_flips}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class LatentCacheDataset(Dataset):
    """Items: {"mean", "std" (KL only), "mean_flipped"/"std_flipped" (with flips), "index"}."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "meta.json").read_text())
        self.folder = folder
        self.meta = meta
        self.has_std = meta["has_std"]
        self.with_flips = meta["with_flips"]
        self.fields = ["mean"] + (["std"] if self.has_std else [])
        if self.with_flips:
            self.fields += [f"{name}_flipped" for name in list(self.fields)]
        # Memory-mapped, so processes on one machine share the pages instead of copying them.
        self.parts = [self._load_part(folder / part) for part in meta["parts"]]
        self.location = np.empty((meta["num_items"], 2), dtype=np.int64)
        self.location[:] = -1
        for part_number, part in enumerate(self.parts):
            rows = np.arange(len(part["index"]))
            self.location[np.asarray(part["index"])] = np.stack([np.full_like(rows, part_number), rows], axis=1)
        if (self.location < 0).any():
            raise RuntimeError(f"The latent cache {folder} is missing items; delete it to rebuild.")

    def __len__(self) -> int:
        return len(self.location)

    def __getitem__(self, index: int) -> dict:
        part_number, row = self.location[index]
        part = self.parts[part_number]
        item = {name: torch.from_numpy(np.asarray(part[name][row], dtype=np.float32)) for name in self.fields}
        item["index"] = index
        return item

    def _load_part(self, part: Path) -> dict[str, np.ndarray]:
        index = np.load(part / "index.npy", mmap_mode="r")
        if len(index) == 0:  # a process that had no images to encode wrote nothing else
            return {"index": index}
        return {"index": index, **{name: np.load(part / f"{name}.npy", mmap_mode="r") for name in self.fields}}

    def latent_moments(self, shift: float = 0.0) -> RunningMoments:
        """Moments of latent samples over the whole cache (unflipped), without touching the VAE."""
        moments = RunningMoments()
        for part in self.parts:
            for start in range(0, len(part["index"]), 256):
                mean = torch.from_numpy(np.asarray(part["mean"][start : start + 256], dtype=np.float32))
                std = None
                if self.has_std:
                    std = torch.from_numpy(np.asarray(part["std"][start : start + 256], dtype=np.float32))
                moments.add_samples(mean, std, shift)
        return moments


def _save_array(folder: Path, name: str, chunks: list[np.ndarray], dtype) -> None:
    array = np.concatenate(chunks).astype(dtype) if chunks else np.zeros((0,), dtype)
    tmp = folder / f"{name}.tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, folder / f"{name}.npy")


def encode_part(dataset, vae, indices: list[int], with_flips: bool, batch_size: int, num_workers: int,
                show_progress: bool, folder: Path) -> None:
    """Encode `indices` of the image data set and store them as one part of the cache."""
    folder.mkdir(parents=True, exist_ok=True)
    chunks: dict[str, list[np.ndarray]] = {}
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    for batch in tqdm(loader, desc="Encoding latents", disable=not show_progress):
        pixels = batch["pixel_values"]
        views = [("", pixels)] + ([("_flipped", pixels.flip(-1))] if with_flips else [])
        for suffix, view in views:
            mean, std = encode_moments(vae, view)
            chunks.setdefault(f"mean{suffix}", []).append(mean.cpu().numpy())
            if std is not None:
                chunks.setdefault(f"std{suffix}", []).append(std.cpu().numpy())
        chunks.setdefault("index", []).append(batch["index"].numpy())
    for name, parts in chunks.items():
        _save_array(folder, name, parts, np.int64 if name == "index" else _STORE_DTYPE)
    if not chunks:  # a process with no items still marks its (empty) part as done
        np.save(folder / "index.npy", np.zeros((0,), np.int64))
    (folder / "done").write_text("ok")


def build_or_load_latent_cache(
    dataset,
    vae,
    cache_root: str | os.PathLike,
    key: str,
    with_flips: bool,
    batch_size: int,
    num_workers: int,
    process_index: int,
    num_processes: int,
    wait_for_everyone: Callable[[], None],
    description: dict | None = None,
) -> LatentCacheDataset:
    """Reuse the complete cache for `key`, or have every process encode its share and then read it."""
    folder = Path(cache_root) / key
    if (folder / "meta.json").is_file():
        logger.info("Using the latent cache in %s", folder)
        return LatentCacheDataset(folder)

    part_names = [f"part-{rank:05d}-of-{num_processes:05d}" for rank in range(num_processes)]
    indices = list(range(process_index, len(dataset), num_processes))
    logger.info("Encoding %d images into the latent cache %s", len(dataset), folder)
    encode_part(dataset, vae, indices, with_flips, batch_size, num_workers,
                show_progress=process_index == 0, folder=folder / part_names[process_index])
    wait_for_everyone()
    if process_index == 0:
        missing = [name for name in part_names if not (folder / name / "done").is_file()]
        if missing:
            raise RuntimeError(f"Latent cache parts {missing} were not written; is {cache_root} shared by all processes?")
        has_std = any((folder / name / "std.npy").is_file() for name in part_names)
        meta = {
            "format": CACHE_FORMAT_VERSION,
            "num_items": len(dataset),
            "has_std": has_std,
            "with_flips": with_flips,
            "parts": part_names,
            **(description or {}),
        }
        tmp = folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, folder / "meta.json")
    wait_for_everyone()
    return LatentCacheDataset(folder)


@dataclass(frozen=True)
class CacheConfig:
    """--cache_latents: where the cache lives and how it is encoded."""

    directory: str
    encode_batch_size: int = 32
    num_workers: int = 0


def cached_latents(images, vae, vae_key: str, config: CacheConfig, with_flips: bool, accelerator,
                   description: dict) -> LatentCacheDataset:
    """The latent cache of `images` in `config.directory`, keyed by the images, the VAE, the preprocessing
    and `with_flips`; encoded by all processes together on first use."""
    key = cache_key(images.fingerprint(), vae_key, images.preprocessing.key(), with_flips)
    return build_or_load_latent_cache(
        images, vae, config.directory, key, with_flips, config.encode_batch_size, config.num_workers,
        accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
        description=description,
    )
