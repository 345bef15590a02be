"""Where the stream is cut into the windows the U-Net denoises together: the ring buffer.

Windows hold up to ``size`` frames (LatentSync: 16) and advance by ``stride`` frames. Each window
is the ``stride`` newest frames plus the frames before them that fit, which earlier windows
already emitted: the model sees them again as context (their latents are carried, see
``stream/generation.py``) but only the new frames are output. ``stride == size`` gives upstream's
independent windows. At the start of a stream windows grow (stride, 2·stride, ...) rather than
waiting for ``size`` frames, so the first output is one stride away, not one window.
"""

from __future__ import annotations

from stream.frames import Control, FaceFrame, Window


class Windowing:
    name = "windows"

    def __init__(self, size: int = 16, stride: int | None = None):
        self.size = size
        self.stride = stride or size
        if not 1 <= self.stride <= size:
            raise ValueError(f"stride must be in 1..{size}, got {stride}")
        self._context: list[FaceFrame] = []
        self._new: list[FaceFrame] = []

    def process(self, frame: FaceFrame) -> list[Window]:
        self._new.append(frame)
        return self.flush() if len(self._new) >= self.stride else []

    def control(self, command: Control) -> None:
        if command.kind in ("interrupt", "avatar"):  # what follows does not continue what came before
            self._context = []
        elif command.kind == "options":
            self.stride = command.value.stride

    def flush(self) -> list[Window]:
        if not self._new:
            return []
        window = Window(self._context + self._new, first_new=len(self._context))
        self._context = window.frames[-(self.size - self.stride):] if self.size > self.stride else []
        self._new = []
        return [window]
