"""An independent 68-point (iBUG) reference for face alignment: dlib's shape predictor.

LatentSync 1.5 aligned on ``face_alignment``'s 68 iBUG points; dlib's predictor annotates the same 68
points with a different model (an ensemble of regression trees, trained on iBUG 300-W), so it checks
our MediaPipe stand-ins from outside. Measurement only: nothing in ``stream/`` imports it.

Needs the ``test`` extra: ``dlib-bin`` (a prebuilt dlib) and ``face-recognition-models``, which ships
shape_predictor_68_face_landmarks.dat. ``face_recognition_models`` itself imports ``pkg_resources``
(gone from recent setuptools), so the .dat is found through the package's location instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

# dlib's HOG detector finds faces from ~80 px up; faces in our clips are 180-260 px wide, so a quarter-size
# copy upsampled once (an effective half size) finds them all at a fifth of the cost of the full frame.
DETECT_SCALE = 0.25
DETECT_UPSAMPLE = 1

# The iBUG index groups that upstream's recipes average (0-based, as face_alignment returns them).
BROW_IMAGE_LEFT = list(range(17, 22))
BROW_IMAGE_RIGHT = list(range(22, 27))
NOSE_15 = list(range(27, 36))  # 1.5: the whole nose, bridge (27-30) and base (31-35)
# 1.6 averages InsightFace 2d106 points 74, 77, 83, 86. 74 and 86 are iBUG 29 and 30 under the usual
# 106 -> 68 map; 77 and 83 have no iBUG twin (they sit on the sides of the nose, above the nostril
# wings): iBUG 31 and 35, the outer ends of the nose base, are the nearest. A proxy, not 1.6's points.
NOSE_16_PROXY = [29, 30, 31, 35]
MOUTH = list(range(48, 68))


def predictor_path() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("face_recognition_models is not installed (pip install -e '.[test]')")
    return Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"


class Ibug68:
    """68 iBUG landmarks of the largest face in an RGB image, detected afresh in every frame."""

    def __init__(self) -> None:
        import dlib  # the test extra; imported here so that the module loads without it

        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(predictor_path()))
        self._rectangle = dlib.rectangle

    def landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """(68, 2) float64 pixels, or None when dlib finds no face."""
        small = cv2.resize(rgb, None, fx=DETECT_SCALE, fy=DETECT_SCALE, interpolation=cv2.INTER_AREA)
        boxes = self._detector(small, DETECT_UPSAMPLE)
        if not boxes:
            return None
        box = max(boxes, key=lambda b: b.width() * b.height())
        full = self._rectangle(*(round(v / DETECT_SCALE) for v in (box.left(), box.top(), box.right(), box.bottom())))
        shape = self._predictor(rgb, full)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def alignment_points(ibug: np.ndarray, nose: list[int] = NOSE_15) -> np.ndarray:
    """(3, 2): upstream's three points from 68 landmarks (image-left brow, image-right brow, nose)."""
    return np.stack([ibug[BROW_IMAGE_LEFT].mean(0), ibug[BROW_IMAGE_RIGHT].mean(0), ibug[nose].mean(0)])


def mouth_point(ibug: np.ndarray) -> np.ndarray:
    """The mouth centre: the mean of all 20 lip points (48-67)."""
    return ibug[MOUTH].mean(0)
