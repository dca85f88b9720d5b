"""Sampling pieces shared by sample.py, validation during training and DreamBooth class images.

* Schedulers by name (`make_scheduler`), built from the saved scheduler's config; a pipeline from a
  UNet (`build_pipeline`, `save_pipeline`).
* Per-image noise (`generators_for_indices`): image i always comes from a generator seeded with
  seed + i, so its pixels do not depend on the batch size or on how many processes share the work.
* A sample folder (`write_missing_samples`): images `{i:06d}.png`, written atomically, resumable,
  spread over the processes of an `accelerate.Accelerator` (`write_samples` does the drawing, for
  any file names); `save_samples_npz` packs it into an .npz.
* `make_image_grid` for preview grids.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import make_image_grid as diffusers_make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from .images import _temporary_path, list_image_files, save_image_atomically  # the latter also imported from here by sample.py
from .errors import InputError, SaveError
from .saving import (
    describe_cause, final_save_remedy, free_space, is_write_failure, processes_stop_together, save_failure_message,
    save_pretrained_atomically,
)

# name -> (class, config overrides). The config of the saved scheduler supplies the noise schedule.
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A scheduler of the named kind with the noise schedule of `config` (e.g. `pipe.scheduler.config`)."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}: choose one of {', '.join(SCHEDULER_NAMES)}.")
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config(config, **overrides)


def sampling_autocast(accelerator, precision: str | None = None):
    """The precision samples are drawn in: the run's mixed precision (None), full precision ("no", "fp32"), or
    autocast to "fp16"/"bf16" whatever the run's (DreamBooth's --prior_generation_precision)."""
    if precision is None:
        return accelerator.autocast()
    if precision in ("no", "fp32"):
        return torch.autocast(accelerator.device.type, enabled=False)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"Unknown precision {precision!r}: no, fp32, fp16 or bf16.")
    return torch.autocast(accelerator.device.type, dtype=dtypes[precision])


def build_pipeline(unet, vae, scaling, scheduler_config: Mapping[str, Any] | None = None,
                   scheduler_name: str | None = None, scheduler=None):
    """The one place a pipeline is put together from a UNet: `vae`, the latent `scaling` (a
    `uldm.latents.LatentScaling` or anything with `scale`/`shift`), and a scheduler of kind `scheduler_name`
    with the noise schedule of `scheduler_config` (or a ready `scheduler`). Its progress bar is off."""
    from pipeline_latent_uncond import UnconditionalLatentPipeline

    if scheduler is None:
        scheduler = make_scheduler(scheduler_name, scheduler_config)
    pipeline = UnconditionalLatentPipeline(unet=unet, vae=vae, scheduler=scheduler,
                                           latent_scaling_factor=scaling.scale, latent_shift_factor=scaling.shift)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def with_sampler(pipeline, scheduler_name: str):
    """A saved pipeline's UNet, VAE and latent scale with a scheduler of kind `scheduler_name` on its noise
    schedule (e.g. DPM-Solver++ for a pipeline saved with DDPM); a pixel-space sampler's UNet likewise."""
    from .latents import pipeline_scaling

    if getattr(pipeline, "vae", None) is None:
        from .first_stage import PixelSampler

        return PixelSampler(pipeline.unet, make_scheduler(scheduler_name, pipeline.scheduler.config))
    return build_pipeline(pipeline.unet, pipeline.vae, pipeline_scaling(pipeline, "the pipeline"),
                          pipeline.scheduler.config, scheduler_name)


def save_pipeline(unet, vae, scaling, scheduler, output_dir: str | os.PathLike) -> None:
    """Save a trained UNet as a pipeline folder, with the VAE in fp32 however training uses it (and leaves it so)."""
    training_dtype = vae.dtype
    vae.to(torch.float32)
    try:
        save_trained_pipeline(build_pipeline(unet, vae, scaling, scheduler=scheduler), output_dir)
    finally:
        vae.to(training_dtype)


def save_trained_pipeline(pipeline, output_dir: str | os.PathLike) -> None:
    """A training run's result, put in place only once whole; a failure says what to do with the checkpoints."""
    save_pretrained_atomically(pipeline, output_dir, "the trained pipeline", remedy=partial(final_save_remedy, output_dir))


def generators_for_indices(
    seed: int, indices: Sequence[int], device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One generator per image, seeded with seed + index.

    CPU generators (the default) give the same noise on every machine; the pipeline moves the noise
    to the model's device.
    """
    return [torch.Generator(device=device).manual_seed(seed + int(index)) for index in indices]


def make_image_grid(images: Sequence[Image.Image], rows: int) -> Image.Image:
    """Images in `rows` rows (left to right, top to bottom); a short last row is filled with black."""
    if not images:
        raise ValueError("make_image_grid needs at least one image.")
    rows = max(1, min(rows, len(images)))
    cols = math.ceil(len(images) / rows)
    filler = Image.new(images[0].mode, images[0].size)
    return diffusers_make_image_grid(list(images) + [filler] * (rows * cols - len(images)), rows=rows, cols=cols)


# ------------------------------------------------------------------------------------ sample folders


# What sample.py writes into a sample folder besides the numbered samples.
SAMPLE_ARGS_FILE = "sample_args.json"
SAMPLE_GRID_FILE = "grid.png"
SAMPLE_NPZ_FILE = "samples.npz"
_SAMPLE_FILE = re.compile(r"^\d{6}\.png$")


def sample_file_name(index: int) -> str:
    return f"{index:06d}.png"


def samples_to_score(folder: str | os.PathLike) -> list[Path]:
    """The images of a sample folder to score: in a folder written by sample.py (it holds its
    SAMPLE_ARGS_FILE) only the numbered samples, not the grid; elsewhere every image file."""
    folder = Path(folder)
    if not (folder / SAMPLE_ARGS_FILE).is_file():
        paths = list_image_files(folder)
    else:
        paths = sorted(path for path in folder.iterdir() if _SAMPLE_FILE.match(path.name))
    if not paths:
        raise InputError(f"No image files found under {folder}.")
    return paths


def missing_indices(output_dir: str | os.PathLike, num_images: int) -> list[int]:
    """Indices below num_images whose image file is not in output_dir yet."""
    output_dir = Path(output_dir)
    return [i for i in range(num_images) if not (output_dir / sample_file_name(i)).is_file()]


def batches(items: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), batch_size):
        yield list(items[start : start + batch_size])


def write_missing_samples(pipeline, output_dir: str | os.PathLike, num_images: int, accelerator,
                          **sampling) -> list[int]:
    """Make sure output_dir holds `{i:06d}.png` for every i < num_images; returns the indices this process made.

    Every process must call this (it synchronises them). Images already present are kept, so an
    interrupted run resumes where it stopped. The missing indices are split between the processes;
    `sampling` (seed, batch_size, num_inference_steps, eta, description) goes to `write_samples`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    missing = missing_indices(output_dir, num_images)
    accelerator.wait_for_everyone()  # all processes have listed the folder before anyone writes to it
    return write_samples(pipeline, output_dir, missing, accelerator, **sampling)


def write_samples(
    pipeline,
    output_dir: str | os.PathLike,
    indices: Sequence[int],
    accelerator,
    *,
    file_name: Callable[[int], str] = sample_file_name,
    seed: int = 0,
    batch_size: int = 16,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    description: str = "Sampling",
    precision: str | None = None,
) -> list[int]:
    """Draw image i for every i in `indices` and write it to output_dir / file_name(i); returns this process' indices.

    Every process must call this with the same `indices` (it synchronises them at the end, so on
    return every process sees all the images). The indices are split between the processes; image i
    is drawn with generator seed + i, so it is the same whatever the split or batch size. Runs under
    `accelerator.autocast()` (fp16/bf16 compute with fp32 latents when mixed precision is on), or in the
    given `precision` (see sampling_autocast).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    output_dir = Path(output_dir)
    indices = list(indices)
    with accelerator.split_between_processes(indices) as own_indices:
        own_indices = list(own_indices)

    progress = tqdm(total=len(own_indices), desc=description, unit="img", disable=not accelerator.is_main_process)
    if accelerator.num_processes > 1:
        progress.set_postfix_str(f"main process' share of {len(indices)}")
    written = []
    # A full disk on any process stops all of them with one message; the images written are kept.
    with processes_stop_together(
            accelerator, f"{len(indices)} images", output_dir,
            needed=lambda: _space_for_all(written, len(indices)),
            basis=f"for the {len(indices)} images, at the size of those written",
            kept="The images already written are kept.",
            remedy="Free some space there and run the same command again: it makes only the missing images."):
        for batch in batches(own_indices, batch_size):
            with sampling_autocast(accelerator, precision):
                images = pipeline(
                    batch_size=len(batch),
                    num_inference_steps=num_inference_steps,
                    generator=generators_for_indices(seed, batch),
                    eta=eta,
                    output_type="pil",
                ).images
            for index, image in zip(batch, images):
                save_image_atomically(image, output_dir / file_name(index))
                written.append(output_dir / file_name(index))
            progress.update(len(batch))
    progress.close()
    return own_indices


def _space_for_all(written: list[Path], count: int) -> int | None:
    """Bytes `count` images need, at the mean size of the images this process wrote so far."""
    sizes = [path.stat().st_size for path in written if path.is_file()]
    return int(sum(sizes) / len(sizes) * count) if sizes else None


def _load_sample(output_dir: Path, index: int) -> np.ndarray:
    with Image.open(output_dir / sample_file_name(index)) as image:
        return np.asarray(image.convert("RGB"))


def save_samples_npz(output_dir: str | os.PathLike, num_images: int, path: str | os.PathLike) -> None:
    """Write images 0..num_images-1 of a sample folder as one uint8 array N×H×W×3 into an .npz.

    The array is stored under `arr_0` (the key guided-diffusion's evaluator reads) and streamed image
    by image, so 50k samples at 256 px (about 10 GB) never have to fit in memory. Written atomically.
    """
    output_dir, path = Path(output_dir), Path(path)
    missing = missing_indices(output_dir, num_images)
    if missing:
        raise FileNotFoundError(f"{output_dir} lacks {len(missing)} of {num_images} images, e.g. "
                                f"{sample_file_name(missing[0])}; run the sampler again to fill it.")
    first = _load_sample(output_dir, 0)
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (num_images, *first.shape)}
    temporary = _temporary_path(path)
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for index in range(num_images):
                    pixels = first if index == 0 else _load_sample(output_dir, index)
                    if pixels.shape != first.shape:
                        raise ValueError(f"{sample_file_name(index)} is {pixels.shape}, {sample_file_name(0)} is "
                                         f"{first.shape}: the folder mixes images of different sizes.")
                    member.write(np.ascontiguousarray(pixels).tobytes())
    except BaseException as error:
        cause = describe_cause(error, free_space(path.parent), None) if is_write_failure(error) else None
        temporary.unlink(missing_ok=True)  # a full disk must not keep the part written
        if cause is None:
            raise
        raise SaveError(save_failure_message(
            f"the samples' {path.name}", path.parent, cause, needed=num_images * first.nbytes,
            basis=f"{num_images} images of {first.shape[1]}x{first.shape[0]} px, uncompressed",
            kept="The sample images are kept.",
            remedy="Free some space there and run the same command again: it only packs the images again.")) from None
    os.replace(temporary, path)
