"""Whisper features for a live stream: a sliding window instead of 30 s segments.

Offline, LatentSync encodes 30 s segments and floors the mel at the loudest value of the whole
clip; neither exists live. Here each call encodes only the last ``context_seconds`` of audio that
has arrived, floors the mel at the loudest value heard so far, and gives the window's rows the
positional embeddings they would have had offline (row r of the stream sits at position
r mod 1500 of its 30 s segment). A frame's chunk reaches 120 ms past the frame, so frame i is
ready once audio up to t_i + 120 ms (+ half an STFT window) is in.
"""

from __future__ import annotations

import queue
import time

import numpy as np
import torch

from models.whisper_encoder import SEGMENT_FRAMES, WhisperEncoder
from stream.audio_features import SAMPLE_RATE, chunk_rows, log10_mel, normalise_mel
from stream.frames import Control, FaceFrame

HOP = 160  # samples per mel frame
# A mel frame is centred on its hop and reaches 200 samples (half the FFT) past it.
STFT_REACH = 200
# Chunk rows reach 5 rows (= 10 mel frames) past the frame's own row, plus one frame to centre on.
RIGHT_CONTEXT_SECONDS = (2 * 5 + 1) * HOP / SAMPLE_RATE + STFT_REACH / SAMPLE_RATE  # 122.5 ms
# How far before a frame its audio can come from: its chunk reaches 80 ms back (plus half an STFT
# window), its VAD span 80 ms back to the start of a 32 ms VAD chunk; a few ms for the resampler.
CHUNK_REACH_BACK = 0.08 + max(STFT_REACH / SAMPLE_RATE, 512 / SAMPLE_RATE) + 0.005


class StreamingFeatures:
    def __init__(self, encoder: WhisperEncoder, fps: int = 25, context_seconds: float = 2.0,
                 align_positions: bool = True):
        self.encoder = encoder
        self.fps = fps
        self.context_mel = int(context_seconds * SAMPLE_RATE / HOP) // 2 * 2
        self.align_positions = align_positions
        self._samples = np.zeros(0, np.float32)
        self._first_sample = 0  # stream index of _samples[0]
        self._ceiling = -np.inf  # loudest log10 mel value heard so far

    @property
    def received_seconds(self) -> float:
        return (self._first_sample + len(self._samples)) / SAMPLE_RATE

    def push(self, samples_16k: np.ndarray) -> None:
        self._samples = np.concatenate([self._samples, samples_16k.astype(np.float32)])
        # Keep what the next window can reach: its mel frames plus the STFT margin before them.
        keep = (self.context_mel + 8) * HOP
        if len(self._samples) > keep:
            drop = (len(self._samples) - keep) // HOP * HOP
            self._samples = self._samples[drop:]
            self._first_sample += drop

    def ready_until(self) -> int:
        """Frames [0, n) can be chunked with the audio received so far."""
        seconds = self.received_seconds - RIGHT_CONTEXT_SECONDS
        return max(0, int(np.floor(seconds * self.fps)) + 1) if seconds >= 0 else 0

    @torch.no_grad()
    def chunks(self, frames: list[int]) -> np.ndarray | None:
        """(len(frames), 50, C) chunks for frames that are ready (``ready_until``); at the end of a
        stream, frames past the audio repeat its last rows. None before 20 ms of audio exist."""
        rows = chunk_rows(np.asarray(frames), self.fps)
        total_mel = (self._first_sample + len(self._samples)) // HOP
        end_mel = min(total_mel, 2 * int(rows.max()) + 2) // 2 * 2
        # The window may not reach back past the audio still buffered (plus two hops of STFT margin).
        oldest_mel = -(-(self._first_sample + 2 * HOP) // HOP) if self._first_sample else 0
        start_mel = -(-max(oldest_mel, end_mel - self.context_mel) // 2) * 2
        if end_mel - start_mel < 2:
            return None
        # Two hops of audio before the window make its first mel frames exact, not reflect-padded.
        first = max(start_mel * HOP - 2 * HOP, self._first_sample)
        raw = log10_mel(self._samples[first - self._first_sample :
                                      end_mel * HOP + STFT_REACH - self._first_sample])
        raw = raw[:, start_mel - first // HOP : end_mel - first // HOP]
        self._ceiling = max(self._ceiling, float(raw.max()))
        mel = torch.from_numpy(normalise_mel(raw, self._ceiling))
        position = (start_mel // 2) % (SEGMENT_FRAMES // 2) if self.align_positions else 0
        position = min(position, SEGMENT_FRAMES // 2 - mel.shape[1] // 2)
        parameter = next(self.encoder.parameters())
        layers = self.encoder(mel[None].to(parameter.device, parameter.dtype), position)[0]
        features = layers.transpose(0, 1).float().cpu().numpy()  # (rows, layers, C)
        local = np.clip(rows - start_mel // 2, 0, len(features) - 1)
        return features[local].reshape(len(frames), -1, features.shape[-1])


class StreamingAudio:
    """The live audio stage: holds each frame until its chunk's audio has arrived, then attaches it.

    Audio comes in through ``push`` from any thread; frames come through the pipeline. A frame
    whose audio is ``audio_timeout`` seconds overdue (a muted or vanished microphone) goes on as
    silence rather than stalling the video. With ``vad`` on, Silero decides per frame whether
    there is speech; ``speech`` fades between 0 and 1 over ``fade_frames`` at each transition.
    """

    name = "audio"

    def __init__(self, encoder: WhisperEncoder, fps: int = 25, context_seconds: float = 2.0,
                 vad: bool = True, fade_frames: int = 3, audio_timeout: float = 0.5, batch: int = 1):
        from stream.vad import StreamingVad

        self.features = StreamingFeatures(encoder, fps, context_seconds)
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
            return frame.frame.index >= ready and due is not None and now - due > self.audio_timeout

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
            self.features.context_mel = int(options.context_seconds * SAMPLE_RATE / HOP) // 2 * 2

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
