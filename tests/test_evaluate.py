"""evaluate.py, uldm/metrics/fid.py and uldm/metrics/identity.py: FID/KID with a tiny feature extractor, reference
preprocessing, the reference feature cache, dlib identity scores, and the missing-Inception-weights error.

Nothing is downloaded: FID/KID run on a fixed random conv net built here, and the face photos
come from scikit-image (the astronaut, LFW crops, the cat).
"""

from __future__ import annotations

import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import evaluate
from conftest import make_blob_images
from uldm.metrics import fid, identity
from uldm.data import Preprocessing


def preprocess_like_training(image: Image.Image, resolution: int, center_crop: bool = True, rng=None) -> Image.Image:
    """The training preprocessing, as the FID reference goes through it."""
    return Preprocessing(resolution, center_crop).resize_and_crop(image, rng)


class TinyFeatures(nn.Module):
    """Fixed random conv features of uint8 images (2x2 pooled, so layout matters); counts its inputs."""

    num_features = 32

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.2)
            self.conv.bias.zero_()
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8
        self.images_seen += images.shape[0]
        features = torch.relu(self.conv(images.float() / 127.5 - 1))
        return F.adaptive_avg_pool2d(features, 2).flatten(1)


def shifted_copies(source: Path, target: Path, offset=(60, 20, -30)) -> Path:
    """The same images with a colour shift."""
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int) + np.array(offset)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target / path.name)
    return target


def run_evaluate(samples: Path, reference: Path, extractor: nn.Module, *extra: str) -> dict:
    argv = ["--samples_dir", str(samples), "--reference_dir", str(reference), "--device", "cpu"]
    argv += ["--kid_subsets", "10", "--kid_subset_size", "32", "--batch_size", "16", *extra]
    return evaluate.main(argv, feature_extractor=extractor)["fid_kid"]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    make_blob_images(root / "a", 64, seed=1)
    make_blob_images(root / "b", 64, seed=2)  # same distribution, other draws
    shifted_copies(root / "a", root / "shifted")
    return root


# --------------------------------------------------------------------------------------------
# Reference preprocessing
# --------------------------------------------------------------------------------------------


def test_preprocess_resizes_shorter_side_then_crops_the_centre():
    # 32 wide, 64 high: red top quarter, green middle half, blue bottom quarter.
    pixels = np.zeros((64, 32, 3), np.uint8)
    pixels[:16, :, 0] = 255
    pixels[16:48, :, 1] = 255
    pixels[48:, :, 2] = 255
    out = np.asarray(preprocess_like_training(Image.fromarray(pixels), 16))
    assert out.shape == (16, 16, 3)
    # Shorter side 32 -> 16 (height 64 -> 32), then the middle 16 rows: the green band only.
    # A squashing resize would keep red and blue rows.
    assert (out[2:-2] == [0, 255, 0]).all()
    assert out[..., 0].max() < 80 and out[..., 2].max() < 80


def test_random_crops_are_reproducible_windows_of_the_resized_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((48, 32), Image.BILINEAR))  # shorter side 40 -> 32
    crops = [
        np.asarray(preprocess_like_training(image, 32, center_crop=False, rng=np.random.default_rng(seed)))
        for seed in range(6)
    ]
    again = np.asarray(preprocess_like_training(image, 32, center_crop=False, rng=np.random.default_rng(0)))
    assert np.array_equal(crops[0], again)
    offsets = set()
    for crop in crops:
        matches = [left for left in range(17) if np.abs(resized[:, left : left + 32].astype(int) - crop).max() <= 1]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1


# --------------------------------------------------------------------------------------------
# FID / KID
# --------------------------------------------------------------------------------------------


def test_fid_kid_near_zero_for_a_set_against_itself_and_large_against_a_shifted_set(blobs):
    extractor = TinyFeatures()
    same = run_evaluate(blobs / "a", blobs / "a", extractor)
    other_draw = run_evaluate(blobs / "b", blobs / "a", extractor)
    shifted = run_evaluate(blobs / "shifted", blobs / "a", extractor)
    assert abs(same["fid"]) < 1e-4 * shifted["fid"]
    assert shifted["fid"] > 5 * other_draw["fid"] > 0
    # KID draws reference and sample subsets independently, so even a set against itself is
    # only zero on average.
    assert abs(same["kid_mean"]) < 0.05 * shifted["kid_mean"]
    assert shifted["kid_mean"] > 5 * abs(other_draw["kid_mean"])
    assert same["num_samples"] == same["num_reference"] == 64 and same["resolution"] == 32


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_match_torchmetrics_run_directly_on_the_images(blobs):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real = torch.stack(list(fid.SampleImages.from_folder(blobs / "a")))
    fake = torch.stack(list(fid.SampleImages.from_folder(blobs / "shifted")))
    direct_fid = FrechetInceptionDistance(feature=TinyFeatures())
    # One subset holding every image: no randomness left in KID.
    direct_kid = KernelInceptionDistance(feature=TinyFeatures(), subsets=1, subset_size=64)
    for metric in (direct_fid, direct_kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)

    extractor = TinyFeatures()
    real_features = fid.extract_features(fid.SampleImages.from_folder(blobs / "a"), extractor, batch_size=16)
    fake_features = fid.extract_features(fid.SampleImages.from_folder(blobs / "shifted"), extractor)
    assert fid.fid_from_features(real_features, fake_features) == pytest.approx(float(direct_fid.compute()), rel=1e-4)
    kid_mean, _, subset_size = fid.kid_from_features(real_features, fake_features, subsets=1, subset_size=64)
    assert subset_size == 64
    assert kid_mean == pytest.approx(float(direct_kid.compute()[0]), rel=1e-4)


def make_portrait_images(folder: Path, count: int, width: int = 48, height: int = 64, seed: int = 0) -> list[Image.Image]:
    """Non-square images: a bright disc and a bar somewhere on a gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        base = rng.integers(0, 90, 3) + (yy[..., None] / height) * rng.integers(0, 90, 3)
        cy, cx, radius = rng.uniform(0.15, 0.85) * height, rng.uniform(0.2, 0.8) * width, rng.uniform(5, 12)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        pixels = np.where(disc[..., None], rng.integers(150, 256, 3), base)
        bar_top = int(rng.uniform(0, height - 6))
        pixels[bar_top : bar_top + 4] = rng.integers(100, 256, 3)
        images.append(Image.fromarray(pixels.astype(np.uint8)))
    return images


def save_all(images: list[Image.Image], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"{index:03d}.png")
    return folder


def test_reference_is_resized_and_cropped_like_training(tmp_path):
    originals = make_portrait_images(tmp_path, 48)
    samples = save_all([preprocess_like_training(image, 32) for image in originals], tmp_path / "samples")
    # The same pictures at twice the size: must give ~0 after the training preprocessing.
    double = save_all([image.resize((96, 128), Image.BICUBIC) for image in originals], tmp_path / "double")
    # A reference squashed to a square instead, as copies that reproduce no LDM numbers do.
    squashed = save_all([image.resize((32, 32), Image.BILINEAR) for image in originals], tmp_path / "squashed")
    other = save_all(
        [preprocess_like_training(image, 32) for image in make_portrait_images(tmp_path, 48, seed=1)],
        tmp_path / "other",
    )

    extractor = TinyFeatures()
    against_double = run_evaluate(samples, double, extractor)["fid"]
    against_squashed = run_evaluate(samples, squashed, extractor)["fid"]
    against_other_draw = run_evaluate(samples, other, extractor)["fid"]
    assert against_double < 0.1 * against_other_draw
    assert against_double < 0.1 * against_squashed

    # The same reference as a local `datasets` imagefolder gives the same features.
    via_datasets = evaluate.main(
        ["--samples_dir", str(samples), "--reference_dataset_name", str(double), "--cache_dir", str(tmp_path / "hf"),
         "--kid_subset_size", "32", "--kid_subsets", "10", "--device", "cpu"],
        feature_extractor=extractor,
    )["fid_kid"]["fid"]
    assert via_datasets == pytest.approx(against_double, rel=1e-5, abs=1e-7)


def test_samples_of_another_size_are_refused(blobs, expect_input_error):
    assert "pass --resolution" in expect_input_error(run_evaluate, blobs / "a", blobs / "b", TinyFeatures(),
                                                     "--resolution", "16")


def test_reference_features_are_cached_and_the_cache_key_follows_the_inputs(blobs, tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    for path in sorted((blobs / "b").glob("*.png")):
        (reference / path.name).write_bytes(path.read_bytes())
    cache = ["--reference_stats_cache", str(tmp_path / "cache")]

    def run(extractor: TinyFeatures, *extra: str) -> tuple[dict, int]:
        result = run_evaluate(blobs / "a", reference, extractor, *cache, *extra)
        return result, extractor.images_seen

    first, seen_first = run(TinyFeatures())
    second, seen_second = run(TinyFeatures())
    assert (seen_first, seen_second) == (128, 64)  # the second run computes the samples only
    assert not first["reference_cache_hit"] and second["reference_cache_hit"]
    assert second["fid"] == first["fid"] and second["kid_mean"] == first["kid_mean"]
    assert len(list((tmp_path / "cache").glob("reference-*.safetensors"))) == 1

    # Anything that changes the reference features misses the cache.
    assert run(TinyFeatures(seed=1))[1] == 128  # other feature extractor weights
    assert run(TinyFeatures(), "--no-center_crop")[1] == 128  # other preprocessing
    first_file = sorted(reference.glob("*.png"))[0]
    make_blob_images(tmp_path / "replacement", 1, seed=9)
    first_file.write_bytes((tmp_path / "replacement" / "img_0000.png").read_bytes())
    os.utime(first_file, ns=(0, 12345))
    assert run(TinyFeatures())[1] == 128  # a reference file changed


# --------------------------------------------------------------------------------------------
# Inception weights
# --------------------------------------------------------------------------------------------


@pytest.fixture
def empty_torch_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError("tests must not download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_missing_inception_weights_offline_explain_where_to_get_them(empty_torch_hub, tmp_path):
    with pytest.raises(fid.InceptionWeightsMissing) as missing:
        fid.resolve_inception_weights()
    message = str(missing.value)
    assert fid.INCEPTION_WEIGHTS_URL in message and "--inception_weights" in message
    assert str(empty_torch_hub) in message

    with pytest.raises(fid.InceptionWeightsMissing, match="does not exist") as wrong_path:
        fid.resolve_inception_weights(tmp_path / "nowhere.pth")
    assert fid.INCEPTION_WEIGHTS_URL in str(wrong_path.value)

    # A file already in torch.hub's cache is used without any download.
    empty_torch_hub.mkdir(parents=True)
    (empty_torch_hub / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"weights")
    assert fid.resolve_inception_weights().name == "pt_inception-2015-12-05-6726825d.pth"


def test_failed_inception_download_gives_the_same_help(empty_torch_hub, monkeypatch):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(fid.InceptionWeightsMissing, match="Downloading the FID Inception weights failed") as failed:
        fid.resolve_inception_weights(allow_download=True)
    assert fid.INCEPTION_WEIGHTS_URL in str(failed.value)


def test_inception_loads_a_local_weights_file_in_the_fid_inception_layout(tmp_path):
    """The real extractor path, with random weights in the layout of the FID Inception file."""
    import torchvision

    torch.manual_seed(0)
    layout = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(layout.state_dict(), weights)

    # The 64-feature tap stops after the stem; 2048 works the same, only slower on 2 cores.
    extractor = fid.build_inception_feature_extractor(weights, feature_dim=64)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        features = extractor(images)
    assert features.shape == (3, 64) and torch.isfinite(features).all()
    assert torch.allclose(extractor.Conv2d_1a_3x3.conv.weight, layout.Conv2d_1a_3x3.conv.weight)
    other = fid.build_inception_feature_extractor(weights, feature_dim=64, antialias=True)
    assert fid.feature_extractor_fingerprint(other) != fid.feature_extractor_fingerprint(extractor)


def test_cli_reports_missing_weights_as_a_message(blobs, tmp_path, expect_input_error):
    message = expect_input_error(evaluate.main, ["--samples_dir", str(blobs / "a"), "--reference_dir", str(blobs / "b"),
                                                 "--inception_weights", str(tmp_path / "missing.pth")])
    assert message.startswith("error:") and "missing.pth does not exist" in message
    assert fid.INCEPTION_WEIGHTS_URL in message


# --------------------------------------------------------------------------------------------
# Identity similarity
# --------------------------------------------------------------------------------------------


def test_face_models_come_from_face_recognition_models():
    path = identity.face_model_path(identity.FACE_DESCRIPTOR_MODEL)
    assert path.is_file() and path.parent.parent.name == "face_recognition_models"
    with pytest.raises(FileNotFoundError):
        identity.face_model_path("no_such_model.dat")


def square(array: np.ndarray, size: int = 256) -> Image.Image:
    image = Image.fromarray(array)
    return (image.convert("RGB") if image.mode != "RGB" else image).resize((size, size), Image.BICUBIC)


def test_identity_ranks_the_same_person_above_other_faces_and_non_faces(tmp_path):
    import skimage.data

    astronaut = skimage.data.astronaut()
    save_all([Image.fromarray(astronaut)], tmp_path / "instance")
    samples = tmp_path / "samples"
    samples.mkdir()
    same_person = {
        "astronaut_flipped": square(np.ascontiguousarray(astronaut[:, ::-1])),
        "astronaut_rotated": square(np.asarray(Image.fromarray(astronaut).rotate(12, resample=Image.BILINEAR))),
        "astronaut_brighter": square(np.clip(astronaut.astype(int) + 40, 0, 255).astype(np.uint8)),
    }
    lfw = skimage.data.lfw_subset()[:4]  # 25x25 LFW face crops of other people
    others = {f"lfw_{i}": square((face * 255).astype(np.uint8)) for i, face in enumerate(lfw)}
    no_face = {
        "cat": square(skimage.data.chelsea()),
        "noise": Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)),
    }
    for name, image in {**same_person, **others, **no_face}.items():
        image.save(samples / f"{name}.png")

    output = tmp_path / "eval.json"
    evaluate.main(["--samples_dir", str(samples), "--instance_data_dir", str(tmp_path / "instance"),
                   "--output_json", str(output)])
    scores = json.loads(output.read_text())["identity"]
    distance = {Path(path).stem: value for path, value in scores["per_sample"].items()}

    assert distance["cat"] is None and distance["noise"] is None
    same = [distance[name] for name in same_person]
    assert all(value < identity.SAME_PERSON_DISTANCE for value in same)
    other_found = [distance[name] for name in others if distance[name] is not None]
    assert len(other_found) >= 2 and min(other_found) > max(same)

    count = len(distance)
    assert scores["num_samples"] == count and scores["num_instance_faces"] == 1
    assert scores["no_face_rate"] == pytest.approx(sum(v is None for v in distance.values()) / count)
    assert scores["same_person_rate"] >= len(same) / count
    found = [v for v in distance.values() if v is not None]
    assert scores["mean_distance"] == pytest.approx(np.mean(found), rel=1e-5)
    assert scores["instance_diversity"] is None  # one instance photo


def test_a_sample_is_the_same_person_only_when_it_is_close_to_the_photos_themselves():
    """dlib's 0.6 is a distance between two descriptors. The centroid of the photos is always nearer than the
    photos are (|x-c|^2 = mean|x-y|^2 - mean|y-c|^2), so it must not be what a sample is compared with."""
    centre = np.zeros(128, np.float32)
    photos = np.stack([centre, centre]).copy()
    photos[0, 0], photos[1, 0] = 0.55, -0.55           # two photos 1.1 apart
    sample = centre.copy()
    sample[1] = 0.3                                      # 0.3 from their centroid, 0.626 from each photo
    scores = identity.identity_scores([sample], photos)
    assert scores["mean_distance"] == pytest.approx(np.hypot(0.55, 0.3), rel=1e-5)
    assert scores["same_person_rate"] == 0.0
    assert identity.identity_scores([sample * 0], photos)["same_person_rate"] == 1.0  # 0.55 from each photo


def test_sample_diversity_is_low_for_one_face_and_higher_for_many():
    import skimage.data

    astronaut = skimage.data.astronaut()
    one_person = [
        identity.face_descriptors(np.asarray(image), max_faces=1)[0]
        for image in (square(astronaut), square(np.ascontiguousarray(astronaut[:, ::-1])), square(astronaut, 320))
    ]
    many = [identity.face_descriptors(np.asarray(square((face * 255).astype(np.uint8))), max_faces=1)
            for face in skimage.data.lfw_subset()[:3]]
    many = [found[0] for found in many if len(found)] + one_person[:1]
    instance = np.stack(one_person[:1])
    low = identity.identity_scores(one_person, instance)["sample_diversity"]
    high = identity.identity_scores(many, instance)["sample_diversity"]
    assert 0 < low < high
    assert identity.identity_scores([None, None], instance)["no_face_rate"] == 1.0
