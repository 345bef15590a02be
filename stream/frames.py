"""The typed frames that travel between pipeline stages.

Everything that moves through the pipeline is one of these small dataclasses. Timestamps are
seconds on the output media clock (frame ``index / fps``), so every stage can reason about
time without knowing where the media came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class VideoFrame:
    """One decoded picture, RGB uint8 (H, W, 3), at output frame ``index``.

    ``captured_at`` is the wall-clock (``time.monotonic``) moment a live frame was captured, and
    ``marks`` the moment each stage finished with it: the latency accounting. Files leave both empty.
    """

    index: int
    pts: float
    image: np.ndarray
    captured_at: float | None = None
    marks: dict[str, float] = field(default_factory=dict)

    def stamp(self, stage: str, now: float) -> None:
        self.marks[stage] = now


@dataclass(slots=True)
class AlignedFace:
    """A face warped into the model's square crop, plus what is needed to paste it back.

    ``affine`` maps frame pixels to crop pixels (2x3, float64) in the un-squashed crop of size
    ``crop_size`` (w, h); the crop is then resized to ``image``'s square resolution.
    """

    image: np.ndarray
    affine: np.ndarray
    crop_size: tuple[int, int]


@dataclass(slots=True)
class FaceFrame:
    """A video frame with its aligned face (``None`` when no face was found)."""

    frame: VideoFrame
    face: AlignedFace | None
    audio: np.ndarray | None = None  # (50, 384) Whisper chunk for this frame
    # How much of the generated mouth to show: 1 while speaking, 0 in silence (the original face),
    # in between during the cross-fade at speech <-> silence transitions.
    speech: float = 1.0

    def stamp(self, stage: str, now: float) -> None:
        self.frame.marks[stage] = now


@dataclass(slots=True)
class Window:
    """Up to ``window_size`` consecutive frames that the model denoises together.

    ``frames[:first_new]`` were already emitted by earlier windows (context carried in the ring
    buffer); ``frames[first_new:]`` are this window's output.
    """

    frames: list[FaceFrame]
    first_new: int = 0

    @property
    def new_frames(self) -> list[FaceFrame]:
        return self.frames[self.first_new :]

    def stamp(self, stage: str, now: float) -> None:
        for frame in self.new_frames:
            frame.stamp(stage, now)


@dataclass(slots=True)
class GeneratedFrame:
    """A frame whose face crop the model has regenerated (``mouth`` is None when passed through)."""

    source: FaceFrame
    mouth: np.ndarray | None

    def stamp(self, stage: str, now: float) -> None:
        self.source.stamp(stage, now)


@dataclass(slots=True)
class StageTimes:
    """Wall time spent per stage, for the closing summary and the benchmark."""

    seconds: dict[str, float] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float, items: int = 1) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.items[stage] = self.items.get(stage, 0) + items
