"""FID and KID of samples against a reference preprocessed like training.

FID/KID numbers are only comparable with published ones (LDM: FID 4.98 on FFHQ 256) when the
reference images go through the same resize and crop as the training images did; people who
resize the reference differently do not reproduce them (CompVis/latent-diffusion issues #138,
#213, #253, #263). So the reference is one of `uldm.data`'s training data sets (a folder or a
`datasets` data set) read through its own `Preprocessing`, and its features are cached under a
key that includes that preprocessing and the feature extractor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from ..data import HFImageDataset, ImageDataset, ImageFolderDataset, Preprocessing, load_hf_dataset, stable_random
from ..errors import InputError
from ..images import list_image_files, load_rgb_image
from ..saving import save_safetensors_atomically

# Bump when the reference preprocessing changes, so that old feature caches are not reused.
PREPROCESSING_VERSION = 2

# ---------------------------------------------------------------------------------------------
# Reference and sample images
# ---------------------------------------------------------------------------------------------


def reference_folder(folder: str | os.PathLike, resolution: int, center_crop: bool = True, seed: int = 0) -> ImageFolderDataset:
    """The images under `folder` (searched recursively) as a training data set would read them."""
    paths = list_image_files(folder)
    if not paths:
        raise InputError(f"No image files found under {folder}.")
    return ImageFolderDataset(paths, Path(folder), Preprocessing(resolution, center_crop), seed)


def reference_dataset(name: str, resolution: int, center_crop: bool = True, seed: int = 0,
                      config_name: str | None = None, split: str = "train", image_column: str = "image",
                      cache_dir: str | None = None) -> HFImageDataset:
    """A hub data set, a local folder (imagefolder or parquet files) or one .parquet file, read like training."""
    import datasets

    dataset = load_hf_dataset(name, config_name, cache_dir, split)
    if image_column not in dataset.column_names:
        raise InputError(
            f"The reference data set has no column {image_column!r}; its columns are "
            f"{dataset.column_names}. Pass the right one with --image_column."
        )
    if not isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image())
    return HFImageDataset(dataset, image_column, Preprocessing(resolution, center_crop), seed)


class ReferenceImages(Dataset):
    """A training data set's images after its preprocessing, as 3xRxR uint8 tensors (what the FID/KID
    feature extractors take). Random crops (center_crop=False) are those of the data set's first epoch."""

    def __init__(self, images: ImageDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        preprocessing = self.images.preprocessing
        rng = None if preprocessing.center_crop else stable_random(self.images.seed, 0, index)
        return pil_to_tensor(preprocessing.resize_and_crop(self.images.load_image(index), rng))

    def fingerprint(self) -> dict[str, Any]:
        preprocessing = {"version": PREPROCESSING_VERSION, "preprocessing": self.images.preprocessing.key()}
        if not self.images.preprocessing.center_crop:
            preprocessing["seed"] = self.images.seed
        return {"source": self.images.fingerprint(), "count": len(self.images), "preprocessing": preprocessing}


class SampleImages(Dataset):
    """Generated samples as 3xRxR uint8 tensors; they are used as they are, never resized."""

    def __init__(self, paths: Sequence[str | os.PathLike], resolution: int | None = None):
        self.paths = [Path(path) for path in paths]
        if not self.paths:
            raise InputError("No sample images were given.")
        self.resolution = resolution if resolution is not None else self._load(0).width

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, resolution: int | None = None) -> "SampleImages":
        paths = list_image_files(folder)
        if not paths:
            raise InputError(f"No image files found under {folder}.")
        return cls(paths, resolution)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> Image.Image:
        return load_rgb_image(self.paths[index])

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._load(index)
        if image.size != (self.resolution, self.resolution):
            raise InputError(
                f"Sample {self.paths[index]} is {image.width}x{image.height}, but the evaluation "
                f"resolution is {self.resolution}x{self.resolution}. Samples are not resized; pass "
                f"--resolution equal to the samples' size (the reference is resized to it)."
            )
        return pil_to_tensor(image)


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


class InceptionWeightsMissing(InputError, FileNotFoundError):
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


class RandomConvFeatures(nn.Module):
    """A fixed random convolutional network as a cheap, offline FID/KID feature extractor.

    Its weights are drawn from a fixed seed (the same on every machine, whatever torch's global
    random state), so it needs no file and no download. Random embeddings follow the fidelity and
    diversity of generated images (Naeem et al. 2020, arXiv 2002.09797, used random VGG features),
    which makes it good for watching a model improve; its numbers are comparable only with others
    from the same extractor, never with published FIDs (those use the FID Inception).

    Images (N x 3 x H x W uint8, any size) are resized to `size` px; the features (`num_features`)
    are the last layer's activations pooled to 2x2 (where things are) plus every layer's mean (what
    colours and textures occur)."""

    widths = (32, 64, 64)

    def __init__(self, seed: int = 0, size: int = 64):
        super().__init__()
        self.seed, self.size = seed, size
        generator = torch.Generator().manual_seed(seed)
        layers, channels = [], 3
        for width in self.widths:
            conv = nn.Conv2d(channels, width, 3, stride=2, padding=1)
            with torch.no_grad():  # He initialisation: activations keep their scale through the layers
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / (9 * channels)))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
            layers.append(conv)
            channels = width
        self.layers = nn.ModuleList(layers)
        self.num_features = 4 * self.widths[-1] + sum(self.widths)
        self.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, size={self.size}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        features: list[torch.Tensor] = []
        for layer in self.layers:
            x = torch.relu(layer(x))
            features.append(x.mean(dim=(2, 3)))
        features.insert(0, F.adaptive_avg_pool2d(x, 2).flatten(1))
        return torch.cat(features, dim=1)


# --fid_feature_extractor values besides a TorchScript file
FEATURE_EXTRACTORS = ("inception", "random-conv")
RANDOM_FEATURES_CAVEAT = (
    "FID/KID use a fixed random convolutional network (--fid_feature_extractor random-conv): good for "
    "following a run and comparing runs scored the same way, but not comparable with published FIDs, which "
    "use the FID Inception (--fid_feature_extractor inception --inception_weights FILE)."
)


def build_feature_extractor(name_or_path: str = "inception", inception_weights: str | os.PathLike | None = None) -> nn.Module:
    """The FID/KID feature extractor named on the command line: "inception" (the FID Inception, from
    `inception_weights` or the torch.hub cache), "random-conv" (`RandomConvFeatures`, offline) or a
    TorchScript file (`torch.jit.save` of a module mapping N x 3 x H x W uint8 images to N x D features)."""
    if name_or_path == "inception":
        return build_inception_feature_extractor(inception_weights)
    if name_or_path == "random-conv":
        return RandomConvFeatures()
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise InputError(
            f"--fid_feature_extractor {name_or_path}: give one of {', '.join(FEATURE_EXTRACTORS)} or a TorchScript "
            "file (torch.jit.save of a module that maps N x 3 x H x W uint8 images to N x D features)."
        )
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as error:
        raise InputError(f"--fid_feature_extractor {path} is not a TorchScript file that torch.jit.load reads: "
                         f"{str(error).strip().splitlines()[0]}") from error


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
    progress: bool = True,
) -> torch.Tensor:
    """Features (N x D, float32, on the CPU) of a data set of 3xHxW uint8 tensors."""
    device = torch.device(device)
    feature_extractor = feature_extractor.to(device).eval()
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        features = feature_extractor(batch.to(device, non_blocking=True))
        chunks.append(features.reshape(batch.shape[0], -1).float().cpu())
    return torch.cat(chunks)


def reference_cache_key(reference: ReferenceImages, feature_extractor: nn.Module) -> tuple[str, dict[str, Any]]:
    description = {"reference": reference.fingerprint(), "feature_extractor": feature_extractor_fingerprint(feature_extractor)}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
    return key, description


def reference_cache_path(reference: ReferenceImages, feature_extractor: nn.Module,
                         cache_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Where the reference's features are cached (keyed by the reference and the extractor), and the key's
    description (stored with the features)."""
    key, description = reference_cache_key(reference, feature_extractor)
    return Path(cache_dir) / f"reference-{key}.safetensors", description


def save_reference_features(path: str | os.PathLike, features: torch.Tensor, description: dict[str, Any]) -> None:
    """Written atomically, so an interrupted run never leaves a half file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomically({"features": features.contiguous()}, path,
                                {"description": json.dumps(description, sort_keys=True)})


def load_cached_features(path: str | os.PathLike) -> torch.Tensor:
    """The features of a file written by `save_reference_features`."""
    from safetensors.torch import load_file

    return load_file(path)["features"]


def load_stored_features(path: str | os.PathLike, feature_extractor: nn.Module) -> torch.Tensor:
    """Reference features stored by the cache (a reference-*.safetensors file, e.g. of an earlier run or of
    evaluate.py --reference_stats_cache), refused unless they come from the same feature extractor."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            features = handle.get_tensor("features")
    except Exception as error:  # safetensors raises its own error types
        raise InputError(f"{path} is not a features file of the reference cache (reference-*.safetensors): "
                         f"{error}") from error
    stored = json.loads(metadata.get("description", "{}")).get("feature_extractor")
    if stored != feature_extractor_fingerprint(feature_extractor):
        raise InputError(f"The features in {path} were extracted by another feature extractor than this run's "
                         "(--fid_feature_extractor / --inception_weights); FID against them would mean nothing. "
                         "Give the reference images instead, or the features file of the same extractor.")
    return features


def reference_features(
    reference: ReferenceImages,
    feature_extractor: nn.Module,
    cache_dir: str | os.PathLike | None = None,
    **extract_kwargs: Any,
) -> tuple[torch.Tensor, bool]:
    """Features of the reference, read from `cache_dir` when present there. Returns (features, cache hit)."""
    if cache_dir is None:
        return extract_features(reference, feature_extractor, desc="reference features", **extract_kwargs), False
    cache_path, description = reference_cache_path(reference, feature_extractor, cache_dir)
    if cache_path.is_file():
        return load_cached_features(cache_path), True
    features = extract_features(reference, feature_extractor, desc="reference features", **extract_kwargs)
    save_reference_features(cache_path, features, description)
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
    # sync_on_compute=False: the features are complete here; in a multi-process run only the main process
    # computes, and torchmetrics' default all-gather would wait for the others forever.
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real.shape[1]), sync_on_compute=False).to(device)
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
        metric = KernelInceptionDistance(feature=_PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=subset_size, sync_on_compute=False)
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
