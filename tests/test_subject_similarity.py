"""uldm/metrics/subject_similarity.py and evaluate.py's --dino_model/--clip_model: DINO, CLIP-I and diversity.

Nothing is downloaded: the encoders are tiny random ViT / CLIP models built here from configs and
saved with save_pretrained. Their weights are drawn wider than transformers' default
(initializer_range 0.02), with which every image's CLS token is nearly the same vector and no
score could tell images apart. The photos are scikit-image's (astronaut, cat, coffee, rocket).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
from uldm.metrics import subject_similarity as ss
from uldm.errors import InputError

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)


def save_tiny_vit(folder: Path, with_processor: bool = True, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    torch.manual_seed(seed)
    ViTModel(ViTConfig(**TINY, initializer_range=0.2), add_pooling_layer=False).save_pretrained(folder)
    if with_processor:  # what facebook/dino-vits16 ships, at 32 px
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=IMAGENET_DEFAULT_MEAN,
                          image_std=IMAGENET_DEFAULT_STD).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path, with_processor: bool = True, seed: int = 0) -> Path:
    """A full CLIPModel folder (vision + text towers), like openai/clip-vit-large-patch14."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(vision_config={**TINY, "initializer_factor": 5.0}, projection_dim=16,
                        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=100, bos_token_id=0, eos_token_id=1))
    CLIPModel(config).save_pretrained(folder)
    if with_processor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {"dino": save_tiny_vit(root / "vit"), "clip_i": save_tiny_clip(root / "clip")}


def resized(array: np.ndarray, size: int = 96) -> np.ndarray:
    return np.array(Image.fromarray(array).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def photos():
    """The astronaut a few ways (one subject) and four unrelated pictures."""
    import skimage.data

    astronaut = skimage.data.astronaut()
    subject = [
        resized(astronaut),
        resized(np.clip(astronaut.astype(int) + 25, 0, 255).astype(np.uint8)),
        resized(astronaut[24:-24, 24:-24]),
        resized(np.asarray(Image.fromarray(astronaut).rotate(6, resample=Image.BILINEAR))),
    ]
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    others = [resized(skimage.data.chelsea()[:, 50:350]), resized(skimage.data.coffee()[:, 100:500]),
              noise, resized(skimage.data.rocket()[:, 100:527])]
    return {"subject": subject, "others": others}


def floats(images: list[np.ndarray]) -> np.ndarray:
    """N x H x W x 3 float32 in [0, 1], as validation decodes them."""
    return np.stack(images).astype(np.float32) / 255


# --------------------------------------------------------------------------------------------
# Embeddings


def test_embeddings_are_the_dino_cls_token_and_the_clip_projection(models, photos):
    from transformers import CLIPImageProcessor, CLIPModel, ViTImageProcessor, ViTModel

    images = [torch.from_numpy(image).permute(2, 0, 1) for image in photos["subject"][:3]]
    vit = ViTModel.from_pretrained(models["dino"], add_pooling_layer=False).eval()
    clip = CLIPModel.from_pretrained(models["clip_i"]).eval()
    with torch.no_grad():
        pixels = ViTImageProcessor.from_pretrained(models["dino"])(images, return_tensors="pt")["pixel_values"]
        expected_dino = F.normalize(vit(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)
        pixels = CLIPImageProcessor.from_pretrained(models["clip_i"])(images, return_tensors="pt")["pixel_values"]
        expected_clip = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output), dim=-1)

    dino = ss.load_image_encoder(models["dino"])
    clip_encoder = ss.load_image_encoder(models["clip_i"])
    assert (dino.family, clip_encoder.family) == ("dino", "clip")
    assert torch.allclose(dino.embed(photos["subject"][:3]), expected_dino, atol=1e-5)
    assert torch.allclose(clip_encoder.embed(photos["subject"][:3]), expected_clip, atol=1e-5)
    assert torch.allclose(dino.embed(photos["subject"]).norm(dim=-1), torch.ones(4), atol=1e-5)


def test_files_pil_images_and_float_arrays_give_the_same_embeddings(models, photos, tmp_path):
    encoder = ss.load_image_encoder(models["dino"])
    paths = []
    for index, image in enumerate(photos["subject"]):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(paths[-1])
    from_files = encoder.embed(paths)
    assert torch.equal(encoder.embed([Image.fromarray(image) for image in photos["subject"]]), from_files)
    assert torch.equal(encoder.embed(floats(photos["subject"])), from_files)
    # Decoded samples are not on the 8-bit grid: each value goes to its nearest 8-bit level, as when saved.
    jitter = np.random.default_rng(0).uniform(-0.45, 0.45, floats(photos["subject"]).shape) / 255
    assert torch.equal(encoder.embed(np.clip(floats(photos["subject"]) + jitter, 0, 1)), from_files)
    assert torch.equal(encoder.embed(torch.from_numpy(floats(photos["subject"]))), from_files)
    assert torch.equal(encoder.embed(np.stack(photos["subject"])), from_files)  # uint8


def test_non_square_images_are_centre_cropped(models, photos):
    encoder = ss.load_image_encoder(models["dino"])
    square = photos["subject"][0]
    wide = np.concatenate([photos["others"][2][:, :20], square, photos["others"][2][:, :20]], axis=1)
    assert torch.equal(encoder.embed([wide]), encoder.embed([square]))


def test_results_do_not_depend_on_batch_size_or_the_callers_autocast(models, photos):
    images = photos["subject"] + photos["others"]
    for metric in ("dino", "clip_i"):
        encoder = ss.load_image_encoder(models[metric])
        one_by_one, all_at_once = encoder.embed(images, batch_size=1), encoder.embed(images, batch_size=8)
        assert torch.allclose(one_by_one, all_at_once, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as DreamBooth validation samples
            assert torch.allclose(encoder.embed(images), all_at_once, atol=1e-5)
    by_three = ss.subject_fidelity(images, photos["subject"][:2], models, batch_size=3)
    by_eight = ss.subject_fidelity(images, photos["subject"][:2], models, batch_size=8)
    assert by_three == pytest.approx(by_eight, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Scores


@pytest.mark.parametrize("metric", ["dino", "clip_i"])
def test_the_subject_scores_near_one_and_other_pictures_lower(models, photos, metric):
    score = ss.dino_similarity if metric == "dino" else ss.clip_i_similarity
    encoder = models[metric]
    instance = photos["subject"][:1]
    assert score(instance, instance, encoder) == pytest.approx(1.0, abs=1e-5)
    same_subject = score(photos["subject"][1:], instance, encoder)
    other_pictures = score(photos["others"], instance, encoder)
    assert other_pictures < same_subject - 0.1
    # Samples that are partly the subject land in between.
    mixed = score(photos["subject"][1:3] + photos["others"][:2], instance, encoder)
    assert other_pictures < mixed < same_subject


def test_similarity_is_symmetric_and_the_mean_over_all_pairs(models, photos):
    a, b = photos["subject"], photos["others"][:3]
    encoder = ss.load_image_encoder(models["dino"])
    forward, backward = ss.dino_similarity(a, b, encoder), ss.dino_similarity(b, a, encoder)
    assert forward == pytest.approx(backward, abs=1e-12)
    pairs = [float(x @ y) for x in encoder.embed(a) for y in encoder.embed(b)]
    assert forward == pytest.approx(np.mean(pairs), abs=1e-6)
    assert len(pairs) == 12
    embedded = encoder.embed(a)
    between_different = [float(embedded[i] @ embedded[j]) for i in range(4) for j in range(4) if i != j]
    assert ss.sample_diversity(a, encoder) == pytest.approx(1 - np.mean(between_different), abs=1e-6)


def test_diversity_is_zero_for_one_image_repeated_and_higher_for_varied_images(models, photos):
    for encoder in models.values():
        repeated = ss.sample_diversity([photos["subject"][0]] * 4, encoder)
        one_subject = ss.sample_diversity(photos["subject"], encoder)
        unrelated = ss.sample_diversity(photos["others"], encoder)
        assert repeated == pytest.approx(0.0, abs=1e-5)
        assert 0.01 < one_subject < unrelated
        assert ss.sample_diversity(photos["subject"][:1], encoder) is None


def test_subject_fidelity_gathers_the_scores_and_reuses_the_instance_embeddings(models, photos):
    samples, instance = photos["subject"][1:] + photos["others"][:1], photos["subject"][:2]
    values = ss.subject_fidelity(floats(samples), floats(instance), models)
    assert values["dino"] == pytest.approx(ss.dino_similarity(samples, instance, models["dino"]), abs=1e-9)
    assert values["clip_i"] == pytest.approx(ss.clip_i_similarity(samples, instance, models["clip_i"]), abs=1e-9)
    assert values["div_dino"] == pytest.approx(ss.sample_diversity(samples, models["dino"]), abs=1e-9)
    assert values["instance_dino"] == pytest.approx(1 - ss.sample_diversity(instance, models["dino"]), abs=1e-9)
    assert (values["num_samples"], values["num_instance_photos"]) == (4, 2)
    assert "DINO" in ss.summary_line(values) and "CLIP-I" in ss.summary_line(values)

    reference = ss.InstanceEmbeddings.from_photos(instance, {"dino": models["dino"]})
    alone = reference.score(samples)
    assert set(alone) == {"dino", "div_dino", "instance_dino", "num_samples", "num_instance_photos"}
    assert alone["dino"] == pytest.approx(values["dino"], abs=1e-9)
    assert ss.subject_fidelity(samples, instance[:1], models)["instance_clip_i"] is None


# --------------------------------------------------------------------------------------------
# Loading and bad input


def test_encoders_are_loaded_once_per_process(models, photos):
    first = ss.load_image_encoder(models["dino"])
    assert ss.load_image_encoder(str(models["dino"])) is first
    misses = ss._load_image_encoder_cached.cache_info().misses
    for _ in range(3):
        ss.subject_fidelity(photos["subject"][:2], photos["subject"][:1], models)
    assert ss._load_image_encoder_cached.cache_info().misses == misses
    assert ss.load_image_encoder(models["dino"], dtype=torch.float64) is not first


def test_a_folder_without_processor_gets_the_documented_preprocessing(models, photos, tmp_path):
    from transformers import CLIPImageProcessor, ViTImageProcessor

    bare_vit = save_tiny_vit(tmp_path / "vit", with_processor=False)  # same seed, same weights
    bare_clip = save_tiny_clip(tmp_path / "clip", with_processor=False)
    images = photos["subject"] + photos["others"]
    for saved, bare, processor_class in ((models["dino"], bare_vit, ViTImageProcessor),
                                         (models["clip_i"], bare_clip, CLIPImageProcessor)):
        fallback = ss.load_image_encoder(bare)
        assert not (bare / "preprocessor_config.json").exists()
        assert isinstance(fallback.processor, processor_class)
        assert torch.allclose(fallback.embed(images), ss.load_image_encoder(saved).embed(images), atol=1e-5)

    # A saved processor wins over the fallback: ViTImageProcessor's own mean/std 0.5 instead of ImageNet's.
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(bare_vit)
    ss._load_image_encoder_cached.cache_clear()
    custom = ss.load_image_encoder(bare_vit)
    assert list(custom.processor.image_mean) == [0.5, 0.5, 0.5]
    assert not torch.allclose(custom.embed(images), ss.load_image_encoder(models["dino"]).embed(images), atol=1e-3)


def test_missing_folders_and_unreachable_hub_ids_say_how_to_download(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ss.load_image_encoder(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        ss.load_image_encoder(tmp_path / "empty")
    # conftest sets HF_HUB_OFFLINE=1: the hub is never contacted.
    with pytest.raises(InputError) as offline:
        ss.load_image_encoder("facebook/dino-vits16")
    assert "hf download facebook/dino-vits16 --local-dir DIR" in str(offline.value)


def test_models_that_would_score_with_random_weights_are_refused(models, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, ResNetConfig, ResNetModel

    CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(tmp_path / "no_projection")
    with pytest.raises(InputError, match="visual_projection"):
        ss.load_image_encoder(tmp_path / "no_projection")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(tmp_path / "resnet")
    with pytest.raises(InputError, match="'resnet' model"):
        ss.load_image_encoder(tmp_path / "resnet")
    with pytest.raises(InputError, match="needs a DINO ViT"):
        ss.dino_similarity([np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8, 3), np.uint8)], models["clip_i"])
    with pytest.raises(InputError, match="Unknown subject metric"):
        ss.subject_fidelity([np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8, 3), np.uint8)], {"lpips": models["dino"]})


def test_arrays_in_the_wrong_range_or_layout_are_refused(models, photos):
    encoder = ss.load_image_encoder(models["dino"])
    images = floats(photos["subject"])
    with pytest.raises(InputError, match=r"\(x \+ 1\) / 2"):
        encoder.embed(images * 2 - 1)
    with pytest.raises(InputError, match="permute"):
        encoder.embed(torch.from_numpy(images).permute(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_reports_subject_scores_next_to_identity(models, photos, tmp_path, capsys, expect_input_error):
    import skimage.data

    astronaut = skimage.data.astronaut()  # large enough for dlib to find the face
    instance = [resized(astronaut, 256), resized(np.clip(astronaut.astype(int) + 25, 0, 255).astype(np.uint8), 256)]
    for name, images in (("instance", instance), ("good", photos["subject"][2:]), ("bad", photos["others"][:2])):
        (tmp_path / name).mkdir()
        for index, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{index}.png")

    def run(samples: str, *extra: str) -> dict:
        output = tmp_path / f"{samples}.json"
        evaluate.main(["--samples_dir", str(tmp_path / samples), "--instance_data_dir", str(tmp_path / "instance"),
                       "--dino_model", str(models["dino"]), "--clip_model", str(models["clip_i"]),
                       "--device", "cpu", "--output_json", str(output), *extra])
        return json.loads(output.read_text())

    good = run("good")
    printed = capsys.readouterr().out
    assert good["identity"]["num_instance_faces"] == 2  # dlib runs next to it
    assert "subject/dino" in printed and "subject/div_clip_i" in printed and "identity/mean_distance" in printed
    bad = run("bad", "--no-face_identity")  # subjects that are not faces skip dlib
    assert "identity" not in bad
    for metric in ("dino", "clip_i"):
        assert good["subject"][metric] > bad["subject"][metric]
    assert good["subject"]["models"] == {"dino": str(models["dino"]), "clip_i": str(models["clip_i"])}
    assert good["subject"]["dino"] == pytest.approx(
        ss.dino_similarity(photos["subject"][2:], instance, models["dino"]), abs=1e-6)
    assert good["subject"]["num_instance_photos"] == 2

    assert "give --instance_data_dir" in expect_input_error(  # a subject model needs the subject's photos
        evaluate.main, ["--samples_dir", str(tmp_path / "good"), "--dino_model", str(models["dino"])])
    assert "does not exist" in expect_input_error(run, "good", "--dino_model", str(tmp_path / "missing"))  # before scoring


def test_dinov2_folders_work_with_their_documented_preprocessing(photos, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**{**TINY, "patch_size": 16}, initializer_range=0.2)).eval()
    model.save_pretrained(tmp_path / "dinov2")  # no processor: shorter side 256, centre crop 224, ImageNet
    encoder = ss.load_image_encoder(tmp_path / "dinov2")
    assert encoder.family == "dino"
    pixels = encoder.processor([torch.from_numpy(photos["subject"][0]).permute(2, 0, 1)], return_tensors="pt")
    assert tuple(pixels["pixel_values"].shape) == (1, 3, 224, 224)
    with torch.no_grad():
        expected = F.normalize(model(**pixels).pooler_output, dim=-1)  # DINOv2's normalised CLS token
    assert torch.allclose(encoder.embed(photos["subject"][:1]), expected, atol=1e-5)
    assert ss.dino_similarity(photos["subject"][1:], photos["subject"][:1], encoder) > \
        ss.dino_similarity(photos["others"], photos["subject"][:1], encoder)
