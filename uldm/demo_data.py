"""The offline demo data set: procedurally drawn cartoon faces, deterministic from a seed.

Every face is drawn from a handful of factors that are easy to see in a 32 px sample grid:
background colour, head shape and colour, eyes, mouth, an optional party hat, and the head's
size and position. A model that has learned the data makes faces with these parts in the
right places; one that has not makes blobs.

The "subject" for the DreamBooth demo is one particular combination of factors, the blue
square-headed face with a red hat and a smile, which never occurs in the main set. Its images
vary only in what would vary between photos of one object (background, size, position).

Image i depends only on (seed, i), never on how many images are made, so a larger set starts
with the images of a smaller one. Drawing happens at 4x the resolution and is reduced with a
box filter, which gives anti-aliased edges identical on every machine (no fonts, no platform
rasterisers beyond PIL's own).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

BACKGROUNDS = {
    "cream": (238, 232, 213),
    "sky": (173, 216, 230),
    "mint": (189, 236, 182),
    "lilac": (216, 191, 216),
    "slate": (112, 128, 144),
    "peach": (255, 203, 164),
}
HEAD_COLOURS = {
    "yellow": (250, 204, 21),
    "orange": (249, 115, 22),
    "pink": (244, 114, 182),
    "tan": (210, 160, 110),
    "green": (74, 180, 90),
    "blue": (37, 99, 235),
}
HAT_COLOURS = {"red": (220, 38, 38), "purple": (126, 34, 206), "black": (30, 30, 30), "white": (250, 250, 250)}
HEAD_SHAPES = ("round", "square", "oval")
EYE_STYLES = ("dots", "wide")
MOUTHS = ("smile", "frown", "open")
HAT_PROBABILITY = 0.4
SUPERSAMPLING = 4

SUBJECT = {"head_shape": "square", "head_colour": "blue", "hat": "red", "mouth": "smile", "eyes": "wide"}
FACES_DIR = "faces"
SUBJECT_DIR = "subject"
FACTORS_FILE = "factors.jsonl"
PREVIEW_FILE = "preview.png"
SUBJECT_PREVIEW_FILE = "subject_preview.png"


@dataclass(frozen=True)
class FaceFactors:
    """What a face looks like. Sizes and positions are fractions of the image side."""

    background: str
    head_shape: str
    head_colour: str
    eyes: str
    mouth: str
    hat: str | None
    head_size: float  # half the head's width
    centre_x: float
    centre_y: float

    def is_subject(self) -> bool:
        return all(getattr(self, name) == value for name, value in SUBJECT.items())


def _choice(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _placement(rng: np.random.Generator) -> dict:
    return {
        "background": _choice(rng, BACKGROUNDS),
        "head_size": round(float(rng.uniform(0.25, 0.32)), 4),
        "centre_x": round(float(0.5 + rng.uniform(-0.09, 0.09)), 4),
        "centre_y": round(float(0.57 + rng.uniform(-0.06, 0.06)), 4),
    }


def face_rng(seed: int, index: int, stream: str) -> np.random.Generator:
    """Independent randomness per (seed, set, image): image i never depends on the set's size."""
    return np.random.default_rng([seed, {"faces": 0, "subject": 1}[stream], index])


def random_face_factors(rng: np.random.Generator) -> FaceFactors:
    """A face from the main set: any combination except the subject's."""
    while True:
        factors = FaceFactors(
            head_shape=_choice(rng, HEAD_SHAPES),
            head_colour=_choice(rng, HEAD_COLOURS),
            eyes=_choice(rng, EYE_STYLES),
            mouth=_choice(rng, MOUTHS),
            hat=_choice(rng, HAT_COLOURS) if rng.random() < HAT_PROBABILITY else None,
            **_placement(rng),
        )
        if not factors.is_subject():
            return factors


def subject_factors(rng: np.random.Generator) -> FaceFactors:
    """The subject, placed as in another 'photo' of it."""
    return FaceFactors(**SUBJECT, **_placement(rng))


# --------------------------------------------------------------------------------------------
# Drawing


def draw_face(factors: FaceFactors, resolution: int = 32) -> Image.Image:
    """Render the face as an RGB image of side `resolution`."""
    size = resolution * SUPERSAMPLING
    image = Image.new("RGB", (size, size), BACKGROUNDS[factors.background])
    draw = ImageDraw.Draw(image)
    cx, cy = factors.centre_x * size, factors.centre_y * size
    half_w = factors.head_size * size
    half_h = half_w * (1.2 if factors.head_shape == "oval" else 1.0)
    head = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
    colour = HEAD_COLOURS[factors.head_colour]
    if factors.head_shape == "square":
        draw.rounded_rectangle(head, radius=half_w * 0.25, fill=colour)
    else:
        draw.ellipse(head, fill=colour)

    eye_dx, eye_y = half_w * 0.42, cy - half_h * 0.2
    for side in (-1, 1):
        ex = cx + side * eye_dx
        if factors.eyes == "wide":
            white = half_w * 0.28
            draw.ellipse((ex - white, eye_y - white, ex + white, eye_y + white), fill=(255, 255, 255))
        pupil = half_w * (0.14 if factors.eyes == "wide" else 0.17)
        draw.ellipse((ex - pupil, eye_y - pupil, ex + pupil, eye_y + pupil), fill=(20, 20, 20))

    mouth_w, mouth_y, line = half_w * 0.5, cy + half_h * 0.38, max(2, round(half_w * 0.14))
    if factors.mouth == "open":
        r = half_w * 0.2
        draw.ellipse((cx - r, mouth_y - r, cx + r, mouth_y + r), fill=(120, 20, 30))
    elif factors.mouth == "smile":
        draw.arc((cx - mouth_w, mouth_y - mouth_w * 0.8, cx + mouth_w, mouth_y + mouth_w * 0.4),
                 start=20, end=160, fill=(20, 20, 20), width=line)
    else:
        draw.arc((cx - mouth_w, mouth_y, cx + mouth_w, mouth_y + mouth_w * 1.0),
                 start=200, end=340, fill=(20, 20, 20), width=line)

    if factors.hat is not None:
        top = cy - half_h
        draw.polygon([(cx - half_w * 0.6, top + half_h * 0.12), (cx + half_w * 0.6, top + half_h * 0.12),
                      (cx, top - half_h * 0.6)], fill=HAT_COLOURS[factors.hat])
    return image.reduce(SUPERSAMPLING)


# --------------------------------------------------------------------------------------------
# The data set on disk


@dataclass(frozen=True)
class DemoDataset:
    root: Path
    faces_dir: Path
    subject_dir: Path
    num_images: int
    num_subject_images: int


def _write_set(folder: Path, stream: str, count: int, seed: int, resolution: int, make_factors,
               factors_log, keep: int) -> list[Image.Image]:
    """Draw and save the set; returns its first `keep` images (for the preview grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = []
    for index in tqdm(range(count), desc=f"Drawing {stream}", leave=False):
        factors = make_factors(face_rng(seed, index, stream))
        name = f"{index:05d}.png"
        image = draw_face(factors, resolution)
        image.save(folder / name)
        if index < keep:
            kept.append(image)
        factors_log.write(json.dumps({"file": f"{folder.name}/{name}", **asdict(factors)}) + "\n")
    return kept


def _remove_stale_images(folder: Path, count: int) -> None:
    """A rerun with fewer images must not leave the old extra ones behind."""
    if folder.is_dir():
        for path in folder.glob("*.png"):
            if not path.stem.isdigit() or int(path.stem) >= count:
                path.unlink()


def write_demo_dataset(output_dir: str | os.PathLike, num_images: int = 1024, num_subject_images: int = 8,
                       resolution: int = 32, seed: int = 0, preview_size: int = 64) -> DemoDataset:
    """Draw the main set into faces/, the subject into subject/, list every image's factors in
    factors.jsonl and write preview grids of both sets."""
    from .validation import image_grid

    if num_images < 1 or num_subject_images < 1:
        raise ValueError("The demo needs at least one face and one subject image.")
    if resolution < 16:
        raise ValueError(f"--resolution {resolution} is too small to draw a face; use 16 or more.")
    root = Path(output_dir)
    faces_dir, subject_dir = root / FACES_DIR, root / SUBJECT_DIR
    _remove_stale_images(faces_dir, num_images)
    _remove_stale_images(subject_dir, num_subject_images)
    root.mkdir(parents=True, exist_ok=True)
    with (root / FACTORS_FILE).open("w") as factors_log:
        # The grids are built from the images as drawn (PNG is lossless: the same pixels as the files).
        previews = _write_set(faces_dir, "faces", num_images, seed, resolution, random_face_factors, factors_log,
                              keep=preview_size)
        subject = _write_set(subject_dir, "subject", num_subject_images, seed, resolution, subject_factors,
                             factors_log, keep=num_subject_images)
    image_grid(previews).save(root / PREVIEW_FILE)
    image_grid(subject, columns=min(len(subject), 8)).save(root / SUBJECT_PREVIEW_FILE)
    return DemoDataset(root, faces_dir, subject_dir, num_images, num_subject_images)


def read_factors(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / FACTORS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
