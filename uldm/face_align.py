"""FFHQ face alignment: dlib landmarks, the FFHQ crop geometry, and batch alignment of image files.

A model trained on FFHQ only generates faces framed the FFHQ way, so new face data (DreamBooth
instance photos included) must be cropped with exactly the geometry of NVlabs/ffhq-dataset's
`recreate_aligned_images`: an oriented square derived from the eye centres and mouth corners,
padded with a blurred, median-faded reflection where it leaves the photo, sampled at 4x the
output size and reduced with LANCZOS.

Three layers, each usable on its own:
- dlib models: `face_model_path`, `landmark_predictor`, `face_detector`, `detect_faces`
  (also used by the identity metrics).
- geometry: `ffhq_quad`, `warp_quad`, `align_face` (from eye centres and mouth corners of any
  detector), `align_face_68` (from dlib's 68 points), `aligned_coordinates`.
- files: `align_image_file` (one photo -> `<stem>_<k>.png` files + manifest records) and the
  manifest helpers that `align_faces.py` uses for resumable, parallel runs.

Coordinates are (x, y) in pixels of the image as displayed, i.e. after EXIF orientation, with
(0, 0) the centre of the top-left pixel (dlib's convention).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .images import load_rgb_image, save_image_atomically

FFHQ_SIZE = 1024
# FFHQ samples the quad at 4x the output size and reduces with LANCZOS, which antialiases.
TRANSFORM_OVERSAMPLING = 4
LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR_MODEL = "mmod_human_face_detector.dat"
DETECTORS = ("hog", "cnn")
MANIFEST_NAME = "manifest.jsonl"

Points = np.ndarray  # float64 array of shape (n, 2), (x, y) pixel coordinates


# --------------------------------------------------------------------------- dlib models


def face_model_path(name: str) -> Path:
    """Path of a model file shipped by the `face_recognition_models` package.

    Names: "shape_predictor_68_face_landmarks.dat", "shape_predictor_5_face_landmarks.dat",
    "mmod_human_face_detector.dat", "dlib_face_recognition_resnet_model_v1.dat".
    The package is located without importing it: its __init__ needs pkg_resources, which
    recent setuptools no longer provides.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "face_recognition_models is not installed; it ships dlib's face models. "
            "Install it with: pip install face_recognition_models"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / name
        if path.is_file():
            return path
    available = sorted(
        p.name for location in spec.submodule_search_locations for p in (Path(location) / "models").glob("*.dat")
    )
    raise FileNotFoundError(f"face_recognition_models has no model file {name!r}; it has: {available}")


# One instance per process (each worker of a multiprocessing pool loads its own).
@functools.lru_cache(maxsize=None)
def landmark_predictor():
    """dlib's 68-point shape predictor (the one FFHQ used)."""
    import dlib

    return dlib.shape_predictor(str(face_model_path(LANDMARK_MODEL)))


@functools.lru_cache(maxsize=None)
def face_detector(kind: str = "hog"):
    """dlib's face detector: "hog" (frontal HOG + linear SVM, fast on a CPU) or "cnn" (MMOD CNN,
    finds more poses and small faces, slow without CUDA)."""
    import dlib

    if kind == "hog":
        return dlib.get_frontal_face_detector()
    if kind == "cnn":
        return dlib.cnn_face_detection_model_v1(str(face_model_path(CNN_DETECTOR_MODEL)))
    raise ValueError(f"Unknown face detector {kind!r}; choose one of {DETECTORS}.")


@dataclass(frozen=True)
class DetectedFace:
    """One face found by dlib: its box (left, top, right, bottom), detector score, 68 landmarks."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: Points = field(repr=False)


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"Expected an 8-bit RGB image (H, W, 3), got dtype {array.dtype} and shape {array.shape}; "
            "load images with uldm.images.load_rgb_image or convert them with uldm.images.to_rgb."
        )
    return np.ascontiguousarray(array)


def detect_faces(
    image: Image.Image | np.ndarray, detector: str = "hog", upsample: int = 1, threshold: float = 0.0
) -> list[DetectedFace]:
    """Faces in an RGB image with their 68 dlib landmarks, in the detector's order.

    upsample: times the detector doubles the image first (1 finds faces down to about 40 px).
    threshold: keep detections scoring above it (0 is dlib's own default; raise it to drop
    weak false positives when writing every face).
    """
    array = _as_rgb_array(image)
    if detector == "hog":
        rectangles, scores, _ = face_detector("hog").run(array, upsample, threshold)
        found = list(zip(rectangles, scores))
    else:
        found = [(d.rect, d.confidence) for d in face_detector(detector)(array, upsample) if d.confidence > threshold]
    predictor = landmark_predictor()
    faces = []
    for rectangle, score in found:
        shape = predictor(array, rectangle)
        landmarks = np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)
        box = (rectangle.left(), rectangle.top(), rectangle.right(), rectangle.bottom())
        faces.append(DetectedFace(box=box, score=float(score), landmarks=landmarks))
    return faces


# --------------------------------------------------------------------------- FFHQ geometry


@dataclass(frozen=True)
class AlignedFace:
    image: Image.Image
    quad: Points  # (4, 2) source-image corners mapped to the output's top-left, bottom-left,
    #               bottom-right and top-right corners


def eyes_and_mouth_from_68(landmarks: Points) -> tuple[Points, Points, Points, Points]:
    """(eye_left, eye_right, mouth_left, mouth_right) from dlib's 68 points: the eye centres are
    the means of points 36-41 and 42-47, the mouth corners points 48 and 54. FFHQ uses nothing else."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (68, 2):
        raise ValueError(f"Expected 68 (x, y) landmarks in dlib's order, got an array of shape {landmarks.shape}.")
    return landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0), landmarks[48], landmarks[54]


def _rot90(vector: np.ndarray) -> np.ndarray:
    return np.array([-vector[1], vector[0]])


def ffhq_quad(
    eye_left: Sequence[float],
    eye_right: Sequence[float],
    mouth_left: Sequence[float],
    mouth_right: Sequence[float],
    rotate: bool = True,
) -> Points:
    """The FFHQ crop square in source coordinates, corners in PIL QUAD order (top-left,
    bottom-left, bottom-right, top-right of the output).

    eye_left / mouth_left are the points on the image's left for an upright face, i.e. the
    person's right eye and mouth corner (dlib points 36-41 and 48; InsightFace's and MTCNN's
    first eye and first mouth corner). rotate=False keeps the square axis-aligned (the face
    keeps its tilt) with the same centre and size.
    """
    eye_left, eye_right, mouth_left, mouth_right = (np.asarray(p, dtype=np.float64) for p in
                                                    (eye_left, eye_right, mouth_left, mouth_right))
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) * 0.5 - eye_avg
    # In image coordinates (y down) a face that is not mirrored has its mouth on the positive
    # side of the eye line; a negative cross product means the eyes (or mouth corners) were swapped.
    if eye_to_eye[0] * eye_to_mouth[1] - eye_to_eye[1] * eye_to_mouth[0] <= 0:
        raise ValueError(
            "The eye and mouth points do not form a face: eye_left must be the eye on the image's left "
            "(the person's right eye) and the mouth must lie below the eyes in the face's own frame. "
            f"Got eye_left={eye_left}, eye_right={eye_right}, mouth_left={mouth_left}, mouth_right={mouth_right}."
        )
    # The x axis averages the eye line with the perpendicular of the eye-mouth line, so that
    # both pairs of points level the face.
    x = eye_to_eye - _rot90(eye_to_mouth) if rotate else np.array([1.0, 0.0])
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = _rot90(x)
    centre = eye_avg + eye_to_mouth * 0.1
    return np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])


def quad_size(quad: Points) -> float:
    """Side length of the crop square in source pixels (FFHQ's `qsize`)."""
    quad = np.asarray(quad, dtype=np.float64)
    return float(np.hypot(*(quad[3] - quad[0])))


def aligned_coordinates(points: Points, quad: Points, output_size: int) -> Points:
    """Where source-image points land in the aligned image (pixel coordinates, dlib's convention)."""
    quad = np.asarray(quad, dtype=np.float64)
    axes = np.stack([quad[3] - quad[0], quad[1] - quad[0]], axis=1)  # columns: output x and y
    fractions = np.linalg.solve(axes, (np.asarray(points, dtype=np.float64) - quad[0]).T).T
    return fractions * output_size - 0.5


def resolve_sizes(output_size: int, transform_size: int | None = None) -> tuple[int, int]:
    """(transform_size, reference_size) for an output size.

    FFHQ's own step is transform -> LANCZOS to 1024; smaller data sets (FFHQ-256) are LANCZOS
    downscales of that 1024 image. So below 1024 the aligned image is made at the reference
    size min(1024, transform_size) and then downscaled; the default transform size is 4x
    the reference size (4096 for every output up to 1024, as in FFHQ).
    """
    if output_size < 1:
        raise ValueError(f"output_size must be positive, got {output_size}.")
    if transform_size is None:
        transform_size = TRANSFORM_OVERSAMPLING * max(output_size, FFHQ_SIZE)
    if transform_size < output_size:
        raise ValueError(
            f"transform_size ({transform_size}) must be at least output_size ({output_size}); "
            f"FFHQ uses {TRANSFORM_OVERSAMPLING}x the output size."
        )
    reference_size = max(output_size, min(FFHQ_SIZE, transform_size))
    return transform_size, reference_size


def _pad_with_blur_and_median(image: Image.Image, pad: np.ndarray, qsize: float) -> Image.Image:
    """Reflect-pad (left, top, right, bottom) and hide the mirror image: the pad is blurred
    (blending in over a third of the pad width inside the photo) and fades towards the median colour."""
    import scipy.ndimage  # imported here: it costs most of this module's import time and is rarely needed

    left, top, right, bottom = (int(p) for p in pad)
    pixels = np.pad(np.float32(image), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    height, width, _ = pixels.shape
    ys = np.arange(height, dtype=np.float32)[:, None, None]
    xs = np.arange(width, dtype=np.float32)[None, :, None]
    # 0 at the photo's edge, 1 at the outer edge of the pad, negative inside the photo.
    mask = np.maximum(
        1.0 - np.minimum(xs / left, (width - 1 - xs) / right),
        1.0 - np.minimum(ys / top, (height - 1 - ys) / bottom),
    )
    sigma = qsize * 0.02
    blurred = scipy.ndimage.gaussian_filter(pixels, [sigma, sigma, 0])
    pixels += (blurred - pixels) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    pixels += (np.median(pixels, axis=(0, 1)) - pixels) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.uint8(np.clip(np.rint(pixels), 0, 255)), "RGB")


def _bounds(quad: Points) -> tuple[int, int, int, int]:
    return (
        int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
        int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())),
    )


def warp_quad(
    image: Image.Image | np.ndarray,
    quad: Points,
    output_size: int = FFHQ_SIZE,
    transform_size: int | None = None,
    padding: bool = True,
) -> Image.Image:
    """Cut an FFHQ quad out of an RGB image: shrink, crop, pad, 4x transform, LANCZOS reduce.

    With padding=False the parts of the square outside the photo stay black, as in FFHQ.
    """
    image = Image.fromarray(_as_rgb_array(image), "RGB")
    transform_size, reference_size = resolve_sizes(output_size, transform_size)
    quad = np.array(quad, dtype=np.float64)
    qsize = quad_size(quad)

    # Shrink big faces first so the bilinear transform below never undersamples.
    shrink = int(np.floor(qsize / reference_size * 0.5))
    if shrink > 1:
        size = (int(np.rint(image.width / shrink)), int(np.rint(image.height / shrink)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        quad /= shrink
        qsize /= shrink

    # Crop to the square plus a border, to keep padding and transform cheap.
    border = max(int(np.rint(qsize * 0.1)), 3)
    left, top, right, bottom = _bounds(quad)
    crop = (max(left - border, 0), max(top - border, 0), min(right + border, image.width), min(bottom + border, image.height))
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise ValueError(f"The face square {quad.tolist()} lies entirely outside the {image.width}x{image.height} image.")
    if crop[2] - crop[0] < image.width or crop[3] - crop[1] < image.height:
        image = image.crop(crop)
        quad -= crop[:2]

    # Pad where the square (plus border) leaves the photo.
    left, top, right, bottom = _bounds(quad)
    pad = np.array([max(border - left, 0), max(border - top, 0),
                    max(right - image.width + border, 0), max(bottom - image.height + border, 0)])
    if padding and pad.max() > border - 4:
        pad = np.maximum(pad, max(int(np.rint(qsize * 0.3)), 1))
        image = _pad_with_blur_and_median(image, pad, qsize)
        quad += pad[:2]

    # PIL's QUAD corners are continuous coordinates, where pixel centres sit at +0.5.
    image = image.transform(
        (transform_size, transform_size), Image.Transform.QUAD, (quad + 0.5).flatten(), Image.Resampling.BILINEAR
    )
    for size in (reference_size, output_size):
        if size < image.width:
            image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def align_face(
    image: Image.Image | np.ndarray,
    eye_left: Sequence[float],
    eye_right: Sequence[float],
    mouth_left: Sequence[float],
    mouth_right: Sequence[float],
    output_size: int = FFHQ_SIZE,
    transform_size: int | None = None,
    rotate: bool = True,
    padding: bool = True,
) -> AlignedFace:
    """FFHQ-align a face given its eye centres and mouth corners (from any detector: MTCNN,
    MediaPipe, InsightFace, ...), as (x, y) pixels of `image`. See `ffhq_quad` for which is left."""
    quad = ffhq_quad(eye_left, eye_right, mouth_left, mouth_right, rotate=rotate)
    return AlignedFace(warp_quad(image, quad, output_size, transform_size, padding), quad)


def align_face_68(image: Image.Image | np.ndarray, landmarks: Points, **kwargs) -> AlignedFace:
    """FFHQ-align a face from dlib's 68 landmarks; keyword arguments as for `align_face`."""
    return align_face(image, *eyes_and_mouth_from_68(landmarks), **kwargs)


# --------------------------------------------------------------------------- image files


@dataclass(frozen=True)
class AlignOptions:
    output_size: int = FFHQ_SIZE
    transform_size: int | None = None
    faces: str = "largest"  # "largest" or "all"
    min_face_size: float = 0.0  # smallest crop side (quad_size) in source pixels
    rotate: bool = True
    padding: bool = True
    detector: str = "hog"
    upsample: int = 1
    detection_threshold: float = 0.0

    def __post_init__(self):
        resolve_sizes(self.output_size, self.transform_size)
        if self.faces not in ("largest", "all"):
            raise ValueError(f"faces must be 'largest' or 'all', got {self.faces!r}.")
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {self.detector!r}.")


@dataclass
class ImageOutcome:
    """What happened to one source file; `records` are its manifest lines."""

    source: str
    status: str  # "aligned", "no_face", "too_small" (every face under min_face_size) or "failed"
    records: list[dict] = field(default_factory=list)
    faces_detected: int = 0
    faces_too_small: int = 0
    error: str | None = None


def select_faces(faces: list[DetectedFace], options: AlignOptions) -> tuple[list[tuple[DetectedFace, Points]], int]:
    """The faces to write with their quads, biggest first, and how many were too small."""
    with_quads = [(face, ffhq_quad(*eyes_and_mouth_from_68(face.landmarks), rotate=options.rotate)) for face in faces]
    with_quads.sort(key=lambda item: quad_size(item[1]), reverse=True)
    big_enough = [item for item in with_quads if quad_size(item[1]) >= options.min_face_size]
    too_small = len(with_quads) - len(big_enough)
    return (big_enough[:1] if options.faces == "largest" else big_enough), too_small


def _rounded(points: Points, decimals: int = 3) -> list[list[float]]:
    return np.round(np.asarray(points, dtype=np.float64), decimals).tolist()


def align_image_file(source: str | os.PathLike, output_stem: str, output_dir: str | os.PathLike,
                     options: AlignOptions) -> ImageOutcome:
    """Detect, align and write the faces of one file as `<output_stem>_<k>.png` under output_dir.

    Never raises for a bad file: unreadable images and errors come back as status "failed".
    """
    source = os.path.abspath(source)
    try:
        image = load_rgb_image(source)
        faces = detect_faces(image, options.detector, options.upsample, options.detection_threshold)
        chosen, too_small = select_faces(faces, options)
        status = "aligned" if chosen else ("too_small" if faces else "no_face")
        outcome = ImageOutcome(source, status, faces_detected=len(faces), faces_too_small=too_small)
        for k, (face, quad) in enumerate(chosen):
            aligned = warp_quad(image, quad, options.output_size, options.transform_size, options.padding)
            output = f"{output_stem}_{k}.png"
            path = Path(output_dir) / output  # output may name a subfolder (mirrors the input's)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image_atomically(aligned, path)
            outcome.records.append({
                "source": source,
                "output": output,
                "face_index": k,
                "source_size": [image.width, image.height],
                "box": list(face.box),
                "detection_score": round(face.score, 4),
                "landmarks": face.landmarks.tolist(),
                "quad": np.asarray(quad).tolist(),  # full precision: recreates the output exactly
                "output_landmarks": _rounded(aligned_coordinates(face.landmarks, quad, options.output_size)),
                "output_size": options.output_size,
                "transform_size": resolve_sizes(options.output_size, options.transform_size)[0],
                "rotate": options.rotate,
                "padding": options.padding,
                "detector": options.detector,
            })
        return outcome
    except Exception as error:  # one bad photo must not stop a run over thousands
        return ImageOutcome(source, "failed", error=f"{type(error).__name__}: {error}")


def plan_output_stems(files: Iterable[str | os.PathLike]) -> dict[str, str]:
    """Output stem (relative, POSIX) for each source, keyed by absolute source path.

    The output tree mirrors the input tree below the sources' common folder, so equal names in
    different folders stay apart; equal stems in one folder (a.jpg, a.png) get the extension added.
    """
    sources = sorted({os.path.abspath(f) for f in files})
    if not sources:
        return {}
    common = os.path.commonpath([os.path.dirname(s) for s in sources])
    stems = {s: Path(os.path.relpath(s, common)).with_suffix("").as_posix() for s in sources}
    counts = Counter(stems.values())
    return {
        s: (f"{stem}_{Path(s).suffix.lstrip('.').lower()}" if counts[stem] > 1 else stem)
        for s, stem in stems.items()
    }


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Records of a manifest; a last line cut short by an interrupted run is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def write_manifest(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Replace a manifest atomically."""
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(partial, path)


def finished_sources(records: Iterable[dict], output_dir: str | os.PathLike) -> set[str]:
    """Sources whose every recorded output file exists: an interrupted run skips them."""
    complete: dict[str, bool] = {}
    for record in records:
        exists = (Path(output_dir) / record["output"]).is_file()
        complete[record["source"]] = complete.get(record["source"], True) and exists
    return {source for source, ok in complete.items() if ok}


def _load_models(detector: str) -> None:
    """Pool initializer: each worker process loads its own dlib models once."""
    landmark_predictor()
    face_detector(detector)


def _align_task(task: tuple[str, str], output_dir: str, options: AlignOptions) -> ImageOutcome:
    source, output_stem = task
    return align_image_file(source, output_stem, output_dir, options)


def align_files(
    tasks: Sequence[tuple[str, str]], output_dir: str | os.PathLike, options: AlignOptions, num_workers: int = 1
) -> Iterable[ImageOutcome]:
    """Align (source, output_stem) pairs, yielding outcomes as they finish (in any order)."""
    work = functools.partial(_align_task, output_dir=str(output_dir), options=options)
    if num_workers <= 1 or len(tasks) <= 1:
        _load_models(options.detector)
        yield from map(work, tasks)
        return
    import multiprocessing

    # spawn: workers start clean whatever the caller has initialised (threads, CUDA, torch).
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(num_workers, len(tasks)), initializer=_load_models, initargs=(options.detector,)) as pool:
        yield from pool.imap_unordered(work, tasks, chunksize=1)
