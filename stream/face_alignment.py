"""LatentSync's face alignment: warp a face into the model's square crop from three points.

Follows ``AlignRestore`` in LatentSync (itself from StyleSync). A similarity transform takes the two
eyebrow centres and the nose onto a fixed template; the warped 3:4 crop is then squashed to a square.
Upstream warps with kornia and truncates to uint8; cv2.warpAffine (same pixel-centre convention) rounds.
"""

from __future__ import annotations

import cv2
import numpy as np

from stream.frames import AlignedFace

# Image-left brow, image-right brow and nose in a 75x100 crop; scaled by resolution / 256 * 2.8.
TEMPLATE = np.array([[17.0, 20.0], [58.0, 20.0], [37.5, 40.0]])
CROP = (75, 100)
FILL = 127
SMOOTH_KEEP = 0.2  # weight of the previous frame's nose bias


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 rotation + uniform scale + translation taking ``src`` points (N, 2) onto ``dst`` (N, 2).

    The rotation is the least-squares (SVD) one; the scale is the ratio of the two point spreads, as
    upstream computes it (not the Umeyama optimum, which would shrink the scale by the fit quality).
    """
    c1, s1, n1 = _normalise(src)
    c2, s2, n2 = _normalise(dst)
    u, _, vt = np.linalg.svd(n1.T @ n2)
    r = vt.T @ u.T
    if np.linalg.det(r) < 0:
        vt[-1] *= -1
        r = vt.T @ u.T
    sr = (s2 / s1) * r
    return np.hstack([sr, (c2 - sr @ c1)[:, None]])


class FaceAligner:
    """Aligns faces for a model of square ``resolution``; keeps the nose bias of one stream.

    Upstream's only temporal smoothing is a translation bias: the nose's offset from the template nose,
    each set in its own normalised coordinates (centred on the 3-point mean, divided by their standard
    deviation), blended as ``0.2 * previous + 0.8 * current`` and added to the translation in crop pixels
    as it is, unscaled. It is small (under half a pixel on speaker_wide.mp4); we keep it for parity.
    Upstream also rounds the three points to whole pixels first; we keep them fractional, since rounding
    only adds jitter on small faces.
    """

    def __init__(self, resolution: int = 256, smooth: bool = True) -> None:
        ratio = resolution / 256 * 2.8
        self.resolution = resolution
        self.smooth = smooth
        self.template = TEMPLATE * ratio
        self.crop_size = (round(CROP[0] * ratio), round(CROP[1] * ratio))
        self.bias: np.ndarray | None = None

    def transform(self, points: np.ndarray) -> np.ndarray:
        """The frame -> crop affine (2x3 float64) for alignment ``points`` (3, 2); advances the smoothing."""
        points = np.asarray(points, dtype=np.float64)
        m = similarity_transform(points, self.template)
        if self.smooth:
            bias = _normalise(self.template)[2][2] - _normalise(points)[2][2]
            if self.bias is not None:
                bias = SMOOTH_KEEP * self.bias + (1 - SMOOTH_KEEP) * bias
            self.bias = bias
            m[:, 2] += bias
        return m

    def align(self, rgb: np.ndarray, points: np.ndarray) -> AlignedFace:
        """Warp the face at ``points`` out of ``rgb`` into a (resolution, resolution, 3) uint8 crop."""
        m = self.transform(points)
        crop = cv2.warpAffine(rgb, m, self.crop_size, flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL, FILL, FILL))
        image = cv2.resize(crop, (self.resolution, self.resolution), interpolation=cv2.INTER_LANCZOS4)
        return AlignedFace(image=image, affine=m, crop_size=self.crop_size)

    def reset(self) -> None:
        """Drop the smoothing state (a new stream, or the face was lost for long)."""
        self.bias = None


def _normalise(points: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Centre, spread and normalised points; the spread is torch.std's (all coordinates, N - 1)."""
    centre = points.mean(axis=0)
    centred = points - centre
    spread = centred.std(ddof=1)
    return centre, spread, centred / spread
