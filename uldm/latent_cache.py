"""Encode the training set once and train from the stored latents.

For KL autoencoders the cache keeps the posterior's mean and std, so every epoch still draws a
fresh latent sample; with random flips it also keeps the moments of the mirrored image. The
cache lives in `<latent_cache_dir>/<key>/`, where the key digests the listing of the images (their
names, sizes and modification times; nothing is decoded to compute it), the VAE, the resolution,
the crop and the flip setting, so a cache made under other settings or from other files is never
reused. This module only stores and reads latents; what they mean (scale, samples, flips) is
`uldm.latents`.

Layout. The listed images are cut into *parts* of consecutive items (`items-0000000-0000256/`:
`index.npy`, `mean.npy`, `std.npy`, `mean_flipped.npy`, `std_flipped.npy`, `part.json`). Each part
is written into a temporary folder and renamed when complete, so a killed build leaves only whole
parts, and the next start encodes only the missing ones. The first pass decodes every image once,
checking it as it goes: an unreadable file is skipped and recorded (in its part's `part.json`).
`meta.json`, written last by the main process, marks the cache complete; it records every part's
array shapes and sizes, the unreadable files and how many images were smaller than the resolution,
so that a later start warns about them again without opening any image. At load, a part whose files
do not match `meta.json` (missing, truncated) is reported and re-encoded, that part alone.

All processes take part: the parts to encode are dealt out to them, and every process reads the
same `meta.json` afterwards, so all agree on the items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data._utils.collate import collate, default_collate_fn_map
from tqdm.auto import tqdm

from .latents import RunningMoments, encode_moments
from .saving import write_json_atomically

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
_STORE_DTYPE = np.float16  # latents and stds are small numbers; halves the cache size
# Items per part: small enough that a damaged part is cheap to re-encode and that the parts spread evenly
# over 8 processes from a few thousand images on; 256 items of 4x32x32 with flips are 8 MiB.
ITEMS_PER_PART = 256
META_FILE = "meta.json"
PART_FILE = "part.json"


def cache_key(dataset_fingerprint: str, vae_fingerprint: str, preprocessing_key: str, with_flips: bool) -> str:
    text = f"v{CACHE_FORMAT_VERSION}|{dataset_fingerprint}|{vae_fingerprint}|{preprocessing_key}|flip={with_flips}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# Parts: their ranges, their records, and checking them


def part_ranges(num_items: int, num_processes: int, items_per_part: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) of each part: at most `items_per_part` items, and at least one part per process
    when there are enough items, so that every process has a share to encode."""
    size = items_per_part or ITEMS_PER_PART
    size = max(1, min(size, math.ceil(num_items / max(1, num_processes))))
    return [(start, min(start + size, num_items)) for start in range(0, num_items, size)]


def part_name(start: int, stop: int) -> str:
    return f"items-{start:07d}-{stop:07d}"


def _read_npy_header(path: Path) -> tuple[list[int], str]:
    with path.open("rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
    return list(shape), str(dtype)


def _array_record(path: Path) -> dict:
    shape, dtype = _read_npy_header(path)
    return {"shape": shape, "dtype": dtype, "bytes": path.stat().st_size}


def part_problem(folder: Path, record: dict) -> str | None:
    """What is wrong with a part's files compared with its record (None: nothing). Reads only headers."""
    for name, expected in record["arrays"].items():
        path = folder / f"{name}.npy"
        if not path.is_file():
            return f"{path.name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path.name} has {size:,} bytes, {expected['bytes']:,} expected (truncated?)"
        try:
            shape, dtype = _read_npy_header(path)
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            return f"{path.name} has no readable header ({error})"
        if shape != expected["shape"] or dtype != expected["dtype"]:
            return f"{path.name} holds {dtype} {shape}, {expected['dtype']} {expected['shape']} expected"
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Writing


def write_part(cache_folder: Path, start: int, stop: int, arrays: dict[str, np.ndarray],
               unreadable: Sequence[tuple[int, str, str]] = (), num_small: int = 0) -> dict:
    """Store one part: `arrays` holds "index" (the items' positions in the listing, int64) and the moments
    ("mean", "std", "mean_flipped", "std_flipped", as present), one row per readable item; `unreadable`
    lists (position, name, reason) of the items skipped. Written into a temporary folder and renamed when
    complete, replacing a damaged part. Returns the part's record."""
    final = cache_folder / part_name(start, stop)
    tmp = cache_folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(array, dtype=np.int64 if name == "index" else _STORE_DTYPE))
    record = {
        "name": final.name, "start": start, "stop": stop,
        "arrays": {name: _array_record(tmp / f"{name}.npy") for name in arrays},
        "unreadable": [list(entry) for entry in unreadable],
        "smaller_than_resolution": num_small,
    }
    (tmp / PART_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return record


def write_meta(cache_folder: Path, records: list[dict], num_items: int, with_flips: bool,
               description: dict | None = None) -> dict:
    """Mark the cache complete: every part's record, the unreadable files and the number of small images."""
    records = sorted(records, key=lambda record: record["start"])
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "description": description or {},
        "num_items": num_items,
        "has_std": any("std" in record["arrays"] for record in records),
        "with_flips": with_flips,
        "parts": records,
        "unreadable": [entry for record in records for entry in record["unreadable"]],
        "smaller_than_resolution": sum(record["smaller_than_resolution"] for record in records),
    }
    write_json_atomically(cache_folder / META_FILE, meta)
    return meta


class _CheckedItems(Dataset):
    """The image data set's `checked_item`s: a file that cannot be decoded gives a record, not an exception."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return self.images.checked_item(index)


def encode_part(images, vae, start: int, stop: int, with_flips: bool, batch_size: int, num_workers: int,
                cache_folder: Path, progress: tqdm | None = None) -> dict:
    """Decode, check and encode items [start, stop) of `images` (an `uldm.data.ImageDataset`) and store them as
    one part; unreadable files are skipped and recorded. Returns the part's record."""
    chunks: dict[str, list[np.ndarray]] = {}
    unreadable, num_small = [], 0
    loader = DataLoader(Subset(_CheckedItems(images), range(start, stop)), batch_size=batch_size,
                        num_workers=num_workers)
    for batch in loader:
        readable = torch.tensor([not error for error in batch["error"]])
        for index, error in zip(batch["index"].tolist(), batch["error"]):
            if error:
                unreadable.append((index, images.item_name(index), error))
        num_small += int(batch["small"][readable].sum())
        if readable.any():
            pixels = batch["pixel_values"][readable]
            views = [("", pixels)] + ([("_flipped", pixels.flip(-1))] if with_flips else [])
            for suffix, view in views:
                mean, std = encode_moments(vae, view)
                chunks.setdefault(f"mean{suffix}", []).append(mean.cpu().numpy())
                if std is not None:
                    chunks.setdefault(f"std{suffix}", []).append(std.cpu().numpy())
            chunks.setdefault("index", []).append(batch["index"][readable].numpy())
        if progress is not None:
            progress.update(len(readable))
    arrays = {name: np.concatenate(parts) for name, parts in chunks.items()}
    arrays.setdefault("index", np.zeros((0,), np.int64))  # every item unreadable: an empty part
    return write_part(cache_folder, start, stop, arrays, unreadable, num_small)


# --------------------------------------------------------------------------------------------
# Reading


class GatheredRow(Mapping):
    """Item `position` of a gathered batch, read-only: its fields are views into the batch, made when asked for.

    `LatentCacheDataset.__getitems__` returns these, and the DataLoader's default collate (extended below, the way
    torch documents) hands back the gathered batch itself when given all of its rows in order: no second copy."""

    __slots__ = ("batch", "position")

    def __init__(self, batch: dict[str, torch.Tensor], position: int):
        self.batch, self.position = batch, position

    def __getitem__(self, name: str):
        value = self.batch[name][self.position]
        return int(value) if name == "index" else value

    def __iter__(self):
        return iter(self.batch)

    def __len__(self) -> int:
        return len(self.batch)


def _float32_output(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An empty float32 tensor; in shared memory for a DataLoader worker, which would otherwise copy it there to send
    it (as torch's own collate does for the batches it stacks)."""
    if not shared:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage).view(shape)


def _collate_gathered_rows(rows: Sequence[GatheredRow], *, collate_fn_map=None):
    batch = rows[0].batch
    if len(rows) == len(batch["index"]) and all(row.batch is batch and row.position == i for i, row in enumerate(rows)):
        return batch
    return {name: collate([row[name] for row in rows], collate_fn_map=collate_fn_map) for name in rows[0]}


default_collate_fn_map[GatheredRow] = _collate_gathered_rows


class LatentCacheDataset(Dataset):
    """Items: {"mean", "std" (KL only), "mean_flipped"/"std_flipped" (with flips), "index"}, float32.

    Item k is the k-th readable image of the listing; `source_indices[k]` is its position in the listing.
    The arrays are memory-mapped, so processes on one machine share their pages instead of copying them.
    The DataLoader fetches whole batches through `__getitems__`, which gathers them from the mapped arrays
    with no per-item tensor work (`gather`); each item equals `dataset[k]`.
    """

    def __init__(self, folder: Path, meta: dict | None = None):
        self.folder = Path(folder)
        self.meta = meta if meta is not None else json.loads((self.folder / META_FILE).read_text())
        self.has_std = self.meta["has_std"]
        self.with_flips = self.meta["with_flips"]
        self.fields = ["mean"] + (["std"] if self.has_std else [])
        if self.with_flips:
            self.fields += [f"{name}_flipped" for name in list(self.fields)]
        self.unreadable = [tuple(entry) for entry in self.meta["unreadable"]]
        self.num_smaller_than_resolution = self.meta["smaller_than_resolution"]
        self._open_parts()
        lengths = [len(part["index"]) for part in self.parts]
        self.source_indices = np.concatenate([np.asarray(part["index"]) for part in self.parts] or [np.zeros(0, np.int64)])
        self._part_of = np.repeat(np.arange(len(self.parts), dtype=np.int64), lengths)
        self._row_of = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths] or [np.zeros(0, np.int64)])

    def _open_parts(self) -> None:
        # Plain ndarray views of the maps (np.asarray): slicing them is several times cheaper than slicing np.memmap.
        self.parts = []
        for record in self.meta["parts"]:
            folder = self.folder / record["name"]
            self.parts.append({name: np.asarray(np.load(folder / f"{name}.npy", mmap_mode="r"))
                               for name in record["arrays"]})
        # Per field, each part's array (None for a part without readable items), for `gather`.
        self._arrays = {name: [part.get(name) for part in self.parts] for name in self.fields}

    def __getstate__(self) -> dict:
        # Sent to DataLoader workers started by spawn/forkserver: reopen the maps there rather than pickle their
        # contents (pickling an np.memmap copies the whole array).
        state = self.__dict__.copy()
        del state["parts"], state["_arrays"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_parts()

    def __len__(self) -> int:
        return len(self.source_indices)

    def __getitem__(self, index: int) -> dict:
        part = self.parts[self._part_of[index]]
        row = self._row_of[index]
        item = {name: torch.from_numpy(np.asarray(part[name][row], dtype=np.float32)) for name in self.fields}
        item["index"] = index
        return item

    def gather(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A batch as {field: float32 tensor [B, ...], "index": int64 [B]}, equal to the stacked items. Rows are
        copied in sorted order (sequential reads of the maps) into one float16 buffer per field, converted once."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable").tolist()
        parts, rows = self._part_of[indices].tolist(), self._row_of[indices].tolist()
        in_worker = torch.utils.data.get_worker_info() is not None
        batch = {}
        for name in self.fields:
            arrays = self._arrays[name]
            first = arrays[parts[0]]
            buffer = np.empty((len(indices), *first.shape[1:]), dtype=first.dtype)
            for position in order:
                buffer[position] = arrays[parts[position]][rows[position]]
            batch[name] = _float32_output(buffer.shape, in_worker).copy_(torch.from_numpy(buffer))
        batch["index"] = torch.from_numpy(indices)
        return batch

    def __getitems__(self, indices: Sequence[int]) -> list[GatheredRow]:
        # torch's DataLoader calls this with a whole batch of indices and hands the result to its collate function.
        batch = self.gather(indices)
        return [GatheredRow(batch, position) for position in range(len(indices))]

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


# --------------------------------------------------------------------------------------------
# Building, repairing, loading


def _completed_parts(folder: Path, ranges: list[tuple[int, int]]) -> dict[tuple[int, int], dict]:
    """Parts of an unfinished build (a killed one) that are complete and intact, by range."""
    done = {}
    for start, stop in ranges:
        record = _read_json(folder / part_name(start, stop) / PART_FILE)
        if record is not None and part_problem(folder / record["name"], record) is None:
            done[(start, stop)] = record
    return done


def _remove_strays(folder: Path, meta: dict) -> None:
    """Folders of the cache that `meta.json` does not name: temporary folders of killed builds, parts of another cut."""
    keep = {record["name"] for record in meta["parts"]}
    for path in folder.iterdir():
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


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
    items_per_part: int | None = None,
) -> LatentCacheDataset:
    """The cache for `key`: read as it is when complete and intact; otherwise every process encodes its share of
    the missing or damaged parts (of `dataset`, an `uldm.data.ImageDataset`), then all read it.

    Every process inspects the cache before any writes (the first wait), so all agree on what is to be done."""
    folder = Path(cache_root) / key
    is_main = process_index == 0
    meta = _read_json(folder / META_FILE)
    if meta is not None and meta.get("format") == CACHE_FORMAT_VERSION:
        damaged = [(record, problem) for record in meta["parts"]
                   if (problem := part_problem(folder / record["name"], record)) is not None]
        if not damaged:
            logger.info("Using the latent cache in %s", folder)
            return LatentCacheDataset(folder, meta)
        if is_main:
            for record, problem in damaged:
                logger.warning("The latent cache %s is damaged: in %s, %s. Re-encoding that part (items %d-%d).",
                               folder, record["name"], problem, record["start"], record["stop"] - 1)
        records = {(record["start"], record["stop"]): record for record in meta["parts"]}
        todo = [(record["start"], record["stop"]) for record, _ in damaged]
        description = meta["description"]
    else:
        ranges = part_ranges(len(dataset), num_processes, items_per_part)
        records = _completed_parts(folder, ranges) if folder.is_dir() else {}
        todo = [part for part in ranges if part not in records]
        if is_main and records:
            logger.info("Resuming the unfinished latent cache %s: %d of %d parts are done.", folder, len(records),
                        len(ranges))
        elif is_main:
            logger.info("Encoding %d images into the latent cache %s", len(dataset), folder)
        records.update({part: None for part in todo})
    wait_for_everyone()  # everyone has looked before anyone writes

    folder.mkdir(parents=True, exist_ok=True)
    mine = todo[process_index::num_processes]
    with tqdm(total=sum(stop - start for start, stop in mine), desc="Encoding latents", unit="image",
              disable=not is_main) as progress:
        for start, stop in mine:
            encode_part(dataset, vae, start, stop, with_flips, batch_size, num_workers, folder, progress)
    wait_for_everyone()
    if is_main:
        for start, stop in todo:
            record = _read_json(folder / part_name(start, stop) / PART_FILE)
            if record is None:
                raise RuntimeError(f"The latent cache part {part_name(start, stop)} was not written; is {cache_root} "
                                   "shared by all processes?")
            records[(start, stop)] = record
        meta = write_meta(folder, list(records.values()), len(dataset), with_flips, description)
        _remove_strays(folder, meta)
    wait_for_everyone()
    return LatentCacheDataset(folder)


def cache_key_of(images, vae_key: str, with_flips: bool) -> str:
    """The key of the cache of `images` (an `uldm.data.ImageDataset`): its listing, the VAE, the preprocessing, flips."""
    return cache_key(images.fingerprint(), vae_key, images.preprocessing.key(), with_flips)


@dataclass(frozen=True)
class CacheConfig:
    """--cache_latents: where the cache lives and how it is encoded."""

    directory: str
    encode_batch_size: int = 32
    num_workers: int = 0
    items_per_part: int | None = None  # None: ITEMS_PER_PART


def cached_latents(images, vae, vae_key: str, config: CacheConfig, with_flips: bool, accelerator,
                   description: dict) -> LatentCacheDataset:
    """The latent cache of `images` in `config.directory`, keyed by the images' listing (`images.fingerprint()`,
    which opens no image), the VAE, the preprocessing and `with_flips`; encoded by all processes together on
    first use, checking every image as it is encoded (see the module docstring)."""
    key = cache_key_of(images, vae_key, with_flips)
    return build_or_load_latent_cache(
        images, vae, config.directory, key, with_flips, config.encode_batch_size, config.num_workers,
        accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
        description=description, items_per_part=config.items_per_part,
    )
