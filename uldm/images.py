"""Finding image files, opening them as clean 8-bit RGB whatever they are on disk, and saving PNGs atomically.

Phone photos carry their orientation in EXIF, scans come as CMYK or 16-bit greyscale, web
images as palettes with transparency. Every script reads images through `load_rgb_image`
so that all of them see the same pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm",
)

# Background that transparent pixels are composited onto.
_ALPHA_BACKGROUND = (255, 255, 255)


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(roots: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Image files under the given files or folders (folders searched recursively), sorted.

    Hidden files and folders (".ipynb_checkpoints", ".DS_Store", ...) are skipped.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            if is_image_file(root):
                found.append(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"{root} does not exist: give an image file or a folder of images.")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(
                Path(dirpath) / name
                for name in sorted(filenames)
                if not name.startswith(".") and is_image_file(name)
            )
    return sorted(found)


def update_with_listing(digest, paths, root: str | os.PathLike):
    """Feed a listing of files into a hashlib `digest`: each path relative to `root`, its size and modification
    time (an edited, added or removed file changes it; no file is read). The one way file lists are keyed."""
    prefix = str(root).rstrip(os.sep) + os.sep
    for path in paths:
        name = str(path)  # relative to the root by string: pathlib is slow over 70,000 files
        relative = name[len(prefix):] if name.startswith(prefix) else os.path.relpath(name, root)
        stat = os.stat(name)
        digest.update(f"{relative}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit or 32-bit greyscale ('I;16', 'I', 'F') to 8-bit 'L' by the value range of the mode."""
    array = np.asarray(image)
    if image.mode == "F":
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / max(high - low, 1e-12) * 255.0
    else:
        # 16-bit data stored in 'I' images uses 0..65535; anything larger is rescaled.
        high = 65535.0 if array.max() <= 65535 else float(array.max())
        scaled = array.astype(np.float64) / high * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF orientation applied, alpha composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _high_bit_depth_to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode a file fully (so truncated files fail here, not later) and return 8-bit RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def _temporary_path(path: Path) -> Path:
    # Hidden and unique per process, so readers never see a half-written file and writers never collide.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_image_atomically(image: Image.Image, path: str | os.PathLike) -> None:
    """Save as PNG under a hidden temporary name, then rename: nobody ever lists a half-written image."""
    path = Path(path)
    temporary = _temporary_path(path)
    try:
        image.save(temporary, format="PNG")
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk must not keep the part written
        raise
    os.replace(temporary, path)
