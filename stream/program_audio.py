"""Speech a program sends to an avatar (a voice agent's TTS), waiting to be played on the media clock.

A program sends PCM s16le in chunks of any number of samples, often faster than real time (TTS
comes in bursts). The chunks wait here, bounded by ``buffer_seconds``; the session takes exactly
one media-clock span at a time, speech while there is some and silence after it, so the avatar
idles between utterances instead of freezing. Owned by the event loop.

An utterance is a run of speech: it starts when speech is taken after silence and ends where the
buffer ran dry, once it has stayed dry for UNDERRUN_GRACE (a chunk late on the network makes a
pause, not a new utterance). Its span on the media clock is kept until the output has shown it,
so ``speech_started`` and ``speech_ended`` describe what viewers saw and heard, not what arrived.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from stream.session_options import AudioFormat


# Speech that runs dry for less than this and then goes on is one utterance with a pause in it
# (chunks that arrive late over a network), not two.
UNDERRUN_GRACE = 0.25


class AudioRejected(ValueError):
    """A chunk that was not taken: the message says why. Nothing of it was buffered."""


class BufferFull(AudioRejected):
    """A chunk that would take the buffer past its bound: send it again once some has played."""


@dataclass
class Utterance:
    start: float  # media-clock seconds of its first sample
    end: float | None = None  # of the sample after its last, once it has all been taken
    started: bool = False  # speech_started was reported


class ProgramAudio:
    def __init__(self, audio_format: AudioFormat, buffer_seconds: float):
        self.format = audio_format
        self.capacity = int(buffer_seconds * audio_format.rate)  # sample frames
        self._chunks: deque[np.ndarray] = deque()  # (channels, n) float32
        self.buffered = 0  # sample frames waiting
        self.taken = 0  # sample frames handed to the session so far, speech and silence
        self.utterances: deque[Utterance] = deque()
        self._dry_since: int | None = None  # where the speech ran out, while more may still come
        self._grace = round(UNDERRUN_GRACE * audio_format.rate)

    @property
    def buffered_seconds(self) -> float:
        return self.buffered / self.format.rate

    def write(self, pcm: bytes) -> float:
        """Queue one chunk; returns its duration in seconds. Raises AudioRejected, BufferFull."""
        step = self.format.bytes_per_frame
        if not pcm:
            raise AudioRejected("an empty audio chunk")
        if len(pcm) % step:
            raise AudioRejected(f"{len(pcm)} bytes is not a whole number of {self.format.channels}-channel "
                                f"16-bit samples ({step} bytes each)")
        frames = len(pcm) // step
        if self.buffered + frames > self.capacity:
            raise BufferFull(f"the audio buffer holds {self.buffered_seconds:.1f} s of "
                             f"{self.capacity / self.format.rate:.0f} s: this {frames / self.format.rate:.2f} s "
                             "chunk was not taken; send it again once some has played")
        samples = np.frombuffer(pcm, "<i2").reshape(frames, self.format.channels).T.astype(np.float32) / 32768
        self._chunks.append(samples)
        self.buffered += frames
        return frames / self.format.rate

    def take(self, frames: int) -> np.ndarray:
        """The next ``frames`` sample frames, (channels, frames): buffered speech, then silence."""
        out = np.zeros((self.format.channels, frames), np.float32)
        filled = 0
        while filled < frames and self._chunks:
            chunk = self._chunks[0]
            n = min(frames - filled, chunk.shape[1])
            out[:, filled : filled + n] = chunk[:, :n]
            if n == chunk.shape[1]:
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[:, n:]
            filled += n
        self.buffered -= filled
        rate = self.format.rate
        speaking = bool(self.utterances) and self.utterances[-1].end is None
        if filled and not speaking:
            self.utterances.append(Utterance(start=self.taken / rate))
            speaking = True
        if speaking:
            if filled:  # speech goes on (a short underrun before this was a pause within it)
                self._dry_since = None
            if filled < frames and self._dry_since is None:
                self._dry_since = self.taken + filled
            # Ran dry: the utterance ends where its speech did, once no more came for a while.
            if self._dry_since is not None and self.taken + frames - self._dry_since >= self._grace:
                self.utterances[-1].end = self._dry_since / rate
                self._dry_since = None
        self.taken += frames
        return out

    def clear(self) -> float:
        """Drop everything waiting (an interrupt); returns the seconds dropped."""
        dropped = self.buffered_seconds
        self._chunks.clear()
        self.buffered = 0
        self._dry_since = None
        return dropped
