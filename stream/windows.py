"""Where the stream is cut into the fixed-length windows the U-Net denoises together."""

from __future__ import annotations

from stream.frames import FaceFrame, Window


class Windowing:
    """Groups consecutive frames into windows of ``size`` (LatentSync: 16); the last may be shorter."""

    name = "windows"

    def __init__(self, size: int = 16):
        self.size = size
        self._pending: list[FaceFrame] = []

    def process(self, frame: FaceFrame) -> list[Window]:
        self._pending.append(frame)
        if len(self._pending) < self.size:
            return []
        return self.flush()

    def flush(self) -> list[Window]:
        window, self._pending = self._pending, []
        return [Window(window)] if window else []
