"""The audio stage: gives each video frame its (50, 384) Whisper chunk."""

from __future__ import annotations

import numpy as np

from models.whisper_encoder import WhisperEncoder
from stream.audio_features import feature_chunks, log_mel
from stream.frames import FaceFrame


def offline_chunks(encoder: WhisperEncoder, waveform_16k: np.ndarray, n_frames: int) -> np.ndarray:
    """Upstream's whole-clip path: global mel floor, 30 s encoder segments, 10 rows per frame."""
    features = encoder.encode_features(log_mel(waveform_16k, floor="global"))
    return feature_chunks(features.float().cpu().numpy(), n_frames)


class AttachAudio:
    """File mode: the whole waveform is known, so chunks are computed once, on the first frame."""

    name = "audio"

    def __init__(self, encoder: WhisperEncoder, waveform_16k: np.ndarray, n_frames: int):
        self._encoder = encoder
        self._waveform = waveform_16k
        self._n_frames = n_frames
        self._chunks: np.ndarray | None = None

    def process(self, frame: FaceFrame) -> list[FaceFrame]:
        if self._chunks is None:
            self._chunks = offline_chunks(self._encoder, self._waveform, self._n_frames)
        frame.audio = self._chunks[min(frame.frame.index, len(self._chunks) - 1)]
        return [frame]

    def flush(self) -> list[FaceFrame]:
        return []
