"""Sample evaluation: FID and KID against a reference preprocessed like training, and identity.

FID/KID numbers are only comparable with published ones (LDM: FID 4.98 on FFHQ 256) when the
reference images go through the same resize and crop as the training images did; people who
resize the reference differently do not reproduce them (CompVis/latent-diffusion issues #138,
#213, #253, #263). So the reference always goes through `preprocess_like_training`, and its
Inception features are cached under a key that includes that preprocessing.

Identity similarity for fine-tuned face models uses dlib's 128-D face descriptor, whose
Euclidean distance is usually below 0.6 for two photos of the same person.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from uldm.data import Preprocessing, load_hf_dataset
from uldm.face_align import LANDMARK_MODEL, face_detector, face_model_path, landmark_predictor
from uldm.images import list_image_files, load_rgb_image, to_rgb

# Bump when the reference preprocessing changes, so that old feature caches are not reused.
PREPROCESSING_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Reference preprocessing
# ---------------------------------------------------------------------------------------------


def preprocess_like_training(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """The training preprocessing itself (`uldm.data.Preprocessing`), as a PIL image.

    `image` is 8-bit RGB (see `uldm.images.to_rgb`). With `center_crop=False` the crop is
    random, as in training without --center_crop; pass a seeded `rng` for reproducible crops.
    """
    return Preprocessing(resolution, center_crop).resize_and_crop(image, rng)


# ---------------------------------------------------------------------------------------------
# Image sources
# ---------------------------------------------------------------------------------------------


class ImageFiles:
    """Image files as RGB PIL images, with a fingerprint of the file list for caching."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [Path(path) for path in paths]

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ImageFiles":
        paths = list_image_files(folder)
        if not paths:
            raise FileNotFoundError(f"No image files found under {folder}.")
        return cls(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return load_rgb_image(self.paths[index])

    def fingerprint(self) -> dict[str, Any]:
        # Size and modification time stand in for the content: hashing 70k images would cost
        # as much as extracting their features.
        digest = hashlib.sha256()
        for path in self.paths:
            stat = path.stat()
            digest.update(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return {"kind": "files", "count": len(self.paths), "files_sha256": digest.hexdigest()}


class DatasetColumnImages:
    """One image column of a `datasets.Dataset` as RGB PIL images."""

    def __init__(self, dataset: Any, image_column: str = "image"):
        if image_column not in dataset.column_names:
            raise ValueError(
                f"The reference data set has no column {image_column!r}; its columns are "
                f"{dataset.column_names}. Pass the right one with --image_column."
            )
        self.dataset = dataset
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Image.Image:
        return to_rgb(self.dataset[index][self.image_column])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "datasets",
            "count": len(self.dataset),
            "dataset_fingerprint": self.dataset._fingerprint,
            "image_column": self.image_column,
        }


def load_reference_dataset(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    image_column: str = "image",
    cache_dir: str | None = None,
) -> DatasetColumnImages:
    """A hub data set, a local folder (imagefolder or parquet files) or one .parquet file."""
    import datasets

    dataset = load_hf_dataset(name, config_name, cache_dir, split)
    if image_column in dataset.column_names and not isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image())
    return DatasetColumnImages(dataset, image_column)


class ReferenceImages(Dataset):
    """Reference images preprocessed like training, as 3xRxR uint8 tensors."""

    def __init__(self, images: ImageFiles | DatasetColumnImages, resolution: int, center_crop: bool = True, seed: int = 0):
        self.images = images
        self.resolution = resolution
        self.center_crop = center_crop
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        # One generator per image: the same crops whatever the number of workers.
        rng = None if self.center_crop else np.random.default_rng([self.seed, index])
        image = preprocess_like_training(self.images[index], self.resolution, self.center_crop, rng)
        return pil_to_tensor(image)  # 3xHxW uint8, what the FID/KID feature extractors expect

    def fingerprint(self) -> dict[str, Any]:
        preprocessing = {
            "function": "preprocess_like_training",
            "version": PREPROCESSING_VERSION,
            "resolution": self.resolution,
            "center_crop": self.center_crop,
        }
        if not self.center_crop:
            preprocessing["seed"] = self.seed
        return {"source": self.images.fingerprint(), "preprocessing": preprocessing}


class SampleImages(Dataset):
    """Generated samples as 3xRxR uint8 tensors; they are used as they are, never resized."""

    def __init__(self, paths: Sequence[str | os.PathLike], resolution: int | None = None):
        self.files = ImageFiles(paths)
        if not len(self.files):
            raise FileNotFoundError("No sample images were given.")
        self.resolution = resolution if resolution is not None else self.files[0].width

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, resolution: int | None = None) -> "SampleImages":
        return cls(ImageFiles.from_folder(folder).paths, resolution)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.files[index]
        if image.size != (self.resolution, self.resolution):
            raise ValueError(
                f"Sample {self.files.paths[index]} is {image.width}x{image.height}, but the evaluation "
                f"resolution is {self.resolution}x{self.resolution}. Samples are not resized; pass "
                f"--resolution equal to the samples' size (the reference is resized to it)."
            )
        return pil_to_tensor(image)  # 3xHxW uint8, what the FID/KID feature extractors expect


# ---------------------------------------------------------------------------------------------
# Inception weights and the feature extractor
# ---------------------------------------------------------------------------------------------

# The FID Inception (TensorFlow graph of 2015-12-05) converted to PyTorch by torch-fidelity;
# torchmetrics downloads the same file. pytorch-fid's pt_inception-2015-12-05-6726825d.pth has
# the same state-dict keys and shapes and loads too.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILENAMES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)
_DOWNLOAD_TIMEOUT_S = 60


class InceptionWeightsMissing(FileNotFoundError):
    """The FID Inception weights are neither given, nor cached, nor downloadable."""


def inception_weights_cache_path() -> Path:
    """Where torch.hub (and so torchmetrics/torch-fidelity) keeps the downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAMES[0]


def _inception_weights_help() -> str:
    return (
        "FID/KID need the FID Inception weights, which no package ships. On a machine "
        f"with internet access download\n  {INCEPTION_WEIGHTS_URL}\n"
        "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth works too), copy it here and pass "
        "--inception_weights /path/to/weights-inception-2015-12-05-6726825d.pth, or put it at "
        f"{inception_weights_cache_path()} where it is found automatically."
    )


def is_offline() -> bool:
    """True when the user asked for no network (Hugging Face's HF_HUB_OFFLINE or ULDM_OFFLINE)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "ULDM_OFFLINE"))


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's download has no timeout of its own and would hang on a silent firewall.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def resolve_inception_weights(path: str | os.PathLike | None = None, allow_download: bool | None = None) -> Path:
    """The local FID Inception weights file: `path`, else the torch.hub cache, else downloaded.

    Downloads only when `allow_download` (default: not `is_offline()`); raises
    `InceptionWeightsMissing` with instructions otherwise or when the download fails.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InceptionWeightsMissing(f"--inception_weights {path} does not exist.\n" + _inception_weights_help())
        return path
    for name in INCEPTION_WEIGHTS_FILENAMES:
        cached = inception_weights_cache_path().with_name(name)
        if cached.is_file():
            return cached
    if allow_download is None:
        allow_download = not is_offline()
    if not allow_download:
        raise InceptionWeightsMissing("No FID Inception weights found and downloads are off.\n" + _inception_weights_help())
    target = inception_weights_cache_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(target), progress=True)
    except OSError as error:  # URLError, HTTPError and timeouts are all OSErrors
        raise InceptionWeightsMissing(f"Downloading the FID Inception weights failed ({error}).\n" + _inception_weights_help()) from error
    return target


def build_inception_feature_extractor(
    weights_path: str | os.PathLike | None = None, feature_dim: int = 2048, antialias: bool = False
) -> nn.Module:
    """torchmetrics' FID Inception (torch-fidelity's network) loaded from a local weights file.

    `antialias=False` keeps torch-fidelity's TensorFlow-1-compatible resize to 299 px, as in the
    original FID code, so numbers stay comparable with published ones (torchmetrics' default,
    antialias=True, differs for images larger than 299 px).
    """
    weights = resolve_inception_weights(weights_path)  # before the slow torchmetrics import: fail fast
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(feature_dim)],
        feature_extractor_weights_path=str(weights),
        antialias=antialias,
    )


def feature_extractor_fingerprint(module: nn.Module) -> str:
    """A hash of the extractor's class, settings and weights: part of the reference cache key."""
    digest = hashlib.sha256()
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}\n".encode())
    for attribute in ("features_list", "use_antialias", "INPUT_IMAGE_SIZE", "num_features"):
        if hasattr(module, attribute):
            digest.update(f"{attribute}={getattr(module, attribute)!r}\n".encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Features, their cache, FID and KID
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    images: Dataset,
    feature_extractor: nn.Module,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> torch.Tensor:
    """Features (N x D, float32, on the CPU) of a data set of 3xHxW uint8 tensors."""
    device = torch.device(device)
    feature_extractor = feature_extractor.to(device).eval()
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks = []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        features = feature_extractor(batch.to(device, non_blocking=True))
        chunks.append(features.reshape(batch.shape[0], -1).float().cpu())
    return torch.cat(chunks)


def reference_cache_key(reference: ReferenceImages, feature_extractor: nn.Module) -> tuple[str, dict[str, Any]]:
    description = {"reference": reference.fingerprint(), "feature_extractor": feature_extractor_fingerprint(feature_extractor)}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
    return key, description


def reference_features(
    reference: ReferenceImages,
    feature_extractor: nn.Module,
    cache_dir: str | os.PathLike | None = None,
    **extract_kwargs: Any,
) -> tuple[torch.Tensor, bool]:
    """Features of the reference, read from `cache_dir` when present there. Returns (features, cache hit)."""
    from safetensors.torch import load_file, save_file

    if cache_dir is None:
        return extract_features(reference, feature_extractor, desc="reference features", **extract_kwargs), False
    key, description = reference_cache_key(reference, feature_extractor)
    cache_path = Path(cache_dir) / f"reference-{key}.safetensors"
    if cache_path.is_file():
        return load_file(cache_path)["features"], True
    features = extract_features(reference, feature_extractor, desc="reference features", **extract_kwargs)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted run never leaves a half file.
    partial = cache_path.with_suffix(f".partial-{os.getpid()}")
    save_file({"features": features.contiguous()}, partial, metadata={"description": json.dumps(description, sort_keys=True)})
    os.replace(partial, cache_path)
    return features, False


class _PrecomputedFeatures(nn.Module):
    """Lets torchmetrics' FID/KID run on features that were extracted (or cached) already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _metric_device(device: str | torch.device) -> torch.device:
    # The statistics are float64, which MPS lacks; on CUDA they save minutes over 2048-D features.
    device = torch.device(device)
    return device if device.type == "cuda" else torch.device("cpu")


def fid_from_features(real: torch.Tensor, fake: torch.Tensor, device: str | torch.device = "cpu") -> float:
    """torchmetrics' FID of two feature sets (N x D). For D=2048 it takes a while on a small CPU."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images on each side (reference: {len(real)}, samples: {len(fake)}).")
    device = _metric_device(device)
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real.shape[1])).to(device)
    metric.update(real.to(device), real=True)
    metric.update(fake.to(device), real=False)
    return float(metric.compute())


def kid_from_features(
    real: torch.Tensor,
    fake: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[float, float, int]:
    """KID mean and std over random subsets; returns (mean, std, subset size used).

    The subset size is capped by the smaller set (KID is unbiased, only its spread grows).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(subset_size, len(real), len(fake))
    if subset_size < 2:
        raise ValueError(f"KID needs at least 2 images on each side (reference: {len(real)}, samples: {len(fake)}).")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=subset_size)
    device = _metric_device(device)
    metric.update(real.to(device), real=True)
    metric.update(fake.to(device), real=False)
    # KID draws its subsets from torch's global generator: fork it so the result is repeatable.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), subset_size


def compute_fid_kid(
    samples: Dataset,
    reference: ReferenceImages,
    feature_extractor: nn.Module,
    cache_dir: str | os.PathLike | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> dict[str, Any]:
    """FID and KID of `samples` against `reference` (its features cached in `cache_dir`)."""
    extract_kwargs = dict(batch_size=batch_size, device=device, num_workers=num_workers)
    real, cache_hit = reference_features(reference, feature_extractor, cache_dir, **extract_kwargs)
    fake = extract_features(samples, feature_extractor, desc="sample features", **extract_kwargs)
    kid_mean, kid_std, used_subset_size = kid_from_features(real, fake, kid_subsets, kid_subset_size, seed, device)
    return {
        "fid": fid_from_features(real, fake, device),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subsets": kid_subsets,
        "kid_subset_size": used_subset_size,
        "num_samples": len(fake),
        "num_reference": len(real),
        "reference_cache_hit": cache_hit,
    }


# ---------------------------------------------------------------------------------------------
# Identity similarity (dlib face descriptors)
# ---------------------------------------------------------------------------------------------

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


def mean_pairwise_distance(descriptors: np.ndarray) -> float | None:
    if len(descriptors) < 2:
        return None
    distances = np.linalg.norm(descriptors[:, None, :] - descriptors[None, :, :], axis=-1)
    return float(distances[np.triu_indices(len(descriptors), k=1)].mean())


def identity_scores(
    sample_descriptors: Sequence[np.ndarray | None],
    instance_descriptors: np.ndarray,
    threshold: float = SAME_PERSON_DISTANCE,
) -> dict[str, Any]:
    """How well samples keep the subject's identity, from dlib descriptors.

    Each sample's distance is measured to the mean of the instance descriptors: unlike the
    distance to the nearest instance photo it does not shrink as more instance photos are given,
    and it does not reward copying one training photo. (The nearest-photo distance is reported
    as well.) Rates are over all samples: a sample without a detectable face is not a match.
    """
    instance_descriptors = np.asarray(instance_descriptors, dtype=np.float32)
    if instance_descriptors.ndim != 2 or len(instance_descriptors) == 0:
        raise ValueError("No face was found in any instance photo: identity cannot be measured.")
    if not sample_descriptors:
        raise ValueError("No samples to score.")
    centroid = instance_descriptors.mean(axis=0)
    with_face = [d for d in sample_descriptors if d is not None]
    faces = np.stack(with_face) if with_face else np.zeros((0, 128), np.float32)
    to_centroid = np.linalg.norm(faces - centroid, axis=1)
    to_nearest = np.linalg.norm(faces[:, None, :] - instance_descriptors[None, :, :], axis=-1).min(axis=1, initial=np.inf)
    distances: list[float | None] = []
    remaining = iter(to_centroid.tolist())
    for descriptor in sample_descriptors:
        distances.append(None if descriptor is None else next(remaining))
    count = len(sample_descriptors)
    return {
        "num_samples": count,
        "num_instance_faces": len(instance_descriptors),
        "threshold": threshold,
        "same_person_rate": float((to_centroid < threshold).sum() / count),
        "no_face_rate": float((count - len(faces)) / count),
        "mean_distance": float(to_centroid.mean()) if len(faces) else None,
        "mean_nearest_instance_distance": float(to_nearest.mean()) if len(faces) else None,
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
