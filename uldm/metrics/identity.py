"""Identity similarity of face samples to a subject's photos, with dlib's 128-D face descriptor.

Two photos of the same person are usually within Euclidean distance 0.6 of each other (dlib's
threshold, defined for the distance between two descriptors).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .distances import mean_pairwise_distance, pairwise_distances
from ..face_align import LANDMARK_MODEL, face_detector, face_model_path, landmark_predictor
from ..images import load_rgb_image

SAME_PERSON_DISTANCE = 0.6
FACE_DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_PREDICTORS = {5: "shape_predictor_5_face_landmarks.dat", 68: "shape_predictor_68_face_landmarks.dat"}


@dataclass(frozen=True)
class FaceDescriptorModels:
    detector: Any
    shape_predictor: Any
    encoder: Any


@functools.lru_cache(maxsize=2)
def load_face_descriptor_models(landmarks: int = 5) -> FaceDescriptorModels:
    """dlib's HOG face detector, a 5- or 68-point shape predictor and the ResNet face encoder.

    Loaded once per process (DataLoader workers load their own copy).
    """
    import dlib

    if landmarks not in SHAPE_PREDICTORS:
        raise ValueError(f"landmarks must be 5 or 68, not {landmarks}.")
    model_file = SHAPE_PREDICTORS[landmarks]
    return FaceDescriptorModels(
        detector=face_detector("hog"),  # shared with face alignment (cached there)
        shape_predictor=(landmark_predictor() if model_file == LANDMARK_MODEL
                         else dlib.shape_predictor(str(face_model_path(model_file)))),
        encoder=dlib.face_recognition_model_v1(str(face_model_path(FACE_DESCRIPTOR_MODEL))),
    )


def face_descriptors(
    rgb_uint8_array: np.ndarray,
    max_faces: int | None = None,
    upsample_times: int = 1,
    num_jitters: int = 0,
    landmarks: int = 5,
) -> np.ndarray:
    """128-D descriptors of the faces found in an HxWx3 uint8 RGB image, most confident first.

    Returns an array of shape (faces, 128); (0, 128) when no face is found. Faces are ordered
    by detector score, not size: on busy photos the HOG detector also fires, weakly, on
    face-sized patterns.
    """
    image = np.ascontiguousarray(rgb_uint8_array)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"Expected an HxWx3 uint8 RGB array, got {image.dtype} of shape {image.shape}.")
    models = load_face_descriptor_models(landmarks)
    boxes, scores, _ = models.detector.run(image, upsample_times, 0.0)
    order = np.argsort(scores)[::-1][:max_faces]
    descriptors = [
        np.asarray(models.encoder.compute_face_descriptor(image, models.shape_predictor(image, boxes[i]), num_jitters))
        for i in order
    ]
    return np.stack(descriptors).astype(np.float32) if descriptors else np.zeros((0, 128), np.float32)


class MainFaceDescriptors(Dataset):
    """For each image file, the descriptor of its most confident face, (1, 128) or (0, 128)."""

    def __init__(self, paths: Sequence[str | os.PathLike], upsample_times: int = 1, num_jitters: int = 0, landmarks: int = 5):
        self.paths = [Path(path) for path in paths]
        self.options = dict(max_faces=1, upsample_times=upsample_times, num_jitters=num_jitters, landmarks=landmarks)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return face_descriptors(np.asarray(load_rgb_image(self.paths[index])), **self.options)


def main_face_descriptors(
    paths: Sequence[str | os.PathLike],
    batch_size: int = 16,
    num_workers: int = 0,
    desc: str = "faces",
    **face_options: Any,
) -> list[np.ndarray | None]:
    """The main face's descriptor per image (None where no face is found); workers run dlib in parallel."""
    loader = DataLoader(
        MainFaceDescriptors(paths, **face_options), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    found: list[np.ndarray | None] = []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        found.extend(descriptor[0] if len(descriptor) else None for descriptor in batch)
    return found


def identity_scores(
    sample_descriptors: Sequence[np.ndarray | None],
    instance_descriptors: np.ndarray,
    threshold: float = SAME_PERSON_DISTANCE,
) -> dict[str, Any]:
    """How well samples keep the subject's identity, from dlib descriptors.

    dlib's threshold is for the distance between two descriptors, so each sample is compared with the
    instance photos themselves: its distance is the mean of its distances to every instance photo, and it
    counts as the same person when that mean is below the threshold. (The distance to the centroid of the
    instance descriptors is always smaller: |x-c|^2 = mean|x-y_i|^2 - mean|y_i-c|^2, which inflated
    same-person rates.) The mean does not reward copying one photo; the distance to the nearest photo is
    reported as well. Rates are over all samples: a sample without a detectable face is not a match.
    """
    instance_descriptors = np.asarray(instance_descriptors, dtype=np.float32)
    if instance_descriptors.ndim != 2 or len(instance_descriptors) == 0:
        raise ValueError("No face was found in any instance photo: identity cannot be measured.")
    if not sample_descriptors:
        raise ValueError("No samples to score.")
    with_face = [d for d in sample_descriptors if d is not None]
    faces = np.stack(with_face) if with_face else np.zeros((0, 128), np.float32)
    to_photos = pairwise_distances(faces, instance_descriptors).numpy() if len(faces) else np.zeros((0, 1))
    mean_to_photos = to_photos.mean(axis=1)
    distances: list[float | None] = []
    remaining = iter(mean_to_photos.tolist())
    for descriptor in sample_descriptors:
        distances.append(None if descriptor is None else next(remaining))
    count = len(sample_descriptors)
    return {
        "num_samples": count,
        "num_instance_faces": len(instance_descriptors),
        "threshold": threshold,
        "same_person_rate": float((mean_to_photos < threshold).sum() / count),
        "no_face_rate": float((count - len(faces)) / count),
        "mean_distance": float(mean_to_photos.mean()) if len(faces) else None,
        "mean_nearest_instance_distance": float(to_photos.min(axis=1).mean()) if len(faces) else None,
        "sample_diversity": mean_pairwise_distance(faces),
        "instance_diversity": mean_pairwise_distance(instance_descriptors),
        "distances": distances,
    }


def compute_identity(
    sample_paths: Sequence[str | os.PathLike],
    instance_paths: Sequence[str | os.PathLike],
    batch_size: int = 16,
    num_workers: int = 0,
    **face_options: Any,
) -> dict[str, Any]:
    """Identity scores of sample files against the subject's photos (see `identity_scores`)."""
    if not instance_paths:
        raise FileNotFoundError("No instance photos given: --instance_data_dir must hold photos of the subject.")
    instance = main_face_descriptors(instance_paths, batch_size, num_workers, desc="instance faces", **face_options)
    missing = [str(path) for path, descriptor in zip(instance_paths, instance) if descriptor is None]
    if missing:
        warnings.warn(f"No face found in {len(missing)} instance photo(s), left out: {missing[:5]}")
    instance_found = [descriptor for descriptor in instance if descriptor is not None]
    if not instance_found:
        raise ValueError(f"No face was found in any of the {len(instance_paths)} instance photos.")
    samples = main_face_descriptors(sample_paths, batch_size, num_workers, desc="sample faces", **face_options)
    scores = identity_scores(samples, np.stack(instance_found))
    scores["per_sample"] = {str(path): distance for path, distance in zip(sample_paths, scores.pop("distances"))}
    return scores
