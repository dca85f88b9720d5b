"""FFHQ face alignment on a real face photo (scikit-image's astronaut), re-detected with dlib.

Outputs are 256 px with a 1024 transform (FFHQ's own reduction path from the 1024 reference,
without the 4x oversampling) to keep the file fast; the geometry does not depend on it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image
from skimage.data import astronaut, coffee

import align_faces
from uldm.face_align import (
    AlignOptions,
    align_face,
    align_face_68,
    aligned_coordinates,
    detect_faces,
    eyes_and_mouth_from_68,
    face_model_path,
    ffhq_quad,
    plan_output_stems,
    quad_size,
    resolve_sizes,
    select_faces,
    warp_quad,
)

SIZE = 256
TRANSFORM = 1024
FAST = {"output_size": SIZE, "transform_size": TRANSFORM}
CLI_FAST = ["--output_size", str(SIZE), "--transform_size", str(TRANSFORM)]


def key_points(landmarks) -> np.ndarray:
    """(4, 2): eye left, eye right, mouth left, mouth right."""
    return np.stack(eyes_and_mouth_from_68(landmarks))


def only_face(image) -> np.ndarray:
    faces = detect_faces(image)
    assert len(faces) >= 1, "dlib found no face"
    return max(faces, key=lambda f: f.score).landmarks


def psnr(a, b, mask=None) -> float:
    a, b = np.float64(a), np.float64(b)
    if mask is not None:
        a, b = a[mask], b[mask]
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def central_disc(size: int = SIZE, radius: float = 0.35) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] + 0.5
    return (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (radius * size) ** 2


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(astronaut())


@pytest.fixture(scope="module")
def upright(photo):
    return align_face_68(photo, only_face(photo), **FAST)


def test_face_model_path_finds_the_shipped_dlib_models():
    for name in ("shape_predictor_68_face_landmarks.dat", "mmod_human_face_detector.dat",
                 "dlib_face_recognition_resnet_model_v1.dat"):
        assert face_model_path(name).stat().st_size > 100_000
    with pytest.raises(FileNotFoundError, match="shape_predictor_68"):
        face_model_path("no_such_model.dat")


def test_aligned_face_sits_where_ffhq_puts_it(photo, upright):
    """Eye centres and mouth corners, found again by dlib on the output, are at FFHQ's positions."""
    assert upright.image.size == (SIZE, SIZE) and upright.image.mode == "RGB"
    found = (key_points(only_face(upright.image)) + 0.5) / SIZE  # fractions of the side
    eye_left, eye_right, mouth_left, mouth_right = found

    # FFHQ's geometry in output fractions: the square is centred on eye_avg + 0.1 eye_to_mouth
    # and its half side is max(2 |eye_to_eye|, 1.8 |eye_to_mouth|), i.e. that maximum is 0.5.
    eye_avg = (eye_left + eye_right) / 2
    eye_to_mouth = (mouth_left + mouth_right) / 2 - eye_avg
    np.testing.assert_allclose(eye_avg + 0.1 * eye_to_mouth, [0.5, 0.5], atol=0.01)
    assert max(2 * np.hypot(*(eye_right - eye_left)), 1.8 * np.hypot(*eye_to_mouth)) == pytest.approx(0.5, abs=0.01)

    # The astronaut's proportions (|eye_to_mouth| < 1.11 |eye_to_eye|) give the classic numbers.
    np.testing.assert_allclose(eye_left, [0.375, 0.48], atol=0.01)
    np.testing.assert_allclose(eye_right, [0.625, 0.48], atol=0.01)
    np.testing.assert_allclose([mouth_left[1], mouth_right[1]], [0.70, 0.70], atol=0.015)

    # And the re-detected points agree with the source landmarks pushed through the quad.
    predicted = aligned_coordinates(key_points(only_face(photo)), upright.quad, SIZE)
    np.testing.assert_allclose(found * SIZE - 0.5, predicted, atol=2.0)


def test_rotated_photo_realigns_like_the_upright_one(photo, upright):
    rotated = photo.rotate(20, resample=Image.Resampling.BICUBIC, expand=True)
    realigned = align_face_68(rotated, only_face(rotated), **FAST)
    assert psnr(realigned.image, upright.image, central_disc()) > 28
    np.testing.assert_allclose(key_points(only_face(realigned.image)), key_points(only_face(upright.image)), atol=2.0)


def test_no_rotation_keeps_the_tilt(photo, upright):
    rotated = photo.rotate(20, resample=Image.Resampling.BICUBIC, expand=True)
    tilted = align_face_68(rotated, only_face(rotated), rotate=False, **FAST)
    edge = tilted.quad[3] - tilted.quad[0]
    assert edge[1] == pytest.approx(0.0, abs=1e-9) and edge[0] > 0  # upright square

    disc = central_disc()
    like_tilted_upright = psnr(tilted.image, upright.image.rotate(20, resample=Image.Resampling.BICUBIC), disc)
    assert like_tilted_upright > psnr(tilted.image, upright.image, disc) + 5
    assert like_tilted_upright > psnr(tilted.image, upright.image.rotate(-20, resample=Image.Resampling.BICUBIC), disc) + 5


def test_face_at_the_border_is_padded_with_blur_not_a_mirror_image():
    photo = astronaut()[40:, 150:]  # the crop square now leaves the photo at the top and left
    quad = ffhq_quad(*key_points(only_face(photo)))
    ffhq = np.float64(warp_quad(photo, quad, **FAST))
    black = np.float64(warp_quad(photo, quad, padding=False, **FAST))
    margin = 300
    mirrored = np.pad(photo, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    raw_reflection = np.float64(warp_quad(mirrored, quad + margin, padding=False, **FAST))

    # Output pixels whose source lies outside the photo (by more than 2 px).
    v, u = np.mgrid[:SIZE, :SIZE] + 0.5
    source = quad[0] + (u / SIZE)[..., None] * (quad[3] - quad[0]) + (v / SIZE)[..., None] * (quad[1] - quad[0]) - 0.5
    height, width = photo.shape[:2]
    outside = ((source[..., 0] < -2) | (source[..., 1] < -2)
               | (source[..., 0] > width + 1) | (source[..., 1] > height + 1))
    assert outside.mean() > 0.1

    def detail(image):  # high-pass energy: mirrored hair and edges have lots, a blur has little
        grey = image.mean(axis=-1)
        return np.abs(grey - scipy.ndimage.gaussian_filter(grey, 2.0))[outside].mean()

    assert detail(ffhq) < 0.3 * detail(raw_reflection)
    assert black[outside].mean() < 1  # --no_padding leaves it black, as FFHQ does
    assert ffhq[outside].mean() > 60  # padded with image colours, not black
    # The blur also blends in over a band inside the photo (a third of the pad); the face is untouched.
    assert psnr(ffhq, black, central_disc(radius=0.25)) > 40


def test_small_output_is_a_lanczos_downscale_of_the_reference_alignment(photo, upright):
    big = warp_quad(photo, upright.quad, output_size=TRANSFORM, transform_size=TRANSFORM)
    expected = big.resize((128, 128), Image.Resampling.LANCZOS)
    small = warp_quad(photo, upright.quad, output_size=128, transform_size=TRANSFORM)
    assert np.array_equal(np.asarray(small), np.asarray(expected))


def test_sizes_default_to_ffhq_and_reject_a_too_small_transform():
    assert resolve_sizes(1024) == (4096, 1024)
    assert resolve_sizes(256) == (4096, 1024)  # FFHQ-256 comes from the 1024 alignment
    assert resolve_sizes(256, 512) == (512, 512)
    assert resolve_sizes(2048) == (8192, 2048)
    with pytest.raises(ValueError, match="transform_size"):
        AlignOptions(output_size=256, transform_size=128)


def test_align_face_takes_key_points_from_any_detector(photo, upright):
    points = key_points(only_face(photo))
    jitter = np.random.default_rng(0).normal(0, 0.3, size=points.shape)  # sub-pixel, as other detectors give
    result = align_face(photo, *(points + jitter), **FAST)
    assert psnr(result.image, upright.image) > 30
    with pytest.raises(ValueError, match="eye_left"):
        align_face(photo, points[1], points[0], points[3], points[2])  # eyes swapped


def test_quad_rotates_with_the_face():
    points = np.array([[100.0, 100.0], [160.0, 104.0], [108.0, 170.0], [152.0, 172.0]])
    angle = np.deg2rad(35)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    turned = points @ rotation.T + [50.0, -20.0]
    np.testing.assert_allclose(ffhq_quad(*turned), ffhq_quad(*points) @ rotation.T + [50.0, -20.0], atol=1e-9)
    assert quad_size(ffhq_quad(*points, rotate=False)) == pytest.approx(quad_size(ffhq_quad(*points)))


def test_largest_face_first_and_small_faces_dropped():
    big = Image.fromarray(astronaut())
    small = big.resize((256, 256), Image.Resampling.LANCZOS)
    group = Image.new("RGB", (768, 512), (200, 200, 200))
    group.paste(big, (0, 0))
    group.paste(small, (512, 0))
    faces = detect_faces(group, threshold=0.5)
    assert len(faces) == 2
    chosen, too_small = select_faces(faces, AlignOptions(faces="largest"))
    assert len(chosen) == 1 and too_small == 0 and chosen[0][0].box[0] < 512
    chosen, _ = select_faces(faces, AlignOptions(faces="all"))
    assert [face.box[0] < 512 for face, _ in chosen] == [True, False]
    chosen, too_small = select_faces(faces, AlignOptions(faces="all", min_face_size=120))
    assert len(chosen) == 1 and too_small == 1


def test_output_names_keep_equal_stems_apart(tmp_path):
    files = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "a" / "y.jpg", tmp_path / "a" / "y.png"]
    stems = plan_output_stems(files)
    assert [stems[str(f)] for f in files] == ["a/x", "b/x", "a/y_jpg", "a/y_png"]
    assert plan_output_stems([tmp_path / "a" / "x.jpg"]) == {str(tmp_path / "a" / "x.jpg"): "x"}


# --------------------------------------------------------------------------- the script


def save_exif_rotated_jpeg(image: Image.Image, path) -> None:
    """Pixels stored sideways with EXIF orientation 6 (rotate 90° clockwise to display), as phones do."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image.rotate(90, expand=True).save(path, quality=95, exif=exif.tobytes())


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory, photo):
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    photo.save(folder / "astronaut.png")
    photo.save(folder / "sub" / "astronaut.png")  # same stem, other folder
    photo.convert("L").save(folder / "grey.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.arange(512)[None, :] < 60, 0, 255).repeat(512, 0).astype(np.uint8)))
    rgba.save(folder / "rgba.png")
    save_exif_rotated_jpeg(photo, folder / "phone.jpg")
    Image.fromarray(coffee()).save(folder / "coffee.png")  # no face
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return folder


def test_script_aligns_a_messy_folder_and_resumes(messy_folder, upright, capsys):
    output = messy_folder / "aligned"  # inside the input folder: must not be taken as input next time
    args = [str(messy_folder), "--output_dir", str(output), *CLI_FAST]
    summary = align_faces.main(args + ["--num_workers", "2"])

    assert (summary.images_found, summary.images_read, summary.faces_written) == (7, 6, 5)
    assert summary.images_without_face == 1
    assert [os.path.basename(source) for source, _ in summary.failures] == ["corrupt.png"]
    printed = capsys.readouterr().out
    assert "Faces written: 5" in printed and "corrupt.png" in printed

    names = ["astronaut_0.png", "sub/astronaut_0.png", "grey_0.png", "rgba_0.png", "phone_0.png"]
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*.png")) == sorted(names)
    records = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["output"] for r in records) == sorted(names)
    for record in records:
        assert os.path.isfile(record["source"]) and np.shape(record["landmarks"]) == (68, 2)
        assert np.shape(record["quad"]) == (4, 2)
        # The manifest is enough to recreate the face.
        if record["output"] == "astronaut_0.png":
            recreated = warp_quad(Image.open(record["source"]).convert("RGB"), np.array(record["quad"]), **FAST)
            assert np.array_equal(np.asarray(recreated), np.asarray(Image.open(output / record["output"])))

    reference = upright.image
    grey = np.asarray(Image.open(output / "grey_0.png"))
    assert grey.shape == (SIZE, SIZE, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    assert psnr(Image.open(output / "astronaut_0.png"), reference) > 45
    assert psnr(Image.open(output / "rgba_0.png"), reference, central_disc()) > 35
    assert psnr(Image.open(output / "phone_0.png"), reference, central_disc()) > 28  # upright, despite EXIF

    # A second run skips what is finished, rewrites nothing and keeps the manifest whole.
    mtimes = {name: (output / name).stat().st_mtime_ns for name in names}
    again = align_faces.main(args)
    assert (again.images_skipped, again.faces_written, len(again.failures)) == (5, 0, 1)
    assert {name: (output / name).stat().st_mtime_ns for name in names} == mtimes
    assert len((output / "manifest.jsonl").read_text().splitlines()) == 5

    redone = align_faces.main(args + ["--overwrite"])
    assert (redone.images_skipped, redone.faces_written) == (0, 5)
    assert len((output / "manifest.jsonl").read_text().splitlines()) == 5


def test_script_rejects_bad_arguments_clearly(tmp_path, messy_folder, expect_input_error):
    assert "transform_size" in expect_input_error(
        align_faces.main, [str(messy_folder), "--output_dir", str(tmp_path), "--output_size", "512",
                           "--transform_size", "256"])
    assert "does not exist" in expect_input_error(align_faces.main, [str(tmp_path / "missing"), "--output_dir", str(tmp_path)])
