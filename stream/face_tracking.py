"""The face-tracking stage: landmarks -> LatentSync alignment for every frame, or None."""

from __future__ import annotations

from stream.face_alignment import FaceAligner
from stream.face_landmarks import FaceLandmarker
from stream.frames import Control, FaceFrame, VideoFrame

# After this many frames without a face the smoothing state is stale: the next face starts fresh.
FORGET_AFTER_MISSES = 5


class FaceTracking:
    name = "face"

    def __init__(self, resolution: int, landmarker: FaceLandmarker | None = None):
        self.landmarker = landmarker or FaceLandmarker()
        self.aligner = FaceAligner(resolution)
        self.frames_without_face = 0
        self._misses = 0

    def process(self, frame: VideoFrame) -> list[FaceFrame]:
        points = self.landmarker.alignment_points(frame.image)
        if points is None:
            self.frames_without_face += 1
            self._misses += 1
            if self._misses == FORGET_AFTER_MISSES:
                self.aligner.reset()
            return [FaceFrame(frame, None)]
        self._misses = 0
        return [FaceFrame(frame, self.aligner.align(frame.image, points))]

    def control(self, command: Control) -> None:
        if command.kind == "avatar":  # another face: nothing to track or smooth from
            self.aligner.reset()
            self.landmarker.reset()
            self._misses = 0

    def flush(self) -> list[FaceFrame]:
        self.close()
        return []

    def close(self) -> None:
        self.landmarker.close()
