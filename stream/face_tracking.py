"""The face-tracking stage: landmarks -> smoothed alignment points -> LatentSync crop, every frame, or None.

The config picks the landmarks (``face.landmarks``, stream/alignment_points.py); the points are smoothed
causally (stream/landmark_smoothing.py) before the aligner, which keeps upstream's nose bias on top.
"""

from __future__ import annotations

from stream.alignment_points import MAPPINGS
from stream.face_alignment import FaceAligner
from stream.face_landmarks import FaceLandmarker
from stream.frames import Control, FaceFrame, VideoFrame
from stream.landmark_smoothing import PointSmoother

# After this many frames without a face the smoothing state is stale: the next face starts fresh.
FORGET_AFTER_MISSES = 5


class FaceTracking:
    name = "face"

    def __init__(self, config: dict, landmarker: FaceLandmarker | None = None):
        self.landmarker = landmarker or FaceLandmarker(mapping=MAPPINGS[config["face"]["landmarks"]])
        self.smoother = PointSmoother(config["fps"])
        self.aligner = FaceAligner(config["resolution"])
        self.frames_without_face = 0
        self._misses = 0

    def process(self, frame: VideoFrame) -> list[FaceFrame]:
        points = self.landmarker.alignment_points(frame.image)
        if points is None:
            self.frames_without_face += 1
            self._misses += 1
            if self._misses == FORGET_AFTER_MISSES:
                self._forget()
            return [FaceFrame(frame, None)]
        self._misses = 0
        return [FaceFrame(frame, self.aligner.align(frame.image, self.smoother(points)))]

    def control(self, command: Control) -> None:
        if command.kind == "avatar":  # another face: nothing to track or smooth from
            self._forget()
            self.landmarker.reset()
            self._misses = 0

    def flush(self) -> list[FaceFrame]:
        self.close()
        return []

    def close(self) -> None:
        self.landmarker.close()

    def _forget(self) -> None:
        self.aligner.reset()
        self.smoother.reset()
