"""A live session's incoming audio, put on its media clock: 16 kHz mono for the features, 48 kHz stereo
for playback.

Owned by the thread that pushes audio (the event loop). Every decision about where the audio sits
on the clock is taken here, from counts this object keeps itself: the audio stage's worker thread
only ever receives samples, so two pushes before it drains cannot both decide to pad.
"""

from __future__ import annotations

from typing import Callable

import av
import numpy as np

PLAYBACK_RATE = 48_000
FEATURE_RATE = 16_000
# Audio that starts within this long after the clock did is taken to start with it (the same
# moment, seen through two transports); later than that, the gap before it is filled with silence.
LATE_AUDIO_START = 0.02
# Blocks (20 ms each from a microphone) whose arrival times decide where the audio starts.
PLACEMENT_BLOCKS = 5
# Every this many blocks (1 s of a microphone's) the place is checked against their arrivals,
# and corrected when their median lateness is over RETIME_THRESHOLD seconds either way: more than
# the jitter of one block, less than what a viewer notices (lips 45 ms late, ITU-R BT.1359).
RETIME_BLOCKS = 50
RETIME_THRESHOLD = 0.015
# Audio placed by its timestamps (``timed``: a transport's, not its arrival) has no arrival jitter to
# average out: each block goes where its timestamp says, a gap before it (a packet lost on the way)
# filled with silence, an overlap (its timeline stepped back) trimmed, once past this much. Less is
# left to the retiming: a step that small is the rounding of a resampler, not a loss.
TIMED_SLACK = 0.01


class Resampler:
    """Any rate/layout -> one rate/layout, keeping filter state across blocks (PyAV's swresample)."""

    def __init__(self, rate: int, layout: str):
        self.rate, self.layout = rate, layout
        self._resampler: av.AudioResampler | None = None
        self._source: tuple[int, int] | None = None

    def __call__(self, samples: np.ndarray, rate: int) -> np.ndarray:
        samples = np.atleast_2d(samples).astype(np.float32)
        if self._source != (rate, len(samples)):  # a new input format restarts the filter
            self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
            self._source = (rate, len(samples))
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp",
                                           layout="mono" if len(samples) == 1 else "stereo")
        frame.sample_rate = rate
        frame.pts = None
        parts = [f.to_ndarray() for f in self._resampler.resample(frame)]
        channels = 1 if self.layout == "mono" else 2
        return np.concatenate(parts, axis=1) if parts else np.zeros((channels, 0), np.float32)


class PlaybackBuffer:
    """Playback audio on the media clock, read back one frame's span at a time."""

    def __init__(self, rate: int, start_s: float = 0.0):
        self.rate = rate
        self._samples = np.zeros((2, 0), np.float32)
        self._first = 0  # media-clock sample index of _samples[:, 0]
        self.received = round(start_s * rate)  # samples on the clock so far, leading silence included

    def append(self, samples: np.ndarray) -> None:
        self._samples = np.concatenate([self._samples, samples], axis=1)
        self.received += samples.shape[1]
        if self._samples.shape[1] > 60 * self.rate:  # a minute is far more than any latency
            drop = self._samples.shape[1] - 10 * self.rate
            self._samples, self._first = self._samples[:, drop:], self._first + drop

    def read(self, start_s: float, seconds: float) -> tuple[np.ndarray, float]:
        """The samples of [start_s, start_s + seconds) on the clock, and where they really start."""
        start = round(start_s * self.rate)
        length = round((start_s + seconds) * self.rate) - start
        out = np.zeros((self._samples.shape[0], length), np.float32)
        offset = self.received - self._samples.shape[1] - self._first  # clock samples not stored
        lo = start - self._first - offset
        src = self._samples[:, max(lo, 0) : max(lo + length, 0)]
        out[:, max(-lo, 0) : max(-lo, 0) + src.shape[1]] = src
        return out, start / self.rate


class InputAudio:
    """Puts pushed audio on the clock and hands the 16 kHz copy to ``to_features`` (thread-safe).

    Samples follow each other contiguously on the clock; where they sit sets A/V sync. Arriving
    audio is placed by arrival, like pictures: the first ``placement_blocks`` blocks are held and
    the start is the earliest any of them implies (a block is only ever late, never early). A burst
    at start-up (packets queued during a handshake, a stalled loop) still makes that start too
    early, and a sender's clock can drift from ours, so with ``retime`` the place is re-estimated
    from every RETIME_BLOCKS blocks' arrivals (their median lateness) and corrected when it is off
    by more than RETIME_THRESHOLD: silence inserted, or that much of the coming audio skipped.
    A program's audio, placed exactly by its pacer, uses neither.
    """

    def __init__(self, to_features: Callable[[np.ndarray], None], placement_blocks: int = PLACEMENT_BLOCKS,
                 retime: bool = True):
        self._to_features_stage = to_features
        self._to_features = Resampler(FEATURE_RATE, "mono")
        self._to_playback = Resampler(PLAYBACK_RATE, "stereo")
        self.playback = PlaybackBuffer(PLAYBACK_RATE)
        self.started = False
        self._placement_blocks = placement_blocks
        self._held: list[tuple[np.ndarray, int, float]] = []
        self._retime = retime
        self._placed = 0.0  # media time where the next block goes
        self._lateness: list[float] = []  # of recent blocks: where they began minus where they went
        self._skip = 0.0  # seconds of coming audio to leave out
        self.retimed_seconds: list[float] = []  # the corrections made, + later, - earlier

    def push(self, samples: np.ndarray, rate: int, at_media_time: float, timed: bool = False) -> None:
        """``samples`` (channels, n) at ``rate``, the first of them ``at_media_time`` seconds into the stream
        (``timed``: by the source's timestamps rather than by arrival)."""
        if not self.started:
            self._held.append((samples, rate, at_media_time))
            if len(self._held) < self._placement_blocks:
                return
            self.started = True
            start, before = at_media_time, 0.0
            for block, block_rate, at in self._held:  # where each block says the stream began
                start = min(start, at - before)
                before += np.atleast_2d(block).shape[1] / block_rate
            if start > LATE_AUDIO_START:  # a microphone that starts late: silence before it
                self._to_features_stage(np.zeros(round(start * FEATURE_RATE), np.float32))
                self.playback = PlaybackBuffer(PLAYBACK_RATE, start_s=start)
                self._placed = start
            held, self._held = self._held, []
            for block, block_rate, at in held:
                self._append(block, block_rate, at, timed)
            return
        self._append(samples, rate, at_media_time, timed)

    def _append(self, samples: np.ndarray, rate: int, at: float, timed: bool) -> None:
        samples = np.atleast_2d(samples)
        if timed and at - self._placed > TIMED_SLACK:
            self._silence(at - self._placed)
        elif timed and self._placed - at > TIMED_SLACK:
            self._skip += self._placed - at
        if self._skip:
            skipped = min(samples.shape[1], round(self._skip * rate))
            samples, at = samples[:, skipped:], at + skipped / rate
            self._skip = max(0.0, self._skip - skipped / rate)
        if not samples.shape[1]:
            return
        if self._retime:
            self._lateness.append(at - self._placed)
        self._to_features_stage(self._to_features(samples, rate)[0])
        self.playback.append(self._to_playback(samples, rate))
        self._placed += samples.shape[1] / rate
        if len(self._lateness) >= RETIME_BLOCKS:
            self._correct(float(np.median(self._lateness)))
            self._lateness = []

    def _correct(self, off: float) -> None:
        if off > RETIME_THRESHOLD:  # placed too early: what comes next goes later
            self._silence(off)
        elif off < -RETIME_THRESHOLD:  # placed too late: leave out as much of what comes next
            self._skip += -off
        else:
            return
        self.retimed_seconds.append(round(off, 4))

    def _silence(self, seconds: float) -> None:
        self._to_features_stage(np.zeros(round(seconds * FEATURE_RATE), np.float32))
        self.playback.append(np.zeros((2, round(seconds * PLAYBACK_RATE)), np.float32))
        self._placed += seconds
