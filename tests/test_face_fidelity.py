"""Face alignment against an independent 68-point reference (dlib), and the smoothing's jitter and lag.

Runs bench/face_alignment.py's measures on ../shared/media: every frame of speaker_wide.mp4 (250) and
anime_speaker.mp4 (268), and portrait.png; dlib and FaceMesh on every frame is most of the ~45 s this
module takes on 2 cores. The stand-ins were calibrated on speaker_wide.mp4 only; the others are held out.
"""

from __future__ import annotations

import importlib.util

import pytest

# face_recognition_models cannot be imported on recent setuptools (it wants pkg_resources): look it up.
if importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("needs the test extra (dlib-bin, face-recognition-models): pip install -e '.[test]'",
                allow_module_level=True)

from bench import face_alignment as fa  # noqa: E402
from stream.alignment_points import MAPPINGS  # noqa: E402
from stream.landmark_smoothing import PointSmoother  # noqa: E402

REAL_FACES = ("speaker_wide.mp4", "portrait.png")
STYLISED = "anime_speaker.mp4"


@pytest.fixture(scope="module")
def tracked():
    return fa.track_all()


def residual_percent(tracked, name: str, mapping: str) -> float:
    return fa.percent(fa.residuals(tracked[0][name], MAPPINGS[mapping], fa.REFERENCE_NOSE[mapping]))


def test_every_frame_has_both_faces(tracked):
    clips, _ = tracked
    assert {name: len(t.both) for name, t in clips.items()} == {
        "speaker_wide.mp4": 250, "anime_speaker.mp4": 268, "portrait.png": 1}


@pytest.mark.parametrize("name", REAL_FACES)
def test_15_stand_ins_put_the_mouth_where_the_68_point_recipe_does(tracked, name):
    # Measured 0.89 % (speaker_wide, calibration clip) and 0.89 % (portrait, held out); before: 1.80, 1.35.
    assert residual_percent(tracked, name, "ibug68") <= 1.5


def test_15_stand_ins_on_the_stylised_face(tracked):
    # Held out. FaceMesh and dlib agree about the drawn nose but not the drawn brows (FaceMesh's stop short
    # of the strokes' ends and sit ~7 px farther apart in the crop): no fixed mapping found is within 1.5 %
    # here and on the real faces at once (README, 'Fidelity'). Measured 2.35 % (before: 3.21 %); this bound
    # catches regressions.
    assert residual_percent(tracked, STYLISED, "ibug68") <= 2.8


@pytest.mark.parametrize("name, bound", [("speaker_wide.mp4", 1.5), ("portrait.png", 1.5), (STYLISED, 3.0)])
def test_16_stand_ins_against_the_proxy_of_its_106_points(tracked, name, bound):
    # Measured 0.93 / 0.92 / 2.21 % against a dlib proxy of InsightFace's points (see ibug_reference).
    assert residual_percent(tracked, name, "insightface106") <= bound


@pytest.mark.parametrize("name", ["speaker_wide.mp4", STYLISED])
def test_smoothed_tracking_jitters_less_than_before(tracked, name):
    clip = tracked[0][name]
    before = fa.clip_jitter(clip, fa.BEFORE, None)
    now = fa.clip_jitter(clip, MAPPINGS["ibug68"], PointSmoother(fa.FPS))
    # Measured 1.98 -> 1.77 and 5.67 -> 5.59 px; the mouth's own motion while speaking is most of the rest.
    assert now < before - 0.05, f"{before:.2f} -> {now:.2f} px"


def test_lag_on_a_fast_head_motion_stays_small(tracked):
    clips, frames = tracked
    turn = fa.fast_turn(frames, clips["speaker_wide.mp4"], MAPPINGS["ibug68"])
    worst, mean = fa.lag(turn, PointSmoother(fa.FPS))
    # Measured 3.0 px worst, 2.4 px mean while moving, for a head-width move and 15 degree roll in 0.24 s.
    assert worst <= 4.0 and mean <= 3.0, f"worst {worst:.2f}, mean {mean:.2f} px"
