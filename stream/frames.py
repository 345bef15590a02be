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
    """One decoded picture, RGB uint8 (H, W, 3), at output frame ``index``."""

    index: int
    pts: float
    image: np.ndarray


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


@dataclass(slots=True)
class Window:
    """Up to ``window_size`` consecutive frames that the model denoises together."""

    frames: list[FaceFrame]

    @property
    def faces(self) -> list[FaceFrame]:
        return [f for f in self.frames if f.face is not None]


@dataclass(slots=True)
class GeneratedFrame:
    """A frame whose face crop the model has regenerated (``mouth`` is None when passed through)."""

    source: FaceFrame
    mouth: np.ndarray | None


@dataclass(slots=True)
class StageTimes:
    """Wall time spent per stage, for the closing summary and the benchmark."""

    seconds: dict[str, float] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float, items: int = 1) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.items[stage] = self.items.get(stage, 0) + items
