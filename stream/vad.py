"""Voice activity for a live stream: faster-whisper's bundled Silero VAD, run chunk by chunk.

faster-whisper runs Silero over a whole clip; a stream feeds it 32 ms at a time, carrying the
model's recurrent state and its 64-sample left context between calls, which is the same
computation split in time.
"""

from __future__ import annotations

import collections

import numpy as np
from faster_whisper.vad import get_vad_model

CHUNK = 512  # samples at 16 kHz the model takes per step
CONTEXT = 64
# A chunk this quiet (-80 dBFS) is silence whatever the model's recurrent state still says: after
# speech cut off by an interrupt, Silero goes on reporting speech for a few chunks of pure zeros.
SILENCE_RMS = 1e-4
# Frames ask about their own moment, a fraction of a second back: a minute of chunks is plenty, and
# a stream that runs for days keeps no more.
KEPT_SECONDS = 60.0


class StreamingVad:
    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self._model = get_vad_model()
        self._state = (np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32))
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)
        # One per 32 ms chunk, the last KEPT_SECONDS of them; chunk i of the stream is at i - first_kept.
        self.probabilities: collections.deque[float] = collections.deque(maxlen=int(KEPT_SECONDS * 16000 / CHUNK))
        self.chunks = 0  # seen since the stream began

    def push(self, samples_16k: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, samples_16k.astype(np.float32)])
        whole = len(self._pending) // CHUNK * CHUNK
        if not whole:
            return
        chunks = self._pending[:whole].reshape(-1, CHUNK)
        self._pending = self._pending[whole:]
        h, c = self._state
        for chunk in chunks:
            batch = np.concatenate([self._context, chunk])[None]
            output, h, c = self._model.session.run(None, {"input": batch, "h": h, "c": c})
            silent = float(np.sqrt(np.mean(chunk ** 2))) < SILENCE_RMS
            self.probabilities.append(0.0 if silent else float(np.asarray(output).reshape(-1)[0]))
            self.chunks += 1
            self._context = chunk[-CONTEXT:]
        self._state = (h, c)

    def speaking(self, start_s: float, end_s: float) -> bool:
        """Whether any chunk overlapping [start_s, end_s) is speech."""
        first_kept = self.chunks - len(self.probabilities)
        first = max(first_kept, int(start_s * 16000) // CHUNK)
        last = min(self.chunks, int(np.ceil(end_s * 16000 / CHUNK)))
        return any(self.probabilities[i - first_kept] >= self.threshold for i in range(first, last))
