"""Training images: a folder (searched recursively) or a `datasets` data set, preprocessed one way;
and the training set a script trains on (`prepare_training_set`): those images, or their cached latents.

Every random choice (shuffling, crop position) is a pure function of the seed, the epoch and
the item, never of a global random state, so a resumed run sees exactly the batches that an
uninterrupted run would have seen, on any number of workers.

Checking the files costs no decoding pass of its own. With --cache_latents the images are checked
while they are encoded (the first pass decodes each image once) and the cache remembers what it
found, so a start with a complete cache opens no image at all. Without it, every start opens each
file's header only (`verify_image_files`: the size, and for PNG the chunk checksums; no pixels are
decoded), and a file that still fails to decode when training reaches it (a truncated JPEG, say) is
replaced by the next readable item, with a warning naming it, instead of stopping the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from .errors import InputError
from .images import list_image_files, load_rgb_image, to_rgb, update_with_listing

if TYPE_CHECKING:
    from .latent_cache import CacheConfig

logger = logging.getLogger(__name__)


def stable_random(*keys: int | str) -> np.random.Generator:
    """A numpy generator seeded by the keys only (stable across processes and Python runs)."""
    digest = hashlib.sha256("/".join(str(k) for k in keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resolution` (bilinear, antialiased), then crop a square."""

    resolution: int
    center_crop: bool = True

    def resize_and_crop(self, image: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        """The square PIL crop; a random position (from `rng`) unless `center_crop`."""
        image = TF.resize(image, self.resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.center_crop:
            return TF.center_crop(image, [self.resolution, self.resolution])
        rng = rng if rng is not None else np.random.default_rng()
        top = int(rng.integers(0, image.height - self.resolution + 1))
        left = int(rng.integers(0, image.width - self.resolution + 1))
        return TF.crop(image, top, left, self.resolution, self.resolution)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        """PIL RGB image -> float tensor 3xRxR in [-1, 1]."""
        return TF.to_tensor(self.resize_and_crop(image, rng)) * 2.0 - 1.0

    def key(self) -> str:
        return f"res{self.resolution}-{'center' if self.center_crop else 'random'}"


# --------------------------------------------------------------------------------------------
# Data sets


def describe_error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


class ImageDataset(Dataset):
    """Base: items are {"pixel_values": 3xRxR in [-1, 1], "index": int}."""

    def __init__(self, preprocessing: Preprocessing, seed: int = 0):
        self.preprocessing = preprocessing
        self.seed = seed
        self.epoch = 0  # set before each epoch's iterator is made; drives the random crops
        self._unreadable: set[int] = set()  # found while training (per process and worker)

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identifies the content, for cache keys, without opening any image."""
        raise NotImplementedError

    def item_name(self, index: int) -> str:
        """How messages name an item."""
        return f"item {index}"

    def _rng(self, index: int) -> np.random.Generator | None:
        return None if self.preprocessing.center_crop else stable_random(self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.preprocessing(self._readable_image(index), self._rng(index)), "index": index}

    def _readable_image(self, index: int) -> Image.Image:
        """Item `index`'s image; if it cannot be decoded, the next readable item's, so that a file that passed the
        start check (or was damaged since) never stops a run. Deterministic, so exact resume is unaffected. Warned
        about when a process or loader worker first meets the file (loader workers are made anew each epoch)."""
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._unreadable:
                continue
            try:
                return self.load_image(candidate)
            except Exception as error:  # any decoder failure means: use another image
                self._unreadable.add(candidate)
                logger.warning("Cannot decode %s (%s); training on the next readable image in its place.",
                               self.item_name(candidate), describe_error(error))
        raise RuntimeError(f"None of the {len(self)} training images can be decoded any more; see the warnings.")

    def checked_item(self, index: int) -> dict:
        """For the latent cache's first pass, which checks each image while it encodes it: the centre-cropped item
        plus "error" (why it cannot be decoded, "" if it can; then the pixels are zeros) and "small" (smaller than
        the resolution). Never raises for a bad file."""
        resolution = self.preprocessing.resolution
        try:
            image = self.load_image(index)
        except Exception as error:  # any decoder failure means: skip this file
            return {"pixel_values": torch.zeros(3, resolution, resolution), "index": index,
                    "error": describe_error(error), "small": False}
        return {"pixel_values": self.preprocessing(image, self._rng(index)), "index": index, "error": "",
                "small": min(image.size) < resolution}


class ImageFolderDataset(ImageDataset):
    def __init__(self, paths: Sequence[Path], root: Path, preprocessing: Preprocessing, seed: int = 0):
        super().__init__(preprocessing, seed)
        self.paths = list(paths)
        self.root = root

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Image.Image:
        return load_rgb_image(self.paths[index])

    def item_name(self, index: int) -> str:
        return str(self.paths[index])

    def fingerprint(self) -> str:
        """The listing: relative paths, sizes and modification times (an edited, added or removed file changes it)."""
        return update_with_listing(hashlib.sha256(), self.paths, self.root).hexdigest()[:16]


class HFImageDataset(ImageDataset):
    """A `datasets.Dataset` with an image column."""

    def __init__(self, dataset, image_column: str, preprocessing: Preprocessing, seed: int = 0):
        super().__init__(preprocessing, seed)
        self.dataset = dataset
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def load_image(self, index: int) -> Image.Image:
        image = self.dataset[index][self.image_column]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return to_rgb(image)

    def fingerprint(self) -> str:
        return f"{getattr(self.dataset, '_fingerprint', 'unknown')}-{len(self.dataset)}"


# --------------------------------------------------------------------------------------------
# Building the training set


def _check_one_image(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()  # PNG: every chunk's checksum (a truncated file fails); JPEG: the header only
        return None, size
    except Exception as error:  # any decoder failure means: skip this file
        return describe_error(error), None


def verify_image_files(
    paths: Sequence[Path], resolution: int, num_threads: int = 8, show_progress: bool = True
) -> tuple[list[Path], list[tuple[Path, str]], int]:
    """Open each file's header, decoding no pixels (see the module docstring: what this misses is caught when the
    image is loaded). Returns (good files, [(bad file, reason)], number smaller than resolution)."""
    good, bad, small = [], [], 0
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        results = pool.map(_check_one_image, paths)
        for path, (error, size) in tqdm(
            zip(paths, results), total=len(paths), desc="Checking images", disable=not show_progress
        ):
            if error is not None:
                bad.append((path, error))
                continue
            good.append(path)
            if min(size) < resolution:
                small += 1
    return good, bad, small


def select_subset(num_items: int, max_items: int | None, seed: int) -> list[int]:
    """A seeded random subset of indices (sorted), as diffusers' `shuffle(seed).select(range(n))`."""
    if max_items is None or max_items >= num_items:
        return list(range(num_items))
    return sorted(np.random.default_rng(seed).permutation(num_items)[:max_items].tolist())


def list_folder_images(train_data_dir: str | os.PathLike, max_train_samples: int | None = None,
                       seed: int = 0) -> list[Path]:
    """The image files under `train_data_dir` (a seeded subset of `max_train_samples`), none of them opened."""
    root = Path(train_data_dir)
    if not root.exists():
        raise InputError(
            f"--train_data_dir {root} does not exist. Point it at a folder of images "
            f"(searched recursively), or use --dataset_name for a `datasets` data set."
        )
    paths = list_image_files(root)
    if not paths:
        raise InputError(
            f"--train_data_dir {root} holds no images (looked recursively for "
            f"png, jpg, jpeg, webp, bmp, tif, gif, ppm files)."
        )
    return [paths[i] for i in select_subset(len(paths), max_train_samples, seed)]


def report_checked_images(bad: Sequence[tuple[object, str]], num_good: int, num_small: int, resolution: int,
                          where: str) -> None:
    """Warn about unreadable and small images; refuse a set with no readable image."""
    if bad:
        listed = "\n".join(f"  {name}: {reason}" for name, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        logger.warning("Skipping %d unreadable image file(s):\n%s%s", len(bad), listed, more)
    if not num_good:
        raise InputError(f"None of the {len(bad)} image files {where} could be read; see the warnings above.")
    if num_small:
        logger.warning(
            "%d image(s) are smaller than --resolution %d and will be upscaled; "
            "this blurs them. Consider a lower --resolution or larger images.",
            num_small,
            resolution,
        )


def image_folder_dataset(
    train_data_dir: str | os.PathLike,
    preprocessing: Preprocessing,
    seed: int = 0,
    max_train_samples: int | None = None,
    verify: Callable[[list[Path]], tuple[list[Path], list, int]] | None = None,
) -> ImageFolderDataset:
    """All images under `train_data_dir`, checked by `verify` (default `verify_image_files`: headers only);
    unreadable ones skipped with a warning naming them."""
    root = Path(train_data_dir)
    paths = list_folder_images(root, max_train_samples, seed)
    if verify is None:
        verify = lambda files: verify_image_files(files, preprocessing.resolution)  # noqa: E731
    good, bad, small = verify(paths)
    report_checked_images(bad, len(good), small, preprocessing.resolution, f"under {root}")
    return ImageFolderDataset(good, root, preprocessing, seed)


def load_hf_dataset(dataset_name: str, dataset_config_name: str | None = None, cache_dir: str | None = None,
                    split: str = "train"):
    """`datasets.load_dataset` for a hub id, a local folder, or local parquet/arrow/json files."""
    import datasets

    path = Path(dataset_name)
    try:
        if path.is_file() and path.suffix in (".parquet", ".arrow", ".json", ".jsonl", ".csv"):
            builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
            return datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir, split=split)
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:
        raise InputError(
            f"Could not load the data set '{dataset_name}': {error}\n"
            "If it is a hub id, this machine may be offline: download it where there is network "
            "(`huggingface-cli download --repo-type dataset NAME --local-dir DIR`) and pass the "
            "folder, or use --train_data_dir with a folder of images."
        ) from error


def hf_image_dataset(
    dataset_name: str,
    image_column: str | None,
    preprocessing: Preprocessing,
    seed: int = 0,
    max_train_samples: int | None = None,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
) -> HFImageDataset:
    dataset = load_hf_dataset(dataset_name, dataset_config_name, cache_dir)
    image_column = image_column or _guess_image_column(dataset)
    if image_column not in dataset.column_names:
        raise InputError(
            f"--image_column '{image_column}' is not a column of {dataset_name}; "
            f"its columns are {dataset.column_names}."
        )
    if len(dataset) == 0:
        raise InputError(f"The data set {dataset_name} is empty.")
    if max_train_samples is not None and max_train_samples < len(dataset):
        dataset = dataset.select(select_subset(len(dataset), max_train_samples, seed))
    return HFImageDataset(dataset, image_column, preprocessing, seed)


def _guess_image_column(dataset) -> str:
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    return "image"


@dataclass(frozen=True)
class DataConfig:
    """Where the training images come from and how they are preprocessed (diffusers' argument names)."""

    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    cache_dir: str | None = None
    image_column: str | None = None
    resolution: int = 256
    center_crop: bool = False
    random_flip: bool = False
    max_train_samples: int | None = None
    seed: int = 0

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.resolution, self.center_crop)


def build_image_dataset(config: DataConfig, verify=None) -> ImageDataset:
    """The training images: a folder (`train_data_dir`) or a `datasets` data set (`dataset_name`)."""
    if config.dataset_name:
        return hf_image_dataset(
            config.dataset_name, config.image_column, config.preprocessing, seed=config.seed,
            max_train_samples=config.max_train_samples, dataset_config_name=config.dataset_config_name,
            cache_dir=config.cache_dir,
        )
    if config.train_data_dir:
        return image_folder_dataset(config.train_data_dir, config.preprocessing, config.seed,
                                    config.max_train_samples, verify)
    raise InputError("Give the training images with --train_data_dir DIR or --dataset_name NAME.")


class TrainingSet(NamedTuple):
    dataset: Dataset  # an ImageDataset, or the LatentCacheDataset of its latents
    files: list[Path]  # the readable image files, in item order ([] for a `datasets` data set)


def prepare_training_set(config: DataConfig, accelerator, cache: CacheConfig | None = None, vae=None,
                         vae_key: str | None = None, description: dict | None = None) -> TrainingSet:
    """What a script trains on: the images of `config`, or, with `cache`, their latents (encoded by `vae`, whose
    identity is `vae_key`, on first use), the same on every process; and the readable image files.

    With a complete cache no image is opened: the cache is keyed on the listing, and it remembers which files it
    found unreadable or small on its first pass, and says so again. Without one, the files' headers are checked
    (`verify_image_files`), split over the processes."""
    if cache is None:
        images = build_image_dataset(config, verify=sharded_verifier(accelerator, config.resolution))
        return TrainingSet(images, list(getattr(images, "paths", [])))
    if vae is None or vae_key is None:
        raise ValueError("A latent cache needs the VAE and its key.")
    from .latent_cache import cached_latents  # imported here: it brings in diffusers, which a data set needs not

    if config.train_data_dir and not config.dataset_name:
        root = Path(config.train_data_dir)
        # Every listed file: the cache's first pass checks them, a complete cache knows which were unreadable.
        images = ImageFolderDataset(list_folder_images(root, config.max_train_samples, config.seed), root,
                                    config.preprocessing, config.seed)
        where = f"under {root}"
    else:
        images = build_image_dataset(config)
        where = f"of {config.dataset_name}"
    latents = cached_latents(images, vae, vae_key, cache, config.random_flip, accelerator, description or {})
    # Named from today's listing (the key holds relative paths, so the folder may have moved since the first pass).
    unreadable = [(images.item_name(index), reason) for index, _, reason in latents.unreadable]
    report_checked_images(unreadable, len(latents), latents.num_smaller_than_resolution, config.resolution, where)
    files = [images.paths[i] for i in latents.source_indices.tolist()] if isinstance(images, ImageFolderDataset) else []
    return TrainingSet(latents, files)


# --------------------------------------------------------------------------------------------
# Batches


class EpochBatchSampler:
    """Yields this process's batches of indices, reshuffled each epoch from (seed, epoch) alone.

    Global batch j of an epoch is items [j*B*W, (j+1)*B*W) of the epoch's permutation, and
    process r takes slice [r*B, (r+1)*B) of it, so processes see disjoint shards and the order
    does not depend on how many batches were skipped on resume. The last incomplete global
    batch is dropped so that every process does the same number of steps.
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int = 1, process_index: int = 0,
                 seed: int = 0, shuffle: bool = True):
        global_batch = batch_size * num_processes
        if num_items < global_batch:
            raise InputError(
                f"The data set has {num_items} item(s), fewer than one batch of "
                f"{batch_size} x {num_processes} process(es) = {global_batch}. "
                "Lower --train_batch_size or add images."
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.num_items // (self.batch_size * self.num_processes)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_items)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        global_batch = self.batch_size * self.num_processes
        for batch in range(self.start_batch, self.batches_per_epoch()):
            start = batch * global_batch + self.process_index * self.batch_size
            yield order[start : start + self.batch_size].tolist()


def sharded_verifier(accelerator, resolution: int):
    """A `verify` for `image_folder_dataset` that splits the decoding over all processes."""
    from accelerate.utils import gather_object

    def verify(paths: list[Path]):
        mine = paths[accelerator.process_index :: accelerator.num_processes]
        good, bad, small = verify_image_files(mine, resolution, show_progress=accelerator.is_local_main_process)
        bad_all = gather_object([(str(path), reason) for path, reason in bad]) if accelerator.num_processes > 1 else bad
        small_all = sum(gather_object([small])) if accelerator.num_processes > 1 else small
        bad_paths = {str(path) for path, _ in bad_all}
        return [p for p in paths if str(p) not in bad_paths], [(Path(p), r) for p, r in bad_all], small_all

    return verify
