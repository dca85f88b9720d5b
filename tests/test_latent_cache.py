"""The data path: the latent cache (keyed on the listing, checked while encoding, repaired part by part, read in
whole batches) and the checks of the image files without it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from conftest import build_tiny_kl_vae, latent_training_args, make_blob_images, run_script
from uldm import latent_cache
from uldm.data import DataConfig, EpochBatchSampler, ImageDataset, prepare_training_set
from uldm.latent_cache import CacheConfig, build_or_load_latent_cache
from uldm.training import read_metrics

SCRIPT = "train_unconditional_latent"


def one_process() -> SimpleNamespace:
    return SimpleNamespace(process_index=0, num_processes=1, is_local_main_process=True, is_main_process=True,
                           wait_for_everyone=lambda: None)


@contextlib.contextmanager
def recording_image_opens(monkeypatch, folder: Path):
    """Every PIL.Image.open of a file under `folder` while inside, by name."""
    opened = []
    original = Image.open

    def recording_open(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)) and str(fp).startswith(str(folder)):
            opened.append(Path(fp).name)
        return original(fp, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", recording_open)
        yield opened


@pytest.fixture
def encoded_items(monkeypatch) -> list[int]:
    """The positions of the images decoded for the cache (its first pass or a repair), in order."""
    encoded = []
    original = ImageDataset.checked_item

    def recording(self, index):
        encoded.append(index)
        return original(self, index)

    monkeypatch.setattr(ImageDataset, "checked_item", recording)
    return encoded


def cached_set(folder: Path, cache: Path, vae, items_per_part: int | None = None, **config):
    config = DataConfig(train_data_dir=str(folder), resolution=32, center_crop=True, random_flip=True, **config)
    return prepare_training_set(config, one_process(), CacheConfig(str(cache), encode_batch_size=4,
                                                                   items_per_part=items_per_part), vae, "vae-key")


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_truncated_jpeg(path: Path) -> None:
    """A JPEG whose header is intact (it opens, and passes `Image.verify`) but whose pixel data is cut short."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    make_blob_images(folder, 10)
    return folder


# ------------------------------------------------------------------------------------------------
# The key: the listing, nothing decoded


def build_cache_in_two_processes(images, vae, cache_root: Path, **options) -> dict:
    """The cache of `images` built by two "processes" (threads with a real barrier between them, as accelerate's
    wait_for_everyone); {rank: the LatentCacheDataset it returned}."""
    barrier, results = threading.Barrier(2), {}

    def process(rank: int) -> None:
        results[rank] = build_or_load_latent_cache(
            images, vae, cache_root=cache_root, key="key", with_flips=True, batch_size=4, num_workers=0,
            process_index=rank, num_processes=2, wait_for_everyone=barrier.wait, **options)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(results) == {0, 1}, "both processes returned the cache"
    return results


def test_a_resume_with_a_complete_cache_opens_no_image(train_images, tiny_vae_dir, tmp_path, monkeypatch):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = dict(cache_latents=True, random_flip=True, latent_cache_dir=cache, checkpointing_steps=2)
    with recording_image_opens(monkeypatch, train_images) as opened:
        run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=2, **common))
    assert sorted(opened) == sorted(p.name for p in train_images.iterdir()), "the first pass opens each image once"

    with recording_image_opens(monkeypatch, train_images) as opened:
        run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, out, max_train_steps=4,
                                                resume_from_checkpoint="latest", **common))
    assert opened == [], "a resume with a complete cache must not open any image"
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4]


def test_an_edited_or_added_file_rebuilds_the_cache(photos, tmp_path, encoded_items):
    vae, cache = build_tiny_kl_vae(), tmp_path / "cache"
    first = cached_set(photos, cache, vae)
    assert len(first.dataset) == 10 and encoded_items == list(range(10))

    encoded_items.clear()
    assert len(cached_set(photos, cache, vae).dataset) == 10 and encoded_items == [], "unchanged listing: reused"

    edited = photos / "img_0003.png"
    Image.open(edited).rotate(90).save(edited)  # new content: new size and modification time
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    second = cached_set(photos, cache, vae)
    assert encoded_items == list(range(10)), "an edited file invalidates the cache"
    assert not torch.equal(second.dataset[3]["mean"], first.dataset[3]["mean"])

    encoded_items.clear()
    shutil.copy(photos / "img_0000.png", photos / "img_0010.png")
    third = cached_set(photos, cache, vae)
    assert encoded_items == list(range(11)) and len(third.dataset) == 11, "an added file invalidates the cache"
    assert third.files[-1] == photos / "img_0010.png"
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3


# ------------------------------------------------------------------------------------------------
# Checked while encoding


def test_an_unreadable_file_is_skipped_on_the_first_pass_and_warned_about_later_without_opening_it(
        photos, tmp_path, monkeypatch, caplog, encoded_items):
    truncate_half(photos / "img_0004.png")
    jpeg = photos / "img_0007.jpg"
    (photos / "img_0007.png").unlink()
    write_truncated_jpeg(jpeg)  # only decoding it finds the damage
    Image.new("RGB", (16, 16), "red").save(photos / "img_0008.png")  # smaller than the resolution
    vae, cache = build_tiny_kl_vae(), tmp_path / "cache"

    with caplog.at_level(logging.WARNING), recording_image_opens(monkeypatch, photos) as opened:
        first = cached_set(photos, cache, vae)
    assert sorted(opened) == sorted(p.name for p in photos.iterdir()), "each image decoded once, nothing else"
    assert "Skipping 2 unreadable" in caplog.text and "img_0004.png" in caplog.text and "img_0007.jpg" in caplog.text
    assert "1 image(s) are smaller than --resolution 32" in caplog.text
    assert len(first.dataset) == 8 and all(p.name not in ("img_0004.png", "img_0007.jpg") for p in first.files)
    assert first.dataset.source_indices.tolist() == [0, 1, 2, 3, 5, 6, 8, 9]

    caplog.clear()
    encoded_items.clear()
    with caplog.at_level(logging.WARNING), recording_image_opens(monkeypatch, photos) as opened:
        again = cached_set(photos, cache, vae)
    assert opened == [] and encoded_items == []
    assert "Skipping 2 unreadable" in caplog.text and "img_0004.png" in caplog.text and "img_0007.jpg" in caplog.text
    assert "1 image(s) are smaller than --resolution 32" in caplog.text
    assert again.files == first.files
    assert torch.equal(again.dataset[7]["mean"], first.dataset[7]["mean"])


def test_processes_encode_their_share_and_agree_on_the_items(photos, tmp_path, encoded_items):
    """Two "processes" as threads with a real barrier; parts of 2 items dealt out to them; one unreadable file."""
    truncate_half(photos / "img_0005.png")
    (photos / "img_0006.png").write_bytes(b"not an image")
    from uldm.data import ImageFolderDataset, Preprocessing, list_folder_images

    images = ImageFolderDataset(list_folder_images(photos), photos, Preprocessing(32, center_crop=True))
    results = build_cache_in_two_processes(images, build_tiny_kl_vae(), tmp_path / "cache", items_per_part=2)
    assert sorted(encoded_items) == list(range(10)), "every image was decoded once, by one process"
    for cache in results.values():
        assert cache.source_indices.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
        assert [name for _, name, _ in cache.unreadable] == [str(photos / "img_0005.png"), str(photos / "img_0006.png")]
        assert cache[0]["mean"].shape == (4, 8, 8) and "mean_flipped" in cache[0]


def test_a_process_without_images_to_encode_leaves_a_usable_cache(tmp_path):
    """With more processes than images, one process encodes nothing; the cache must still load."""
    from uldm.data import ImageFolderDataset, Preprocessing

    paths = make_blob_images(tmp_path / "images", 1)
    images = ImageFolderDataset(paths, tmp_path / "images", Preprocessing(32, center_crop=True))
    results = build_cache_in_two_processes(images, build_tiny_kl_vae(), tmp_path / "cache")
    for cache in results.values():
        assert len(cache) == 1 and cache[0]["mean"].shape == (4, 8, 8) and "mean_flipped" in cache[0]


# ------------------------------------------------------------------------------------------------
# Damage and interruption


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_part_is_reported_and_only_it_is_re_encoded(damage, train_images, tiny_vae_dir, tmp_path,
                                                               monkeypatch, caplog, encoded_items):
    monkeypatch.setattr(latent_cache, "ITEMS_PER_PART", 8)  # 24 images: 3 parts
    cache = tmp_path / "cache"
    common = dict(cache_latents=True, random_flip=True, latent_cache_dir=cache, max_train_steps=3)
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, tmp_path / "a", **common))
    (folder,) = cache.iterdir()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "items-0000000-0000008", "items-0000008-0000016", "items-0000016-0000024"]
    reference = {p.name: p.read_bytes() for p in (folder / "items-0000008-0000016").glob("*.npy")}
    untouched = {p: p.stat().st_mtime_ns for name in ("items-0000000-0000008", "items-0000016-0000024")
                 for p in (folder / name).glob("*.npy")}

    damaged = folder / "items-0000008-0000016" / ("mean.npy" if damage == "truncated" else "std_flipped.npy")
    if damage == "truncated":
        truncate_half(damaged)
    else:
        damaged.unlink()
    encoded_items.clear()
    with caplog.at_level(logging.WARNING):
        run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, tmp_path / "b", **common))
    expected = "truncated?" if damage == "truncated" else "std_flipped.npy is missing"
    assert f"The latent cache {folder} is damaged: in items-0000008-0000016, {damaged.name}" in caplog.text
    assert expected in caplog.text and "Re-encoding that part (items 8-15)" in caplog.text
    assert encoded_items == list(range(8, 16)), "only the damaged part is encoded again"
    assert [row["step"] for row in read_metrics(tmp_path / "b")] == [1, 2, 3], "training went on"
    assert {p.name: p.read_bytes() for p in (folder / "items-0000008-0000016").glob("*.npy")} == reference
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched, "the intact parts were not rewritten"

    encoded_items.clear()
    run_script(SCRIPT, latent_training_args(train_images, tiny_vae_dir, tmp_path / "c", **common))
    assert encoded_items == [], "the repaired cache is complete"


def test_a_killed_build_resumes_with_the_parts_it_had_finished(photos, tmp_path, monkeypatch, encoded_items):
    vae = build_tiny_kl_vae()
    straight = cached_set(photos, tmp_path / "straight", vae, items_per_part=4).dataset

    original, written = latent_cache.encode_part, []

    def killed_after_the_first_part(*args, **kwargs):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(original(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(latent_cache, "encode_part", killed_after_the_first_part)
    with pytest.raises(KeyboardInterrupt):
        cached_set(photos, tmp_path / "killed", vae, items_per_part=4)
    (folder,) = (tmp_path / "killed").iterdir()
    assert not (folder / "meta.json").exists()
    monkeypatch.setattr(latent_cache, "encode_part", original)

    encoded_items.clear()
    resumed = cached_set(photos, tmp_path / "killed", vae, items_per_part=4).dataset
    assert encoded_items == list(range(4, 10)), "the finished part is kept, the others encoded"
    assert sorted(p.name for p in folder.iterdir()) == [
        "items-0000000-0000004", "items-0000004-0000008", "items-0000008-0000010", "meta.json"]
    for index in range(10):
        for name in straight.fields:
            assert torch.equal(resumed[index][name], straight[index][name])


# ------------------------------------------------------------------------------------------------
# Reading whole batches


def test_gathered_batches_equal_the_stacked_items_in_and_out_of_workers(photos, tmp_path):
    dataset = cached_set(photos, tmp_path / "cache", build_tiny_kl_vae(), items_per_part=3).dataset
    indices = [7, 2, 9, 0, 4, 3]  # unsorted, across parts
    stacked = default_collate([dataset[i] for i in indices])
    gathered = default_collate(dataset.__getitems__(indices))
    assert stacked.keys() == gathered.keys() == {"mean", "std", "mean_flipped", "std_flipped", "index"}
    for name in stacked:
        assert gathered[name].dtype == stacked[name].dtype and torch.equal(gathered[name], stacked[name]), name
    rows = dataset.__getitems__(indices)
    assert set(rows[1]) == set(dataset[2]) and rows[1]["index"] == 2
    assert all(torch.equal(rows[1][name], dataset[2][name]) for name in dataset.fields)
    reordered = default_collate(rows[::-1])  # rows not in their batch's order are stacked, not passed through
    assert torch.equal(reordered["mean"], stacked["mean"].flip(0))

    sampler = EpochBatchSampler(len(dataset), 4, seed=3)
    expected = [default_collate([dataset[i] for i in batch]) for batch in sampler]
    for workers in (0, 1):
        loaded = list(DataLoader(dataset, batch_sampler=sampler, num_workers=workers))
        assert len(loaded) == len(expected)
        for batch, reference in zip(loaded, expected):
            for name in reference:
                assert torch.equal(batch[name], reference[name]), (workers, name)


def test_the_dataset_pickles_without_copying_the_arrays(photos, tmp_path):
    import pickle

    dataset = cached_set(photos, tmp_path / "cache", build_tiny_kl_vae()).dataset
    data = pickle.dumps(dataset)
    assert len(data) < 20_000, "the memory-mapped arrays must not travel (spawned DataLoader workers reopen them)"
    copy = pickle.loads(data)
    assert torch.equal(copy[5]["std_flipped"], dataset[5]["std_flipped"])


# ------------------------------------------------------------------------------------------------
# Without the cache


def test_without_the_cache_only_headers_are_read_and_a_file_that_fails_later_is_replaced(photos, caplog, monkeypatch):
    jpeg = photos / "img_0002.jpg"
    (photos / "img_0002.png").unlink()
    write_truncated_jpeg(jpeg)  # passes the header check; decoding it fails
    (photos / "img_0009.png").write_bytes(b"not an image")
    from PIL import ImageFile

    decoded = []
    original = ImageFile.ImageFile.load
    config = DataConfig(train_data_dir=str(photos), resolution=32, center_crop=True)
    with caplog.at_level(logging.WARNING), monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image) or original(image))
        train_set, files = prepare_training_set(config, one_process())
    assert decoded == [], "the start check decodes no pixels"
    assert "Skipping 1 unreadable" in caplog.text and "img_0009.png" in caplog.text
    assert len(train_set) == 9 and jpeg in files

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        item = train_set[2]
    assert f"Cannot decode {jpeg}" in caplog.text and "the next readable image in its place" in caplog.text
    assert item["index"] == 2 and torch.equal(item["pixel_values"], train_set[3]["pixel_values"])
    caplog.clear()
    train_set[2]
    assert "Cannot decode" not in caplog.text, "warned once"
