"""Subject fidelity as the DreamBooth paper measures it (Ruiz et al. 2022, arXiv 2208.12242, Sec. 4.1).

- DINO: the mean cosine similarity between the ViT-S/16 DINO embeddings of every generated
  sample and every real instance photo (all N x M pairs). DINO is self-supervised and not
  trained to ignore the differences between two members of a class, so it rewards the
  subject's own features more than CLIP does; the paper prefers it for that reason.
- CLIP-I: the same mean with CLIP image embeddings.
- Diversity (DIV): 1 - the mean cosine similarity between two different samples, in the same
  embedding space. The paper computes DIV with LPIPS; LPIPS needs ImageNet AlexNet/VGG weights
  that no package ships (a download at run time), while the DINO model is already loaded and
  its embedding changes with pose, background and lighting, so 1 - cosine of DINO embeddings is
  the diversity reported here (and the CLIP one next to it). It is not numerically comparable
  with the paper's LPIPS DIV; compare runs with each other.
- The same means over the instance photos among themselves (the paper's "Real Images" row):
  the score a model that reproduced the photos perfectly would get, a ceiling to read the
  sample scores against.

Embeddings: the final-layer-norm CLS token for DINO (`ViTModel`, v1, e.g. facebook/dino-vits16)
and DINOv2 (`Dinov2Model`, e.g. facebook/dinov2-small), as their own repositories return it; the
projected image embedding for CLIP (`CLIPVisionModelWithProjection`; a full `CLIPModel` folder
such as openai/clip-vit-large-patch14 loads too). Images are preprocessed by the image
processor saved with the model; a folder without one gets the model family's documented
preprocessing. Every image is first centre-cropped to a square (samples are square; this is
how DreamBooth training with --center_crop sees the photos) and quantised to 8 bits, so an
image scores the same whether it comes from memory or from the PNG it is saved as.

Models load from a local folder or a hub id and stay cached per process (by name, device and
dtype), so scoring every N training steps loads them once.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import InputError
from ..images import load_rgb_image, to_rgb

DINO_MODEL = "facebook/dino-vits16"  # the paper's ViT-S/16 DINO
CLIP_MODEL = "openai/clip-vit-large-patch14"
# Metric names of `subject_fidelity`, and the model family each needs.
METRIC_FAMILIES = {"dino": "dino", "clip_i": "clip"}

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
Images = Union[Sequence[ImageLike], np.ndarray, torch.Tensor]

# transformers model_type -> family. The model_type decides the model class and the fallback
# preprocessing, the family the embedding and which score may use it.
_MODEL_TYPES = {
    "vit": "dino",
    "dinov2": "dino",
    "clip": "clip",
    "clip_vision_model": "clip",
}


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(eq=False)
class ImageEncoder:
    """An image model in eval mode on its device, the preprocessing that goes with it, and
    `embed` to turn images into L2-normalised float32 embeddings (on the CPU)."""

    name: str
    model_type: str  # transformers' model_type of the folder: vit, dinov2, clip, clip_vision_model
    model: nn.Module
    processor: Any  # a transformers image processor
    device: torch.device
    dtype: torch.dtype = torch.float32

    @property
    def family(self) -> str:
        return _MODEL_TYPES[self.model_type]

    @torch.no_grad()
    def embed(self, images: Images, batch_size: int = 32) -> torch.Tensor:
        """N x D unit vectors, in the order of `images`; files are read one batch at a time."""
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}.")
        chunks = [self._embed_batch(batch) for batch in uint8_image_batches(images, batch_size)]
        if not chunks:
            raise InputError("No images to embed.")
        return torch.cat(chunks)

    def _embed_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        pixel_values = self.processor(images, return_tensors="pt")["pixel_values"]
        # In the encoder's own dtype whatever the caller's autocast (validation runs inside one).
        with torch.autocast(self.device.type, enabled=False):
            output = self.model(pixel_values=pixel_values.to(self.device, self.dtype))
        if self.family == "clip":
            features = output.image_embeds
        else:
            features = output.last_hidden_state[:, 0]  # CLS token after the final layer norm
        return F.normalize(features.float(), dim=-1).cpu()


def download_hint(name: str) -> str:
    return (f"On a machine with internet, download it with `hf download {name} --local-dir DIR` "
            "(pip install huggingface_hub) and pass DIR instead.")


def looks_like_local_path(name: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else (absolute, ./, ~, deeper) is meant as a folder."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or Path(name).exists())


def load_image_encoder(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """A DINO (ViTModel / Dinov2Model) or CLIP vision model from a local folder or a hub id.

    Cached per process: the same name, device and dtype give the same object.
    Raises InputError when the folder is missing, the hub id cannot be fetched (offline, unknown),
    the model is of another kind, or its folder lacks weights the embedding needs.
    """
    name = str(name_or_path)
    if looks_like_local_path(name):
        name = str(Path(name).expanduser().resolve())
    return _load_image_encoder_cached(name, str(torch.device(device)), dtype)


@functools.lru_cache(maxsize=8)
def _load_image_encoder_cached(name: str, device: str, dtype: torch.dtype) -> ImageEncoder:
    config = load_config(name)
    model = load_model(name, config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ImageEncoder(name, config.model_type, model, load_processor(name, config), torch.device(device), dtype)


def load_config(name: str):
    from transformers import AutoConfig

    if looks_like_local_path(name):
        folder = Path(name)
        if not folder.is_dir():
            raise InputError(f"Image encoder folder {folder} does not exist. Give a folder saved with "
                             f"save_pretrained or a hub id such as {DINO_MODEL} or {CLIP_MODEL}.")
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder} holds no config.json: it is not a transformers model folder. "
                             f"{download_hint(DINO_MODEL)}")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise InputError(f"Could not load the image encoder {name!r}: {first_line(error)} {download_hint(name)}") from error
    if config.model_type not in _MODEL_TYPES:
        raise InputError(f"{name} is a {config.model_type!r} model; subject similarity needs a DINO ViT (ViTModel, "
                         f"e.g. {DINO_MODEL}), a Dinov2Model (e.g. facebook/dinov2-small) or a CLIP model "
                         f"(e.g. {CLIP_MODEL}).")
    return config


def load_model(name: str, config) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection, Dinov2Model, ViTModel
    from transformers.utils import logging as transformers_logging

    if config.model_type == "vit":
        load, kwargs = ViTModel.from_pretrained, {"add_pooling_layer": False}  # DINO ships no pooler
    elif config.model_type == "dinov2":
        load, kwargs = Dinov2Model.from_pretrained, {}
    else:
        if config.model_type == "clip":
            # A full CLIPModel folder: its vision tower and projection. The projection width is a
            # top-level setting there, which the vision config alone would not know.
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
            config = vision_config
        load, kwargs = CLIPVisionModelWithProjection.from_pretrained, {"config": config}

    # transformers prints a load report (e.g. a CLIPModel's unused text tower); the checks below
    # decide what matters.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = load(name, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise InputError(f"Could not load the image encoder {name!r}: {first_line(error)} {download_hint(name)}") from error
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = sorted(set(info.get("missing_keys", ())) | {str(key) for key in info.get("mismatched_keys", ())})
    if missing:
        raise InputError(f"{name} lacks weights the embedding needs ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''}); scores would come from random weights. "
                         f"For CLIP give a folder with the visual projection (CLIPModel or "
                         f"CLIPVisionModelWithProjection, e.g. {CLIP_MODEL}).")
    return model


def load_processor(name: str, config):
    """The processor saved with the model, else the family's documented preprocessing."""
    from transformers import AutoImageProcessor

    if not looks_like_local_path(name) or (Path(name) / "preprocessor_config.json").is_file():
        try:
            return AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError):
            pass  # a folder or repository without a processor config
    return default_processor(config)


def default_processor(config):
    """What the hub repositories' processors do, for folders saved without one:
    DINO ViT (facebook/dino-vits16): resize to image_size, bilinear, ImageNet mean/std;
    DINOv2: shorter side 256, bicubic, centre crop 224, ImageNet mean/std;
    CLIP: shorter side image_size, bicubic, centre crop, CLIP mean/std."""
    from transformers import BitImageProcessor, CLIPImageProcessor, ViTImageProcessor
    from transformers.image_utils import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN,
                                          OPENAI_CLIP_STD, PILImageResampling)

    if config.model_type == "vit":
        size = config.image_size
        return ViTImageProcessor(size={"height": size, "width": size}, resample=PILImageResampling.BILINEAR,
                                 image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    if config.model_type == "dinov2":
        return BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                 resample=PILImageResampling.BICUBIC, do_center_crop=True,
                                 image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    size = (config.vision_config if config.model_type == "clip" else config).image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              resample=PILImageResampling.BICUBIC, do_center_crop=True,
                              image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------
# Images in, uint8 square tensors out


def uint8_image_batches(images: Images, batch_size: int) -> Iterator[list[torch.Tensor]]:
    """`images` as lists of 3 x S x S uint8 tensors (centre-cropped squares), `batch_size` at a time.

    Accepted: a sequence of file paths, PIL images or H x W x 3 arrays; or one N x H x W x 3 numpy
    array / torch tensor. Arrays are uint8, or float in [0, 1].
    """
    if isinstance(images, (np.ndarray, torch.Tensor)):
        check_image_array(images)
        for start in range(0, len(images), batch_size):
            yield list(centre_square(to_uint8(images[start:start + batch_size])).permute(0, 3, 1, 2))
        return
    for start in range(0, len(images), batch_size):
        yield [centre_square(image_to_uint8(image)).permute(2, 0, 1) for image in images[start:start + batch_size]]


def check_image_array(images: np.ndarray | torch.Tensor) -> None:
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (channels first? use x.permute(0, 2, 3, 1))" if len(shape) == 4 and shape[1] == 3 else ""
        raise InputError(f"Images as one array must be N x H x W x 3, got shape {shape}{hint}.")


def image_to_uint8(image: ImageLike) -> torch.Tensor:
    """One image as H x W x 3 uint8."""
    if isinstance(image, (str, os.PathLike)):
        image = load_rgb_image(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(to_rgb(image)))
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"An image array must be H x W x 3, got shape {tuple(image.shape)}.")
    return to_uint8(image)


def to_uint8(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 as it is; float in [0, 1] to the nearest 8-bit level (as saving a PNG does)."""
    pixels = torch.from_numpy(np.array(pixels)) if isinstance(pixels, np.ndarray) else pixels.detach().cpu()
    if pixels.dtype == torch.uint8:
        return pixels
    if not pixels.is_floating_point():
        raise InputError(f"Image arrays must be uint8 or float in [0, 1], got {pixels.dtype}.")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise InputError(f"Float images must be in [0, 1], got values from {low:.3f} to {high:.3f}; "
                         "pixel values in [-1, 1] become (x + 1) / 2.")
    return pixels.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)


def centre_square(pixels: torch.Tensor) -> torch.Tensor:
    """The largest centred square of ... x H x W x C pixels."""
    height, width = pixels.shape[-3:-1]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[..., top:top + side, left:left + side, :]


# --------------------------------------------------------------------------------------------
# Scores


def mean_cross_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j) of unit embeddings; symmetric in a and b."""
    return float((a.double() @ b.double().T).mean())


def mean_pairwise_similarity(embeddings: torch.Tensor) -> float | None:
    """Mean cosine similarity between two different members of one set; None for fewer than two."""
    count = len(embeddings)
    if count < 2:
        return None
    gram = embeddings.double() @ embeddings.double().T
    return float((gram.sum() - gram.diagonal().sum()) / (count * (count - 1)))


def diversity(embeddings: torch.Tensor) -> float | None:
    similarity = mean_pairwise_similarity(embeddings)
    return None if similarity is None else 1.0 - similarity


def as_encoder(encoder: ImageEncoder | str | os.PathLike, family: str | None = None,
               device: str | torch.device = "cpu") -> ImageEncoder:
    loaded = encoder if isinstance(encoder, ImageEncoder) else load_image_encoder(encoder, device)
    if family is not None and loaded.family != family:
        wanted = f"a DINO ViT (e.g. {DINO_MODEL})" if family == "dino" else f"a CLIP model (e.g. {CLIP_MODEL})"
        raise InputError(f"This score needs {wanted}; {loaded.name} is a {loaded.model_type!r} model.")
    return loaded


def dino_similarity(samples: Images, instance_photos: Images, encoder: ImageEncoder | str,
                    batch_size: int = 32) -> float:
    """The paper's DINO score: mean cosine similarity of every sample with every instance photo."""
    encoder = as_encoder(encoder, "dino")
    return mean_cross_similarity(encoder.embed(samples, batch_size), encoder.embed(instance_photos, batch_size))


def clip_i_similarity(samples: Images, instance_photos: Images, encoder: ImageEncoder | str,
                      batch_size: int = 32) -> float:
    """The paper's CLIP-I score: the same mean with CLIP image embeddings."""
    encoder = as_encoder(encoder, "clip")
    return mean_cross_similarity(encoder.embed(samples, batch_size), encoder.embed(instance_photos, batch_size))


def sample_diversity(samples: Images, encoder: ImageEncoder | str, batch_size: int = 32) -> float | None:
    """1 - mean cosine similarity between two different samples (0: one image repeated); None for < 2."""
    return diversity(as_encoder(encoder).embed(samples, batch_size))


@dataclass
class InstanceEmbeddings:
    """The instance photos embedded once by each encoder; `score` then only embeds the samples.
    Keys of `encoders` are metric names: "dino" and/or "clip_i"."""

    encoders: dict[str, ImageEncoder]
    embeddings: dict[str, torch.Tensor]
    batch_size: int = 32
    num_photos: int = field(init=False)

    def __post_init__(self):
        self.num_photos = len(next(iter(self.embeddings.values())))

    @classmethod
    def from_photos(cls, instance_photos: Images, encoders: Mapping[str, ImageEncoder | str | os.PathLike],
                    device: str | torch.device = "cpu", batch_size: int = 32) -> "InstanceEmbeddings":
        if not encoders:
            raise InputError("Subject similarity needs at least one encoder (a DINO and/or a CLIP model).")
        unknown = sorted(set(encoders) - set(METRIC_FAMILIES))
        if unknown:
            raise InputError(f"Unknown subject metric(s) {unknown}: use {sorted(METRIC_FAMILIES)}.")
        loaded = {metric: as_encoder(encoder, METRIC_FAMILIES[metric], device) for metric, encoder in encoders.items()}
        embedded = {metric: encoder.embed(instance_photos, batch_size) for metric, encoder in loaded.items()}
        return cls(loaded, embedded, batch_size)

    def score(self, samples: Images) -> dict[str, float | int | None]:
        """Per metric M: M (samples vs photos), div_M (between samples), instance_M (between photos)."""
        values: dict[str, float | int | None] = {}
        for metric, encoder in self.encoders.items():
            embedded = encoder.embed(samples, self.batch_size)
            values[metric] = mean_cross_similarity(embedded, self.embeddings[metric])
            values[f"div_{metric}"] = diversity(embedded)
            values[f"instance_{metric}"] = mean_pairwise_similarity(self.embeddings[metric])
        values["num_samples"] = len(embedded)
        values["num_instance_photos"] = self.num_photos
        return values


def subject_fidelity(samples: Images, instance_photos: Images,
                     encoders: Mapping[str, ImageEncoder | str | os.PathLike],
                     device: str | torch.device = "cpu", batch_size: int = 32) -> dict[str, float | int | None]:
    """DINO / CLIP-I of the samples against the instance photos, their diversity, and the photos'
    own similarity (the ceiling), e.g.

        subject_fidelity(samples, photos, {"dino": "facebook/dino-vits16", "clip_i": "openai/clip-vit-large-patch14"})
        -> {"dino": .., "div_dino": .., "instance_dino": .., "clip_i": .., "div_clip_i": .., "instance_clip_i": ..,
            "num_samples": N, "num_instance_photos": M}

    Values that need two images (div_*, instance_*) are None with one.
    """
    return InstanceEmbeddings.from_photos(instance_photos, encoders, device, batch_size).score(samples)


def summary_line(values: Mapping[str, Any]) -> str:
    """One line for a model card or log: 'DINO 0.612 (photos 0.770) · DIV 0.301 · CLIP-I ...'."""
    parts = []
    for metric, label in (("dino", "DINO"), ("clip_i", "CLIP-I")):
        if values.get(metric) is None:
            continue
        text = f"{label} {values[metric]:.3f}"
        if values.get(f"instance_{metric}") is not None:
            text += f" (photos among themselves {values[f'instance_{metric}']:.3f})"
        if values.get(f"div_{metric}") is not None:
            text += f", DIV {values[f'div_{metric}']:.3f}"
        parts.append(text)
    return "; ".join(parts)
