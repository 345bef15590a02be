"""Face geometry: landmarks, LatentSync alignment, the mouth mask and paste-back."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest
from safetensors.numpy import load_file

from av_helpers import decode, psnr
from stream.compositing import PasteBack, paste_back, paste_mask
from stream.config import CONFIG_DIR, ConfigError, load_config
from stream.face_alignment import TEMPLATE, FaceAligner, similarity_transform
from stream.face_landmarks import FaceLandmarker
from stream.frames import FaceFrame, GeneratedFrame, VideoFrame
from stream.landmark_smoothing import PointSmoother
from stream.mouth_mask import MASK_PNG, latent_mask, mouth_mask

SAMPLE_EVERY = 25  # frames kept in memory for the geometry checks (a 1080x1920 frame is 6 MB)


@dataclass
class TrackedVideo:
    points: list[np.ndarray | None]  # alignment points of every frame, tracked in video mode
    samples: dict[int, np.ndarray]  # frame index -> RGB frame, every SAMPLE_EVERY frames


@pytest.fixture(scope="module")
def speaker(media) -> TrackedVideo:
    points, samples = [], {}
    with FaceLandmarker() as landmarker:
        for index, rgb in enumerate(decode(media / "speaker_wide.mp4")):
            points.append(landmarker.alignment_points(rgb))
            if index % SAMPLE_EVERY == 0:
                samples[index] = rgb
    return TrackedVideo(points, samples)


# --- landmarks -------------------------------------------------------------------------------------


def test_the_small_face_is_found_in_nearly_every_frame(speaker):
    found = sum(p is not None for p in speaker.points)
    assert len(speaker.points) == 250
    assert found / len(speaker.points) >= 0.95, f"face found in {found}/250 frames"


def test_points_are_brows_then_nose_in_template_order(speaker):
    for points in speaker.points:
        if points is None:
            continue
        assert points.shape == (3, 2) and points.dtype == np.float64
        left, right, nose = points
        assert left[0] < nose[0] < right[0]
        assert nose[1] > max(left[1], right[1])


def test_no_face_gives_none_and_the_face_is_found_again(media):
    frames = list(decode(media / "speaker_wide.mp4", limit=30))
    for rgb in frames[8:16]:
        rgb[:] = 0
    frames[16][:] = 127
    frames[17][:] = np.random.default_rng(0).integers(0, 256, frames[17].shape, dtype=np.uint8)
    with FaceLandmarker() as landmarker:
        found = [landmarker.alignment_points(rgb) is not None for rgb in frames]
    assert found == [True] * 8 + [False] * 10 + [True] * 12


def test_a_still_image_and_the_largest_of_two_faces(media):
    portrait = cv2.cvtColor(cv2.imread(str(media / "portrait.png")), cv2.COLOR_BGR2RGB)
    h, w = portrait.shape[:2]
    small = cv2.resize(portrait, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((h, w + w // 2, 3), np.uint8)
    canvas[: h // 2, : w // 2] = small  # the smaller face comes first, on the left
    canvas[:, w // 2 :] = portrait
    with FaceLandmarker(static_image=True) as landmarker:
        alone = landmarker.alignment_points(portrait)
        chosen = landmarker.alignment_points(canvas)
    assert alone is not None and chosen is not None
    np.testing.assert_allclose(chosen - (w // 2, 0), alone, atol=3)


def test_each_config_names_its_landmark_mapping(tmp_path):
    chosen = {name: load_config(name)["face"]["landmarks"] for name in ("latentsync-1.5", "latentsync-1.6", "tiny")}
    assert chosen == {"latentsync-1.5": "ibug68", "latentsync-1.6": "insightface106", "tiny": "ibug68"}
    text = (CONFIG_DIR / "tiny.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("landmarks: ibug68", "landmarks: dlib5"))
    with pytest.raises(ConfigError, match="face.landmarks must be one of ibug68, insightface106"):
        load_config(bad)


# --- smoothing -------------------------------------------------------------------------------------


FACE = np.array([[300.0, 400.0], [420.0, 400.0], [360.0, 470.0]])  # brows 120 px apart


def test_smoother_passes_the_first_frame_and_a_still_face_through():
    smoother = PointSmoother(25)
    for _ in range(10):
        np.testing.assert_allclose(smoother(FACE), FACE, rtol=0, atol=1e-9)


def test_smoother_damps_noise_on_a_still_face():
    noise = np.random.default_rng(0).normal(0, 1.0, (200, 3, 2))  # 1 px landmark noise
    smoother = PointSmoother(25)
    out = np.array([smoother(FACE + n) for n in noise])
    second = lambda x: np.abs(np.diff(x, n=2, axis=0)).mean()  # noqa: E731
    assert second(out) < 0.5 * second(FACE + noise)


def test_smoother_follows_a_fast_move_within_a_few_frames():
    smoother = PointSmoother(25)
    smoother(FACE)
    # A jump of one brow distance in a frame (a fast turn): most of it passes at once, the rest soon.
    first = smoother(FACE + [120.0, 0.0])
    assert first[0, 0] - FACE[0, 0] > 60
    for _ in range(4):
        settled = smoother(FACE + [120.0, 0.0])
    np.testing.assert_allclose(settled, FACE + [120.0, 0.0], atol=1.0)
    smoother.reset()
    np.testing.assert_allclose(smoother(FACE), FACE, rtol=0, atol=1e-9)


# --- alignment -------------------------------------------------------------------------------------


def apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:, :2].T + affine[:, 2]


def test_crop_size_follows_resolution():
    assert FaceAligner(256).crop_size == (210, 280)
    assert FaceAligner(512).crop_size == (420, 560)


def test_similarity_transform_recovers_an_exact_similarity():
    angle, scale, shift = 0.3, 1.7, np.array([-40.0, 25.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    truth = np.hstack([scale * rotation, shift[:, None]])
    src = np.array([[100.0, 80.0], [190.0, 95.0], [140.0, 160.0]])
    np.testing.assert_allclose(similarity_transform(src, apply(truth, src)), truth, atol=1e-9)


def test_detected_points_land_on_the_template(speaker):
    aligner = FaceAligner(256, smooth=False)
    residuals = [np.abs(apply(aligner.transform(p), p) - aligner.template).max()
                 for p in speaker.points if p is not None]
    # Three points, four degrees of freedom: what is left is this face's shape against the template's
    # (its nose sits lower under the brows than the template's). Measured with the 1.6 stand-ins (the
    # landmarker's default): 10.9 px on average, 14.2 at worst (8 and 11.5 with the uncalibrated points).
    assert np.mean(residuals) < 12.5 and max(residuals) < 17, f"mean {np.mean(residuals):.1f}, worst {max(residuals):.1f} px"


def test_smoothing_bias_follows_the_upstream_formula():
    aligner = FaceAligner(256)
    template = aligner.template

    def normalised_nose(points):
        centred = points - points.mean(axis=0)
        return (centred / centred.std(ddof=1))[2]

    first = np.array([[300.0, 400.0], [420.0, 405.0], [362.0, 470.0]])
    second = first + [[3.0, -2.0], [1.0, 0.0], [-2.0, 4.0]]
    plain = FaceAligner(256, smooth=False)

    # float64, the formula restated: only rounding separates the two (bias ~0.1, shifts ~300 px)
    tight = {"rtol": 1e-9, "atol": 1e-9}
    m1 = aligner.transform(first)
    bias1 = normalised_nose(template) - normalised_nose(first)
    np.testing.assert_allclose(aligner.bias, bias1, **tight)
    np.testing.assert_allclose(m1[:, 2], plain.transform(first)[:, 2] + bias1, **tight)

    m2 = aligner.transform(second)
    bias2 = 0.2 * bias1 + 0.8 * (normalised_nose(template) - normalised_nose(second))
    np.testing.assert_allclose(aligner.bias, bias2, **tight)
    np.testing.assert_allclose(m2[:, 2], plain.transform(second)[:, 2] + bias2, **tight)
    np.testing.assert_allclose(m2[:, :2], plain.transform(second)[:, :2], **tight)

    aligner.reset()
    assert aligner.bias is None


def test_aligned_face_is_square_and_keeps_its_affine(speaker):
    index, rgb = next(iter(speaker.samples.items()))
    face = FaceAligner(256).align(rgb, speaker.points[index])
    assert face.image.shape == (256, 256, 3) and face.image.dtype == np.uint8
    assert face.affine.shape == (2, 3) and face.crop_size == (210, 280)
    # The brows of the square crop sit where the squashed template puts them.
    squash = np.array([256 / 210, 256 / 280])
    brows = apply(face.affine, speaker.points[index])[:2] * squash
    np.testing.assert_allclose(brows, TEMPLATE[:2] * 2.8 * squash, atol=12)


# --- mask ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_fixture(fixtures):
    return load_file(str(fixtures / "mask_tensors.safetensors"))


def test_mask_at_256_is_latentsyncs(mask_fixture):
    mask = mouth_mask(256)
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask, mask_fixture["mask_png_256_u8"] / 255)  # 0/255 only: 0.0 and 1.0
    assert MASK_PNG.stat().st_size < 2000


def test_mask_at_512_matches_upstreams_lanczos_resize(mask_fixture):
    mask = mouth_mask(512)
    np.testing.assert_allclose(mask, mask_fixture["mask_512_lanczos_u8"] / 255, atol=1e-6)
    assert mask.min() >= 0 and mask.max() <= 1


def test_latent_masks_match(mask_fixture):
    # Exact: nearest sampling picks values of cv2's uint8 resize (fixed-point for 8-bit Lanczos) / 255.
    small = latent_mask(256, 32)
    np.testing.assert_array_equal(small, mask_fixture["mask_latent_32"])
    assert (small == 0).sum() == 422
    np.testing.assert_array_equal(latent_mask(512, 64), mask_fixture["mask_latent_64"])


# --- paste-back ------------------------------------------------------------------------------------


def test_round_trip_restores_the_frame(speaker):
    aligner = FaceAligner(256)
    scores = []
    for index, rgb in speaker.samples.items():
        face = aligner.align(rgb, speaker.points[index])
        restored = paste_back(rgb, face.image, face)
        weight = paste_mask(face, rgb.shape)
        outside = weight == 0
        np.testing.assert_array_equal(restored[outside], rgb[outside])
        assert 0 < weight.max() <= 1 and (~outside).sum() > 20_000
        scores.append((psnr(restored, rgb), psnr(restored[~outside], rgb[~outside])))
    frame_psnr, face_psnr = np.array(scores).T
    assert frame_psnr.min() >= 35, f"whole-frame PSNR {frame_psnr.min():.1f} dB"
    # Two resamplings each way soften the face; a misplaced paste would score far lower.
    assert face_psnr.min() >= 28, f"PSNR inside the paste mask {face_psnr.min():.1f} dB"


def test_paste_stage_passes_frames_without_a_face_through(speaker):
    index, rgb = next(iter(speaker.samples.items()))
    frame = VideoFrame(index, index / 25, rgb)
    stage = PasteBack()
    assert stage.process(GeneratedFrame(FaceFrame(frame, None), None))[0] is frame
    face = FaceAligner(256).align(rgb, speaker.points[index])
    grey = np.full_like(face.image, 127)
    (pasted,) = stage.process(GeneratedFrame(FaceFrame(frame, face), grey))
    assert pasted.index == index and not np.array_equal(pasted.image, rgb)
    np.testing.assert_array_equal(pasted.image, paste_back(rgb, grey, face))
