"""What a client may choose about a live session, as one typed object.

HTTP (``/offer``, ``POST /sessions``), MQTT and the command line all build these through
``from_json``, so a name, a type and a range are checked in one place and every transport answers a
bad value with the same message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from stream.audio_stream import RIGHT_CONTEXT_SECONDS


class OptionError(ValueError):
    """A session option or audio format that cannot be used: the message says which and why."""


@dataclass(frozen=True)
class AudioFormat:
    """PCM s16le as a program sends it: the rate and channel count are declared once, at creation."""

    rate: int = 16_000
    channels: int = 1

    def __post_init__(self) -> None:
        if not 8_000 <= self.rate <= 48_000:
            raise OptionError(f"audio rate {self.rate} Hz: want 8000 to 48000")
        if self.channels not in (1, 2):
            raise OptionError(f"audio channels {self.channels}: want 1 (mono) or 2 (stereo)")

    @property
    def bytes_per_frame(self) -> int:
        """Bytes per sample frame (one sample on every channel)."""
        return 2 * self.channels

    @classmethod
    def from_json(cls, data: Any) -> "AudioFormat":
        return _build(cls, data, "audio")


@dataclass(frozen=True)
class SessionOptions:
    """Tuning of one live session (see stream/live.py and README).

    ``stride``: frames a 16-frame window advances by (1-16; 16 = independent windows).
    ``late_after``: seconds after which a window passes through unchanged (None: never).
    ``vad``: gate the model with voice activity (silence shows the original face).
    ``fade_frames``: cross-fade length at speech/silence transitions.
    ``context_seconds``: audio the streaming Whisper encoder sees per call, before a frame's chunk ends.
    ``look_ahead``: seconds of audio past a frame that its features wait for, from the chunk's own
    0.1225 up to 1 (in whole 20 ms rows, rounded up); each second past 0.1225 adds a second of
    latency and is seen by the encoder's attention (README, "Live audio features", has the measured
    similarity per layer).
    ``buffer_seconds``: how much program audio (avatar sessions) may wait to be played.
    """

    stride: int = 4
    late_after: float | None = 0.4
    vad: bool = True
    fade_frames: int = 3
    context_seconds: float = 2.0
    look_ahead: float = RIGHT_CONTEXT_SECONDS
    buffer_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= 16:
            raise OptionError(f"option 'stride': {self.stride} is not in 1..16")
        if self.late_after is not None and not 0 < self.late_after <= 10:
            raise OptionError(f"option 'late_after': {self.late_after} is not in (0, 10] seconds or null")
        if not 1 <= self.fade_frames <= 25:
            raise OptionError(f"option 'fade_frames': {self.fade_frames} is not in 1..25")
        if not 0.5 <= self.context_seconds <= 30:
            raise OptionError(f"option 'context_seconds': {self.context_seconds} is not in 0.5..30")
        # a hair of slack below the chunk's reach, so that a client's literal 0.1225 is taken
        if not RIGHT_CONTEXT_SECONDS - 1e-9 <= self.look_ahead <= 1:
            raise OptionError(f"option 'look_ahead': {self.look_ahead} is not in "
                              f"{RIGHT_CONTEXT_SECONDS}..1 seconds (the chunk's own reach to 1 s)")
        if not 1 <= self.buffer_seconds <= 600:
            raise OptionError(f"option 'buffer_seconds': {self.buffer_seconds} is not in 1..600")

    @classmethod
    def from_json(cls, data: Any) -> "SessionOptions":
        return _build(cls, data, "options")

    def updated(self, data: Any) -> "SessionOptions":
        """These options with the fields named in ``data`` changed (checked like ``from_json``)."""
        return _build(type(self), {**dataclasses.asdict(self), **_as_dict(data, "options")}, "options")

    def as_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def window_late_after(self) -> float | None:
        """``late_after`` as the model stage judges it from a frame's tick: the look-ahead past the
        chunk's own is waited for on purpose, so it is not lateness."""
        return None if self.late_after is None else self.late_after + self.look_ahead - RIGHT_CONTEXT_SECONDS


# The JSON types a field accepts, from its annotation (ints are fine where a float is wanted; a
# bool is never taken for a number).
_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "float | None": (int, float, type(None))}


def _as_dict(data: Any, what: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionError(f'"{what}" must be a JSON object')
    return data


def _build(cls, data: Any, what: str):
    data = _as_dict(data, what)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in fields:
            label = "option" if what == "options" else f"{what} field"
            raise OptionError(f"unknown {label} {name!r}: use {', '.join(fields)}")
        kinds = _JSON_TYPES[str(fields[name].type)]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise OptionError(f"{what} {name!r}: {value!r} is not a "
                              f"{' or '.join('null' if k is type(None) else k.__name__ for k in kinds)}")
    return cls(**data)
