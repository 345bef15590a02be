"""The typed frames that travel between pipeline stages.

Everything that moves through the pipeline is one of these small dataclasses. Timestamps are
seconds on the output media clock (frame ``index / fps``), so every stage can reason about
time without knowing where the media came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class Trace:
    """Where one live frame has been: the latency accounting, carried unchanged by every frame built from it.

    ``captured_at``: the ``time.monotonic()`` moment its picture arrived (a camera frame), or, for an
    avatar, the moment on the media clock whose audio it shows. ``due_at``: the clock tick it was
    taken on; overload policies judge lateness from it, so a camera that stalls does not make
    every window look late. ``marks``: the moment each stage finished with it. ``generated``: its
    mouth came out of the model (False: passed through, for silence, lateness or no face).
    """

    captured_at: float | None = None
    due_at: float | None = None
    marks: dict[str, float] = field(default_factory=dict)
    generated: bool = False


@dataclass(slots=True)
class VideoFrame:
    """One decoded picture, RGB uint8 (H, W, 3), at output frame ``index``.

    A stage that makes a new picture from this one keeps the same ``trace`` object
    (``dataclasses.replace(frame, image=...)``), so every emitted frame can be accounted for.
    Files leave the trace empty.
    """

    index: int
    pts: float
    image: np.ndarray
    trace: Trace = field(default_factory=Trace)

    def stamp(self, stage: str, now: float) -> None:
        self.trace.marks[stage] = now


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
    # The face's VAE condition latents (C, h, w) when they were made ahead (a prepared avatar);
    # None: the model stage encodes ``face`` itself.
    condition: torch.Tensor | None = None

    def stamp(self, stage: str, now: float) -> None:
        self.frame.trace.marks[stage] = now


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


@dataclass(frozen=True, slots=True)
class Control:
    """A command that travels through the pipeline in order with the frames, as END does.

    Each stage with a ``control(command)`` method applies it on its own thread when it gets there,
    so frames before it were made under the old state and frames after it under the new.
    ``kind``: "interrupt" (forget the speech in progress), "avatar" (``value``: the new avatar's
    frames as the ticks play them, or its ``PreparedAvatar``; forget the old face) or "options"
    (``value``: the new SessionOptions).
    """

    kind: str
    value: Any = None


@dataclass(slots=True)
class StageTimes:
    """Wall time spent per stage, for the closing summary and the benchmark."""

    seconds: dict[str, float] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float, items: int = 1) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.items[stage] = self.items.get(stage, 0) + items
