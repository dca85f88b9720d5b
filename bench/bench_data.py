#!/usr/bin/env python
"""The data path at FFHQ scale: the loader from the latent cache and from JPEGs, the cost of a restart, memory.

    python bench/bench_data.py            # full sizes: 5-10 minutes on an idle 2-core machine (estimate), 4 GB of /tmp
    python bench/bench_data.py --quick    # tiny sizes, seconds (a smoke test)

1. Loader from the cache: latents/s through torch's DataLoader built as the training loop builds it
   (batch sampler, batch 84), from a synthetic cache of 4x32x32 KL latents with flips (written by the
   cache module's own writer from random arrays), at 0/1/2 workers: per item (`__getitem__`, the path
   before batch gathering) and gathered (`__getitems__`). Wall time and CPU time (this process and its
   workers), which a busy machine distorts less. The per-step flip and fresh posterior sample
   (`latents_from_batch`) are timed on the CPU apart: in training they run on the GPU.
2. Without the cache: random 256 px crops from 1024 px JPEGs (decode, resize, crop, to tensor),
   images/s per core, and the DataLoader workers a GPU at 1,500 images/s would need.
3. Restart: a start with a complete cache over 100 vs 10,000 photos (1024 px JPEGs): the data set-up
   (`uldm.data.prepare_training_set`) and the whole training script (`train_unconditional_latent.main`,
   one step, in this process), and how many image files each opened (none, if it works). The caches are
   written synthetically under the real keys; the first pass (decode, resize, check, encode with a tiny
   f8 VAE, with flips) is measured for real on a subset, in images/s.
4. Memory: 2 processes reading every item of a 70,000-item cache: Rss, Private and Shared from
   /proc/PID/smaps_rollup, and those of the cache's own mappings from /proc/PID/smaps (shared pages, not
   copies).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench import report  # noqa: E402
from bench.harness import ONE_PROCESS  # noqa: E402
from bench.report import REPO_ROOT  # noqa: E402

NAME = "data"
TARGET_LATENTS_PER_SEC = 20_000
TARGET_RESTART_RATIO = 1.1
GPU_IMAGES_PER_SEC = 1_500  # about what one H100 trains with the seed UNet
LATENT_SHAPE = (4, 32, 32)
FIELDS = ("mean", "std", "mean_flipped", "std_flipped")
# name: (full, quick)
DEFAULTS = {
    "batch_size": (84, 84),
    "loader_items": (20_000, 1_000),
    "loader_epochs": (2, 1),
    "source_size": (1024, 256),
    "resolution": (256, 64),
    "num_sources": (32, 4),
    "crop_images": (300, 12),
    "restart_sizes": ([100, 10_000], [20, 200]),
    "first_pass_images": (300, 8),
    "memory_items": (70_000, 1_000),
    "repeats": (3, 1),
    "resume_repeats": (3, 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=None, help="Loader batch size (default 84).")
    parser.add_argument("--loader_items", type=int, default=None, help="Items in the loader's cache (20,000).")
    parser.add_argument("--loader_epochs", type=int, default=None, help="Epochs per loader setting (2).")
    parser.add_argument("--source_size", type=int, default=None, help="Side of the JPEG sources (1024).")
    parser.add_argument("--resolution", type=int, default=None, help="Training resolution (256).")
    parser.add_argument("--num_sources", type=int, default=None, help="Distinct JPEGs generated (32); copies fill the folders.")
    parser.add_argument("--crop_images", type=int, default=None, help="Images decoded for the crops' speed (300).")
    parser.add_argument("--restart_sizes", type=int, nargs="+", default=None, help="Photos per folder (100 10000).")
    parser.add_argument("--first_pass_images", type=int, default=None, help="Photos encoded for real (300).")
    parser.add_argument("--memory_items", type=int, default=None, help="Items in the cache read by 2 processes (70,000).")
    parser.add_argument("--repeats", type=int, default=None, help="In-process starts per size; the fastest counts (3).")
    parser.add_argument("--resume_repeats", type=int, default=None,
                        help="Resumes in a new process per size; the fastest counts (3; --quick 1).")
    return report.parse_benchmark_args(parser, argv, DEFAULTS)


# --------------------------------------------------------------------------------------------- helpers


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers are joined after each epoch)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def counting_image_opens(folder: Path):
    """Counts PIL.Image.open calls on files under `folder` while inside."""
    opened = []
    original = Image.open

    def counting_open(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)) and str(fp).startswith(str(folder)):
            opened.append(str(fp))
        return original(fp, *args, **kwargs)

    Image.open = counting_open
    try:
        yield opened
    finally:
        Image.open = original


def make_photo(size: int, seed: int) -> Image.Image:
    """Photo-like content at JPEG cost: smooth colour fields, a few shapes, fine grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(coarse)
    for _ in range(6):
        x0, y0 = rng.integers(0, size, 2).tolist()
        width, height = rng.integers(size // 10, size // 2, 2).tolist()
        draw.ellipse([x0, y0, x0 + width, y0 + height], fill=tuple(rng.integers(0, 256, 3).tolist()))
    grain = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def make_sources(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for index in range(count):
        path = folder / f"source-{index:03d}.jpg"
        make_photo(size, index).save(path, quality=90)
        sources.append(path)
    return sources


def fill_folder(folder: Path, count: int, sources: list[Path], link: bool = False) -> None:
    """`count` JPEG files, copies of the sources; or hard links to them, where only the listing matters (a restart
    with a complete cache reads no image, and 10,000 copies of a 1024 px JPEG would fill gigabytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        source, target = sources[index % len(sources)], folder / f"{index:05d}.jpg"
        if link:
            os.link(source, target)
        else:
            shutil.copyfile(source, target)


def write_synthetic_cache(cache_folder: Path, num_items: int, shape=LATENT_SHAPE, seed: int = 0,
                          description: dict | None = None) -> None:
    """A complete cache of random KL moments with flips, written by the cache module's own writer."""
    from uldm.latent_cache import part_ranges, write_meta, write_part

    rng = np.random.default_rng(seed)
    records = []
    for start, stop in part_ranges(num_items, 1):
        arrays = {"index": np.arange(start, stop)}
        for name in FIELDS:
            values = rng.standard_normal((stop - start, *shape), dtype=np.float32)
            arrays[name] = np.abs(values) * 0.1 if name.startswith("std") else values
        records.append(write_part(cache_folder, start, stop, arrays))
    write_meta(cache_folder, records, num_items, with_flips=True, description=description)


def tiny_f8_vae():
    """configs/vae/tiny-kl-f4 with a fourth level: f8, so 256 px images give 4x32x32 latents, as the seed recipe's."""
    from diffusers import AutoencoderKL

    from uldm.presets import read_json_preset

    config = read_json_preset("tiny-kl-f4", "vae")
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    config.update(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  block_out_channels=[16, 32, 32, 32])
    torch.manual_seed(0)
    return AutoencoderKL(**config).eval()


# ------------------------------------------------------------------------------------------ 1. loader


class PerItem(torch.utils.data.Dataset):
    """The cache as it was read before batch gathering: one `__getitem__` per item, stacked by the collate."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]


def loader_speed(dataset, batch_size: int, num_workers: int, epochs: int) -> dict:
    """Latents/s (wall) and latents per CPU-second through a DataLoader made per epoch, as the training loop does."""
    from torch.utils.data import DataLoader

    from uldm.data import EpochBatchSampler

    sampler = EpochBatchSampler(len(dataset), batch_size, seed=0)
    count = 0
    wall, cpu = time.perf_counter(), cpu_seconds()
    for epoch in range(epochs):
        sampler.set_position(epoch)
        for batch in DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers):
            count += len(batch["index"])
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {"num_workers": num_workers, "latents": count, "latents_per_sec": count / wall,
            "latents_per_cpu_sec": count / cpu, "wall_s": wall, "cpu_s": cpu}


def flip_and_sample_speed(dataset, batch_size: int, num_batches: int) -> float:
    """Latents/s of `latents_from_batch` (flip + fresh sample + scale) on the CPU, on gathered batches."""
    from uldm.latents import LatentScaling, latents_from_batch

    scaling = LatentScaling(0.18215, 0.0, "bench")
    generator = torch.Generator().manual_seed(0)
    order = np.random.default_rng(0).permutation(len(dataset))
    batches = [dataset.gather(order[i * batch_size:(i + 1) * batch_size].tolist()) for i in range(num_batches)]
    start = time.perf_counter()
    for batch in batches:
        latents_from_batch(batch, None, scaling, generator, random_flip=True)
    return num_batches * batch_size / (time.perf_counter() - start)


def measure_loader(args, work: Path) -> dict:
    from uldm.latent_cache import LatentCacheDataset

    folder = work / "loader-cache"
    write_synthetic_cache(folder, args.loader_items)
    dataset = LatentCacheDataset(folder)
    # The two paths give the same batches.
    indices = np.random.default_rng(1).permutation(len(dataset))[: args.batch_size].tolist()
    stacked = {name: torch.stack([dataset[i][name] for i in indices]) for name in FIELDS}
    gathered = dataset.gather(indices)
    if not all(torch.equal(stacked[name], gathered[name]) for name in FIELDS):
        raise RuntimeError("The gathered batch differs from the stacked items.")
    runs = []
    for label, candidate in (("per item (before)", PerItem(dataset)), ("gathered (after)", dataset)):
        for workers in (0, 1, 2):
            print(f"Loader: {label}, {workers} worker(s)...", flush=True)
            runs.append({"path": label, **loader_speed(candidate, args.batch_size, workers, args.loader_epochs)})
    flip_sample = flip_and_sample_speed(dataset, args.batch_size, min(50, len(dataset) // args.batch_size))
    shutil.rmtree(folder)
    return {"runs": runs, "flip_and_sample_latents_per_sec_cpu": flip_sample}


# ----------------------------------------------------------------------------------- 2. without cache


def measure_crops(args, photos: Path) -> dict:
    """Random crops from the JPEGs, in this process (one core) and through 2 DataLoader workers."""
    from torch.utils.data import DataLoader

    from uldm.data import ImageFolderDataset, Preprocessing, list_folder_images

    paths = list_folder_images(photos)
    dataset = ImageFolderDataset(paths, photos, Preprocessing(args.resolution, center_crop=False))
    count = min(args.crop_images, len(dataset))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # one core
    try:
        wall, cpu = time.perf_counter(), cpu_seconds()
        for index in range(count):
            dataset[index]
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        loader = DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=16, num_workers=2)
        loader_wall = time.perf_counter()
        for _ in loader:
            pass
        loader_wall = time.perf_counter() - loader_wall
    finally:
        torch.set_num_threads(previous)
    per_core = count / cpu
    return {"images": count, "images_per_sec_one_process": count / wall, "images_per_cpu_sec": per_core,
            "images_per_sec_2_workers": count / loader_wall,
            "workers_for_gpu": math.ceil(GPU_IMAGES_PER_SEC / per_core)}


# ------------------------------------------------------------------------------------------ 3. restart


def restart_argv(args, photos: Path, vae_dir: Path, unet_config: Path, cache: Path, output_dir: Path,
                 steps: int = 1, checkpointing_steps: int = 0, resume: bool = False) -> list[str]:
    return [str(value) for value in [
        "--train_data_dir", photos, "--vae_name_or_path", vae_dir, "--model_config_name_or_path", unet_config,
        "--resolution", args.resolution, "--center_crop", "--random_flip", "--cache_latents",
        "--latent_cache_dir", cache, "--train_batch_size", 4, "--max_train_steps", steps, "--lr_warmup_steps", 0,
        "--validation_steps", 0, "--num_validation_images", 0, "--checkpointing_steps", checkpointing_steps,
        "--report_to", "none", "--output_dir", output_dir, "--dataloader_num_workers", 0,
    ] + (["--resume_from_checkpoint", "latest"] if resume else [])]


def timed_resume(command: list[str]) -> float:
    """Seconds of a resume as a user starts it: a fresh interpreter running the script."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    begin = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train_unconditional_latent.py"), *command],
                            env=env, capture_output=True, text=True, timeout=1800, cwd=REPO_ROOT)
    seconds = time.perf_counter() - begin
    if result.returncode != 0 or "Resuming from" not in result.stderr:
        raise RuntimeError(f"The resumed training run failed:\n{result.stderr[-3000:]}")
    return seconds


def measure_restart(args, work: Path, sources: list[Path]) -> dict:
    import json

    from uldm.data import DataConfig, ImageFolderDataset, Preprocessing, list_folder_images, prepare_training_set
    from uldm.latent_cache import CacheConfig, cache_key_of
    from uldm.presets import read_json_preset
    from uldm.testing import run_script_in_this_process
    from uldm.vae import load_vae, vae_fingerprint

    vae_dir = work / "vae"
    tiny_f8_vae().save_pretrained(vae_dir)
    vae = load_vae(str(vae_dir))
    vae_key = vae_fingerprint(vae, str(vae_dir), None, None)
    latent_side = args.resolution // 8
    unet_config = work / "unet.json"
    unet_config.write_text(json.dumps({**read_json_preset("tiny", "unet"), "sample_size": latent_side}))
    preprocessing = Preprocessing(args.resolution, center_crop=True)

    prepared = {}
    for count in args.restart_sizes:
        photos, cache = work / f"photos-{count}", work / f"cache-{count}"
        fill_folder(photos, count, sources, link=True)
        images = ImageFolderDataset(list_folder_images(photos), photos, preprocessing)
        write_synthetic_cache(cache / cache_key_of(images, vae_key, with_flips=True), count,
                              shape=(4, latent_side, latent_side))
        prepared[count] = (photos, cache)

    def start(count: int, label: str) -> tuple[float, float, int]:
        """One start with the complete cache: seconds of the data set-up, of the script, image files opened."""
        photos, cache = prepared[count]
        config = DataConfig(train_data_dir=str(photos), resolution=args.resolution, center_crop=True, random_flip=True)
        output_dir = work / f"run-{count}-{label}"
        with counting_image_opens(photos) as opens:
            begin = time.perf_counter()
            train_set, files = prepare_training_set(config, ONE_PROCESS, CacheConfig(str(cache)), vae, vae_key)
            setup_s = time.perf_counter() - begin
            if len(train_set) != count or len(files) != count:
                raise RuntimeError(f"The synthetic cache was not used: {len(train_set)} items for {count} photos.")
            begin = time.perf_counter()
            run_script_in_this_process("train_unconditional_latent",
                                       restart_argv(args, photos, vae_dir, unet_config, cache, output_dir))
            script_s = time.perf_counter() - begin
        shutil.rmtree(output_dir)
        return setup_s, script_s, len(opens)

    start(min(args.restart_sizes), "warm-up")  # the first run in a process pays one-off costs (lazy imports)
    timings = {count: [] for count in args.restart_sizes}
    for repeat in range(args.repeats):  # sizes alternate, so that a busy spell hits both alike
        for count in args.restart_sizes:
            print(f"Start with {count} photos and a complete cache ({repeat + 1}/{args.repeats})...", flush=True)
            timings[count].append(start(count, str(repeat)))
    sizes = {count: {"setup_s": min(t[0] for t in runs), "script_s": min(t[1] for t in runs),
                     "image_files_opened": sum(t[2] for t in runs)} for count, runs in timings.items()}

    # A resume as a user runs it (a new process, checkpoint loaded), as the issue measured it.
    for count, (photos, cache) in prepared.items():
        base = work / f"resume-{count}"
        run_script_in_this_process("train_unconditional_latent", restart_argv(args, photos, vae_dir, unet_config, cache,
                                                                             base, steps=1, checkpointing_steps=1))
        prepared[count] = (photos, cache, base)
    resumes = {count: [] for count in args.restart_sizes}
    for repeat in range(args.resume_repeats):
        for count, (photos, cache, base) in prepared.items():
            print(f"Resume with {count} photos in a new process ({repeat + 1}/{args.resume_repeats})...", flush=True)
            output_dir = work / f"resume-{count}-{repeat}"
            shutil.copytree(base, output_dir)
            resumes[count].append(timed_resume(restart_argv(args, photos, vae_dir, unet_config, cache, output_dir,
                                                            steps=2, checkpointing_steps=1, resume=True)))
            shutil.rmtree(output_dir)
    for count in sizes:
        sizes[count]["resume_s"] = min(resumes[count])

    # The first pass, for real, on a subset of the photos.
    subset = work / "first-pass"
    fill_folder(subset, args.first_pass_images, sources)
    config = DataConfig(train_data_dir=str(subset), resolution=args.resolution, center_crop=True, random_flip=True)
    start = time.perf_counter()
    prepare_training_set(config, ONE_PROCESS, CacheConfig(str(work / "first-pass-cache"), encode_batch_size=16),
                         vae, vae_key)
    first_pass_s = time.perf_counter() - start
    small, large = min(args.restart_sizes), max(args.restart_sizes)
    return {"sizes": sizes, "ratio_resume": sizes[large]["resume_s"] / sizes[small]["resume_s"],
            "ratio_script": sizes[large]["script_s"] / sizes[small]["script_s"],
            "ratio_setup": sizes[large]["setup_s"] / sizes[small]["setup_s"],
            "first_pass_images": args.first_pass_images, "first_pass_s": first_pass_s,
            "first_pass_images_per_sec": args.first_pass_images / first_pass_s}


# ------------------------------------------------------------------------------------------- 4. memory


def smaps_totals(pid: int, under: str | None = None) -> dict[str, int]:
    """kB of Rss, Pss, Shared_* and Private_* over a process's mappings (all, from smaps_rollup, or only those of
    files under `under`, from smaps)."""
    keys = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")
    totals = dict.fromkeys(keys, 0)
    path = f"/proc/{pid}/smaps_rollup" if under is None else f"/proc/{pid}/smaps"
    counting = under is None
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping's header: address range, permissions, ..., path
            counting = under is None or (len(fields) >= 6 and fields[5].startswith(under))
            continue
        name = fields[0][:-1]
        if counting and name in totals:
            totals[name] += int(fields[1])
    return totals


def _read_whole_cache(folder: str, batch_size: int, barrier, results) -> None:
    from uldm.latent_cache import LatentCacheDataset

    dataset = LatentCacheDataset(Path(folder))
    order = np.random.default_rng(os.getpid()).permutation(len(dataset))
    for start in range(0, len(order), batch_size):
        dataset.gather(order[start:start + batch_size].tolist())
    barrier.wait()  # both have read everything: now their mappings overlap
    results.put({"all": smaps_totals(os.getpid()), "cache": smaps_totals(os.getpid(), folder)})
    barrier.wait()


def measure_memory(args, work: Path) -> dict:
    folder = work / "memory-cache"
    write_synthetic_cache(folder, args.memory_items)
    cache_bytes = sum(path.stat().st_size for path in folder.rglob("*.npy"))
    # Spawned, not forked: two independent processes like two training runs (forked ones would share this process's
    # pages, and a fork after torch's thread pool has run can hang).
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_read_whole_cache, args=(str(folder), args.batch_size, barrier, results))
                 for _ in range(2)]
    for process in processes:
        process.start()
    try:
        measured = [results.get(timeout=900) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    shutil.rmtree(folder)
    return {"items": args.memory_items, "cache_mib": cache_bytes / 2**20, "processes": measured}


# --------------------------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with report.quick_mode_threads(args):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    result = report.start_result(NAME, "The data path: loader, restart cost, memory", args)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as temporary:
        work = Path(temporary)
        loader = measure_loader(args, work)
        sources = make_sources(work / "sources", args.num_sources, args.source_size)
        fill_folder(work / "crops", max(args.num_sources, args.crop_images), sources)
        crops = measure_crops(args, work / "crops")
        restart = measure_restart(args, work, sources)
        memory = measure_memory(args, work)

    result["settings"] = {key: getattr(args, key) for key in DEFAULTS}
    result["settings"].update(latent_shape=list(LATENT_SHAPE), fields=list(FIELDS), torch_threads=torch.get_num_threads())
    result["results"] = {"loader": loader, "crops": crops, "restart": restart, "memory": memory}
    add_tables(result, args, loader, crops, restart, memory)
    report.finish_result(result, args)
    return result


def add_tables(result: dict, args, loader: dict, crops: dict, restart: dict, memory: dict) -> None:
    shape = "x".join(map(str, LATENT_SHAPE))
    report.add_table(
        result, f"Loader from the cache ({args.loader_items:,} items of {shape} with std and flips, batch "
                f"{args.batch_size}, {args.loader_epochs} epoch(s) per row)",
        ["path", "workers", "latents/s", "latents per CPU-second"],
        [[run["path"], run["num_workers"], run["latents_per_sec"], run["latents_per_cpu_sec"]] for run in loader["runs"]])
    after = [run for run in loader["runs"] if run["path"].startswith("gathered")]
    best = max(after, key=lambda run: run["latents_per_sec"])
    report.add_target(result, f"loader from the cache ≥ {TARGET_LATENTS_PER_SEC:,} latents/s on this machine",
                      f"{best['latents_per_sec']:,.0f} latents/s with {best['num_workers']} worker(s)",
                      best["latents_per_sec"] >= TARGET_LATENTS_PER_SEC)

    report.add_table(
        result, f"Without the cache: random {args.resolution} px crops from {args.source_size} px JPEGs",
        ["images", "images/s, 1 process", "images per CPU-second", "images/s, 2 workers",
         f"workers for {GPU_IMAGES_PER_SEC:,} images/s"],
        [[crops["images"], crops["images_per_sec_one_process"], crops["images_per_cpu_sec"],
          crops["images_per_sec_2_workers"], crops["workers_for_gpu"]]])

    rows = [[count, entry["resume_s"], entry["script_s"], entry["setup_s"], entry["image_files_opened"]]
            for count, entry in restart["sizes"].items()]
    report.add_table(result, f"Restart with a complete cache ({args.source_size} px JPEGs, {args.resolution} px; "
                             f"fastest of {args.resume_repeats} resumes and {args.repeats} in-process starts)",
                     ["photos", "resume in a new process s", "start in this process s (1 step)", "data set-up s",
                      "image files opened (in-process starts)"], rows)
    report.add_table(result, "First pass (decode + resize + check + encode with a tiny f8 VAE, with flips)",
                     ["photos", "seconds", "images/s"],
                     [[restart["first_pass_images"], restart["first_pass_s"], restart["first_pass_images_per_sec"]]])
    small, large = min(args.restart_sizes), max(args.restart_sizes)
    opened = sum(entry["image_files_opened"] for entry in restart["sizes"].values())
    report.add_target(result, f"a resume with a complete cache over {large:,} photos ≤ {TARGET_RESTART_RATIO}x the "
                              f"time over {small:,}, opening no image",
                      f"{restart['ratio_resume']:.3f}x (in-process start without imports {restart['ratio_script']:.2f}x; "
                      f"data set-up {restart['sizes'][large]['setup_s']:.3f} s for {large:,} photos), "
                      f"{opened} image file(s) opened",
                      restart["ratio_resume"] <= TARGET_RESTART_RATIO and opened == 0)

    rows = []
    for number, measured in enumerate(memory["processes"]):
        whole, cache = measured["all"], measured["cache"]
        rows.append([number, whole["Rss"] / 1024, (whole["Shared_Clean"] + whole["Shared_Dirty"]) / 1024,
                     (whole["Private_Clean"] + whole["Private_Dirty"]) / 1024, cache["Rss"] / 1024,
                     (cache["Shared_Clean"] + cache["Shared_Dirty"]) / 1024,
                     (cache["Private_Clean"] + cache["Private_Dirty"]) / 1024])
    report.add_table(result, f"Memory of 2 processes that read every item of a {memory['items']:,}-item cache "
                             f"({memory['cache_mib']:,.0f} MiB on disk), MiB",
                     ["process", "Rss", "Shared", "Private", "cache Rss", "cache Shared", "cache Private"], rows)
    cache_private = max(row[6] for row in rows)
    report.add_target(result, "the cache's pages are shared between processes, not copied",
                      f"at most {cache_private:.1f} MiB of the cache private to a process, "
                      f"{min(row[5] for row in rows):,.0f} MiB shared", cache_private <= 0.05 * memory["cache_mib"])
    result["notes"] += [
        "Loader rows: torch's DataLoader with the training loop's batch sampler, a new loader per epoch (as the loop "
        "makes one), no pinned memory. 'per item' reads each item with __getitem__ and lets the collate stack them "
        "(the path before batch gathering); 'gathered' fetches each batch with __getitems__ from the memory-mapped "
        "arrays. CPU-seconds include the workers'.",
        f"The per-step flip + fresh posterior sample + scale (latents_from_batch), which runs on the training device, "
        f"takes the CPU {loader['flip_and_sample_latents_per_sec_cpu']:,.0f} latents/s here.",
        "Without the cache every image is decoded at full size, resized and cropped each epoch; 'workers for' is "
        f"{GPU_IMAGES_PER_SEC:,} / images per CPU-second, rounded up (one core per worker).",
        "Restart: the caches are written synthetically under the keys the training script computes (no image is "
        "encoded). 'Resume in a new process' runs `python train_unconditional_latent.py --resume_from_checkpoint "
        "latest` (one more step, tiny UNet), as a user restarts a run; 'start in this process' calls the script's "
        "main() with the imports done, so the part that grows with the photos weighs more there. The data set-up "
        "(listing the folder and the size and time of every file, reading meta.json, checking the parts' headers) "
        "is the only part that grows with the number of photos.",
    ]


if __name__ == "__main__":
    main()
