"""Causal smoothing of the three alignment points: a one-euro filter in face-relative units.

Landmarks from a per-frame model jitter by a pixel or two; the crop follows them, and the mouth point,
which lies below the three points, feels their noise amplified. A one-euro filter (Casiez, Roussel and
Vogel, CHI 2012) is a first-order low-pass whose cutoff rises with the points' speed: heavy smoothing
while the head is still, almost none on a fast turn, so it cuts jitter without the lag a fixed low-pass
shows. It looks at past frames only, so it runs live.

Speeds and cutoffs are measured in face-relative units, brow distances per second (the distance between
the two brow points), so one setting serves a small face in a wide shot and a close-up alike.
LatentSync 1.5 smoothed its 68 landmarks with a similar causal rule (``laplacianSmooth``: each point moves
by a weight that falls with the squared pixel step); 1.6 smooths none. Both keep the nose bias
(``FaceAligner``), which moves the crop by under a pixel.
"""

from __future__ import annotations

import math

import numpy as np

# Tuned with bench/face_alignment.py (jitter of the mouth point on the clips, lag on a synthetic fast turn).
# Larger BETA or SPEED_CUTOFF_HZ: less lag, more jitter. On speaker_wide.mp4 these keep 80 % of the jitter
# reduction that a near-still filter reaches (beta 2) at a fifth of its lag (3 px, not 10-19 px).
MIN_CUTOFF_HZ = 1.0  # the cutoff of a still head
BETA = 8.0  # cutoff gain, Hz per (brow distance / s) of speed
SPEED_CUTOFF_HZ = 10.0  # low-pass on the speed estimate: opens within a frame or two of a turn


def _alpha(cutoff_hz: float, dt: float) -> float:
    """The exponential-smoothing weight of the new sample for a first-order low-pass at ``cutoff_hz``."""
    tau = 1 / (2 * math.pi * cutoff_hz)
    return 1 / (1 + tau / dt)


class PointSmoother:
    """One-euro filter over (3, 2) alignment points of one stream; feed frames in order.

    ``fps`` sets the time step (frames are evenly spaced in every pipeline that uses this). The speed
    that opens the filter is the largest of the three points' speeds, so the crop's translation, scale
    and rotation open together.
    """

    def __init__(self, fps: float, min_cutoff_hz: float = MIN_CUTOFF_HZ, beta: float = BETA,
                 speed_cutoff_hz: float = SPEED_CUTOFF_HZ) -> None:
        self.dt = 1 / fps
        self.min_cutoff_hz = min_cutoff_hz
        self.beta = beta
        self.speed_cutoff_hz = speed_cutoff_hz
        self.points: np.ndarray | None = None
        self.speed = 0.0  # filtered, in brow distances per second

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """The smoothed (3, 2) float64 points for this frame's raw ``points`` (3, 2)."""
        points = np.asarray(points, dtype=np.float64)
        if self.points is None:
            self.points = points.copy()
            return points.copy()
        brow_distance = max(float(np.linalg.norm(points[1] - points[0])), 1e-6)
        raw_speed = float(np.linalg.norm(points - self.points, axis=1).max()) / brow_distance / self.dt
        self.speed += _alpha(self.speed_cutoff_hz, self.dt) * (raw_speed - self.speed)
        weight = _alpha(self.min_cutoff_hz + self.beta * self.speed, self.dt)
        self.points = self.points + weight * (points - self.points)
        return self.points.copy()

    def reset(self) -> None:
        """Forget the past (a new stream, another face, or the face was lost for long)."""
        self.points = None
        self.speed = 0.0
