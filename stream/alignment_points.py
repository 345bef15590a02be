"""Which MediaPipe FaceMesh landmarks stand in for the three points each LatentSync version aligned on.

The U-Net works best on crops aligned as its training crops were, and upstream's two versions built their
three points (image-left brow, image-right brow, nose) from different landmark models:

* ``ibug68`` (LatentSync 1.5, ``face_alignment``): means of iBUG 17-21, 22-26 and 27-35 (the whole nose,
  bridge and base).
* ``insightface106`` (LatentSync 1.6, InsightFace 2d106): means of 106-points [43, 48, 49, 51, 50], 101-105
  (the same brow points as iBUG 17-26 under the usual 106 -> 68 map) and [74, 77, 83, 86] (iBUG 29 and
  30, lower bridge and tip, plus a pair on the sides of the nose that has no iBUG twin).

No FaceMesh point is an iBUG or InsightFace point: the meshes annotate brows and nose differently (FaceMesh's
brow contours run wider than iBUG's brow points). So each stand-in is a mean of FaceMesh points chosen to
land where the reference mean lands, calibrated against dlib's 68-point predictor on speaker_wide.mp4 and
checked on held-out media (``bench/face_alignment.py``, README "Fidelity: face alignment"):

* brows, both mappings: the upper contour's middle (105, 66) and the lower contour's middle (53, 65);
  mirrored on the other brow. The exhaustive search over the brows' ten symmetric pairs picked these.
* nose, 1.5: iBUG 27-35 one to one, each by the FaceMesh point at the same place on the face: 168
  (between the eyes, 27), 197 and 5 down the bridge (28, 29), 4 (the tip, 30), and the base from
  wing to wing, 75, 97, 2, 326, 305 (31-35). It replaced a searched mean (4, 220/440, 115/344) that
  landed on the reference's mean on speaker_wide but not on a face of other proportions: the drawn
  anime face's long bridge, which only points along the bridge follow.
* nose, 1.6: upstream's structure (lower bridge 5, tip 4, one symmetric pair on the sides) with the pair
  (75/305, the alar wings) chosen by the same calibration against a dlib proxy of 74/77/83/86 (iBUG 29, 30,
  31, 35). InsightFace cannot run here (its models are a download), so 1.6's residual is against that proxy.

The indices are FaceMesh's 468-point topology (refine_landmarks=False).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AlignmentPoints:
    """Three groups of FaceMesh indices; each alignment point is the mean of its group."""

    brow_image_left: tuple[int, ...]
    brow_image_right: tuple[int, ...]
    nose: tuple[int, ...]

    def __call__(self, landmarks: np.ndarray) -> np.ndarray:
        """(3, 2) float64 points in template order from (468, 2) landmarks."""
        return np.stack([landmarks[list(group)].mean(axis=0)
                         for group in (self.brow_image_left, self.brow_image_right, self.nose)])


_BROW_IMAGE_LEFT = (105, 66, 53, 65)
_BROW_IMAGE_RIGHT = (334, 296, 283, 295)  # the mirror images of the left group, in the same order

MAPPINGS = {
    "ibug68": AlignmentPoints(_BROW_IMAGE_LEFT, _BROW_IMAGE_RIGHT, (168, 197, 5, 4, 75, 97, 2, 326, 305)),
    "insightface106": AlignmentPoints(_BROW_IMAGE_LEFT, _BROW_IMAGE_RIGHT, (5, 4, 75, 305)),
}
