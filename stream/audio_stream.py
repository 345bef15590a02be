"""Whisper features for a live stream: a sliding window inside upstream's 30 s segments.

Offline, LatentSync encodes the clip in 30 s segments (positions 0..1499 each, restarting at every
segment) and floors the mel at the loudest value of the whole clip. Live, each call encodes only a
window: ``context_seconds`` of audio before the end of the frames' chunks plus ``look_ahead``
beyond the chunks' own reach, and floors the mel at the loudest value heard so far.

The window keeps offline's segments: it never crosses a 30 s mark (offline, no row sees audio of
another segment), and its rows take the positions they have offline, row r at r mod 1500. A batch
of chunks that straddles a mark is encoded as two windows, one per segment (once per 30 s). So the
window at minute 10 is placed exactly like the one at second 5, and frames just after a mark see
what offline's see there: only the audio since the mark. (Squeezing a straddling window's positions
to the end of the table instead cost 0.1-0.2 of cosine for a context's worth of frames after each mark.)

A frame's chunk reaches 120 ms past the frame, so frame i is ready once audio up to
t_i + ``look_ahead`` (at least 122.5 ms: the chunk's rows plus half an STFT window) is in.
"""

from __future__ import annotations

import math
import queue
import time

import numpy as np
import torch

from models.whisper_encoder import SEGMENT_FRAMES, WhisperEncoder
from stream.audio_features import FEATURE_RATE, SAMPLE_RATE, chunk_rows, log10_mel, normalise_mel
from stream.frames import Control, FaceFrame

HOP = 160  # samples per mel frame
SEGMENT_ROWS = SEGMENT_FRAMES // 2  # encoder rows per 30 s segment (and positions in the table)
# A mel frame is centred on its hop and reaches 200 samples (half the FFT) past it.
STFT_REACH = 200
# Chunk rows reach 5 rows (= 10 mel frames) past the frame's own row, plus one frame to centre on.
RIGHT_CONTEXT_SECONDS = (2 * 5 + 1) * HOP / SAMPLE_RATE + STFT_REACH / SAMPLE_RATE  # 122.5 ms
# How far before a frame its audio can come from: its chunk reaches 80 ms back (plus half an STFT
# window), its VAD span 80 ms back to the start of a 32 ms VAD chunk; a few ms for the resampler.
CHUNK_REACH_BACK = 0.08 + max(STFT_REACH / SAMPLE_RATE, 512 / SAMPLE_RATE) + 0.005


class StreamingFeatures:
    """Push 16 kHz audio as it arrives; ask for the chunks of frames that ``ready_until`` allows.

    ``context_seconds``: audio the encoder sees before the end of the frames' chunks (its cost
    grows with it). ``look_ahead``: seconds of audio past a frame that its chunk waits for, from
    the chunk's own ``RIGHT_CONTEXT_SECONDS`` up; what is past the chunk's reach is seen by the
    encoder's attention only, and every extra second is a second more latency.
    """

    def __init__(self, encoder: WhisperEncoder, fps: int = 25, context_seconds: float = 2.0,
                 look_ahead: float = RIGHT_CONTEXT_SECONDS):
        self.encoder = encoder
        self.fps = fps
        self.context_seconds = context_seconds
        self.look_ahead = look_ahead
        self._samples = np.zeros(0, np.float32)
        self._first_sample = 0  # stream index of _samples[0]
        self._ceiling = -np.inf  # loudest log10 mel value heard so far

    @property
    def context_seconds(self) -> float:
        return self._context_mel * HOP / SAMPLE_RATE

    @context_seconds.setter
    def context_seconds(self, seconds: float) -> None:
        self._context_mel = int(seconds * SAMPLE_RATE / HOP) // 2 * 2

    @property
    def look_ahead(self) -> float:
        """Seconds past a frame its chunk waits for: the chunk's own reach plus whole 20 ms rows."""
        return RIGHT_CONTEXT_SECONDS + self._extra_rows / FEATURE_RATE

    @look_ahead.setter
    def look_ahead(self, seconds: float) -> None:
        # Whole 20 ms rows, rounded up (a hair of slack for float input): at least what was asked.
        extra = math.ceil((seconds - RIGHT_CONTEXT_SECONDS) * FEATURE_RATE - 1e-6)
        if extra < 0:
            raise ValueError(f"look_ahead {seconds} s is below the chunk's own {RIGHT_CONTEXT_SECONDS} s")
        self._extra_rows = extra

    @property
    def received_seconds(self) -> float:
        return (self._first_sample + len(self._samples)) / SAMPLE_RATE

    def push(self, samples_16k: np.ndarray) -> None:
        self._samples = np.concatenate([self._samples, samples_16k.astype(np.float32)])
        # Keep what the next window can reach: its mel frames plus the STFT margin before them.
        keep = (self._context_mel + 2 * self._extra_rows + 8) * HOP
        if len(self._samples) > keep:
            drop = (len(self._samples) - keep) // HOP * HOP
            self._samples = self._samples[drop:]
            self._first_sample += drop

    def ready_until(self) -> int:
        """Frames [0, n) can be chunked with the audio received so far."""
        seconds = self.received_seconds - self.look_ahead
        return max(0, int(np.floor(seconds * self.fps)) + 1) if seconds >= 0 else 0

    def chunks(self, frames: list[int]) -> np.ndarray | None:
        """(len(frames), 50, C) chunks for frames that are ready (``ready_until``); at the end of a
        stream, frames past the audio repeat its last rows. None before 20 ms of audio exist, and
        for frames whose window has already left the buffer (a stage that fell behind)."""
        total_rows = (self._first_sample + len(self._samples)) // HOP // 2
        if total_rows < 1:
            return None
        rows = np.clip(chunk_rows(np.asarray(frames), self.fps), 0, total_rows - 1)  # upstream clamps too
        segments = rows // SEGMENT_ROWS
        out = None
        for segment in np.unique(segments):
            here = segments == segment
            window = self._encode_window(int(rows[here].max()), total_rows)
            if window is None:
                return None
            first_row, features = window
            if out is None:
                out = np.empty(rows.shape + features.shape[1:], features.dtype)
            out[here] = features[np.clip(rows[here] - first_row, 0, len(features) - 1)]
        return out.reshape(len(frames), -1, out.shape[-1])

    @torch.no_grad()
    def _encode_window(self, last_row: int, total_rows: int) -> tuple[int, np.ndarray] | None:
        """(first row, features (rows, layers, C)) of the window that ends ``look_ahead`` past
        ``last_row``, within ``last_row``'s 30 s segment and the audio still buffered (None when
        that audio is gone)."""
        segment_start = last_row // SEGMENT_ROWS * SEGMENT_FRAMES
        end_mel = 2 * min(last_row + 1 + self._extra_rows, total_rows, segment_start // 2 + SEGMENT_ROWS)
        # The window may not reach back past the audio still buffered (plus two hops of STFT margin).
        oldest_mel = -(-(self._first_sample + 2 * HOP) // HOP) if self._first_sample else 0
        start_mel = -(-max(oldest_mel, end_mel - self._context_mel - 2 * self._extra_rows, segment_start) // 2) * 2
        if end_mel - start_mel < 2:
            return None
        # Two hops of audio before the window make its first mel frames exact, not reflect-padded.
        first = max(start_mel * HOP - 2 * HOP, self._first_sample)
        raw = log10_mel(self._samples[first - self._first_sample :
                                      end_mel * HOP + STFT_REACH - self._first_sample])
        raw = raw[:, start_mel - first // HOP : end_mel - first // HOP]
        self._ceiling = max(self._ceiling, float(raw.max()))
        mel = torch.from_numpy(normalise_mel(raw, self._ceiling))
        parameter = next(self.encoder.parameters())
        position = (start_mel - segment_start) // 2
        layers = self.encoder(mel[None].to(parameter.device, parameter.dtype), position)[0]
        return start_mel // 2, layers.transpose(0, 1).float().cpu().numpy()


class StreamingAudio:
    """The live audio stage: holds each frame until its chunk's audio has arrived, then attaches it.

    Audio comes in through ``push`` from any thread; frames come through the pipeline. A frame
    whose audio is ``audio_timeout`` seconds overdue (a muted or vanished microphone) goes on as
    silence rather than stalling the video; overdue counts from the tick plus the look-ahead past the
    chunk's own, which is waited for on purpose. With ``vad`` on, Silero decides per frame whether
    there is speech; ``speech`` fades between 0 and 1 over ``fade_frames`` at each transition.
    """

    name = "audio"

    def __init__(self, encoder: WhisperEncoder, fps: int = 25, context_seconds: float = 2.0,
                 vad: bool = True, fade_frames: int = 3, audio_timeout: float = 0.5, batch: int = 1,
                 look_ahead: float = RIGHT_CONTEXT_SECONDS):
        from stream.vad import StreamingVad

        self.features = StreamingFeatures(encoder, fps, context_seconds, look_ahead)
        self.vad = StreamingVad() if vad else None
        self.fade_step = 1.0 / max(fade_frames, 1)
        self.audio_timeout = audio_timeout
        # Frames are released in whole groups of ``batch`` (the window stride: the next stage waits
        # for that many anyway), so the encoder runs once per stride, not once per frame.
        self.batch = batch
        self.frames_silent = 0
        self.frames_without_audio = 0
        self._inbox: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._pending: list[FaceFrame] = []
        self._speech = 0.0 if vad else 1.0
        self._quiet_until = 0.0  # media time before which frames are silent (an interrupt)

    def push(self, samples_16k: np.ndarray) -> None:
        self._inbox.put(samples_16k)

    def _drain(self) -> None:
        while True:
            try:
                samples = self._inbox.get_nowait()
            except queue.Empty:
                return
            self.features.push(samples)
            if self.vad is not None:
                self.vad.push(samples)

    def process(self, frame: FaceFrame) -> list[FaceFrame]:
        self._pending.append(frame)
        return self._release(final=False)

    def flush(self) -> list[FaceFrame]:
        return self._release(final=True)

    def _release(self, final: bool) -> list[FaceFrame]:
        self._drain()
        ready = self.features.ready_until()
        now = time.monotonic()

        def overdue(frame: FaceFrame) -> bool:
            """Its audio is not in and should have been long ago: the microphone stalled."""
            due = frame.frame.trace.due_at
            patience = self.audio_timeout + self.features.look_ahead - RIGHT_CONTEXT_SECONDS
            return frame.frame.index >= ready and due is not None and now - due > patience

        release = 0  # frames leave in order: the leading run whose audio is in (or given up on)
        while release < len(self._pending) and (final or self._pending[release].frame.index < ready
                                                or overdue(self._pending[release])):
            release += 1
        if not final and not any(overdue(f) for f in self._pending[:release]):
            # Whole strides only: the window stage cuts every ``batch`` frames it receives, so a
            # stride split across two releases would wait for the next one (up to a stride more).
            release = release // self.batch * self.batch
            if not release:
                return []
        out, self._pending = self._pending[:release], self._pending[release:]
        heard = [f for f in out if f.frame.pts < self.features.received_seconds]
        chunks = self.features.chunks([f.frame.index for f in heard]) if heard else None
        if chunks is not None:
            for frame, chunk in zip(heard, chunks):
                frame.audio = chunk
        for frame in out:
            frame.speech = self._next_speech(frame)
        return out

    def control(self, command: Control) -> None:
        if command.kind == "interrupt":
            # The mouth is idle at once, not after a fade; and stays so while a frame's chunk and
            # VAD span still reach back into the speech that was cut off at ``command.value``.
            self._speech = 0.0 if self.vad is not None else 1.0
            self._quiet_until = command.value + CHUNK_REACH_BACK
        elif command.kind == "options":
            options = command.value
            self.fade_step = 1.0 / options.fade_frames
            self.batch = options.stride
            self.features.context_seconds = options.context_seconds
            self.features.look_ahead = options.look_ahead

    def _next_speech(self, frame: FaceFrame) -> float:
        if frame.frame.pts < self._quiet_until:
            frame.audio = None
        if frame.audio is None:
            # Nothing to make a mouth from: the original face at once (a fade needs generated frames).
            self.frames_without_audio += frame.frame.pts >= self._quiet_until
            self._speech = 0.0
            self.frames_silent += 1
            return 0.0
        if self.vad is None:
            speaking = True
        else:
            # The chunk's own span: 80 ms before the frame to 120 ms after it.
            speaking = self.vad.speaking(frame.frame.pts - 0.08, frame.frame.pts + 0.12)
        step = self.fade_step if speaking else -self.fade_step
        self._speech = min(1.0, max(0.0, self._speech + step))
        if self._speech == 0:
            self.frames_silent += 1
        return self._speech
