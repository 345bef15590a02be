"""From a 16 kHz waveform to one (50, 384) Whisper chunk per 25 fps video frame, as LatentSync does it.

The path is: ``log_mel`` (100 frames/s) -> ``WhisperEncoder.encode_features`` (50 rows/s, five
layers) -> ``feature_chunks`` (10 rows around each video frame, flattened to 50 tokens).

Everything here is a pure function on arrays; reading and resampling audio happen in transport/.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
from faster_whisper.feature_extractor import FeatureExtractor

SAMPLE_RATE = 16000
FEATURE_RATE = 50  # encoder rows per second (mel is 100 frames/s; conv2 has stride 2)
# Whisper keeps 8 decades (80 dB) below the loudest value and maps the log10 range to about [-1, 1].
_DYNAMIC_RANGE = 8.0
# Rows a frame's chunk reaches, relative to its own row (LatentSync's audio_feat_length [2, 2]):
# 4 rows (80 ms) before to 5 rows after, i.e. 200 ms with 120 ms of look-ahead.
_CHUNK_OFFSETS = np.arange(-4, 6)

Floor = Literal["global", "running"]


@cache
def _extractor() -> FeatureExtractor:
    return FeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=160, n_fft=400)


def log10_mel(waveform: np.ndarray) -> np.ndarray:
    """Whisper's log10 mel power before the floor: (80, len // 160).

    Same steps as ``FeatureExtractor.__call__`` (Hann window, centred reflect-padded STFT,
    power, Slaney mel) but without its right zero-padding and without its clip-wide floor, so
    that the floor can be chosen. The last STFT frame is dropped, as openai-whisper does, so
    2 s of audio gives 200 frames.
    """
    fe = _extractor()
    window = np.hanning(fe.n_fft + 1)[:-1].astype(np.float32)
    spectrum = fe.stft(
        waveform.astype(np.float32), fe.n_fft, fe.hop_length, window=window, return_complex=True)
    power = np.abs(spectrum.astype(np.complex64)[:, :-1]) ** 2
    return np.log10(np.maximum(fe.mel_filters @ power, 1e-10))


def log_mel(waveform_16k: np.ndarray, floor: Floor = "global") -> np.ndarray:
    """Whisper's normalised log-mel, (80, len // 160) float32.

    ``floor="global"`` is Whisper's and LatentSync's: everything is clamped at (loudest value of
    the whole clip − 8) and then mapped by (x + 4) / 4. That makes frame t depend on audio that
    may come long after it, which a live stream does not have yet.

    ``floor="running"`` clamps frame t at (loudest value in frames 0..t − 8) instead, so a frame,
    once computed, never changes. It equals the global floor from the loudest frame onwards, and
    everywhere when the clip starts with its loudest frame.
    """
    raw = log10_mel(waveform_16k)
    if floor == "global":
        ceiling = raw.max()
    elif floor == "running":
        ceiling = np.maximum.accumulate(raw.max(axis=0))
    else:
        raise ValueError(f"floor must be 'global' or 'running', got {floor!r}")
    return normalise_mel(raw, ceiling)


def normalise_mel(raw: np.ndarray, ceiling) -> np.ndarray:
    """Whisper's floor (ceiling − 8) and (x + 4) / 4 scaling of a log10 mel."""
    return ((np.maximum(raw, ceiling - _DYNAMIC_RANGE) + 4.0) / 4.0).astype(np.float32)


def chunk_rows(frames: np.ndarray, fps: int = 25) -> np.ndarray:
    """Absolute feature rows behind each frame index, (len(frames), 10), before any clamping."""
    return np.asarray(frames, dtype=np.int64)[:, None] * FEATURE_RATE // fps + _CHUNK_OFFSETS


def chunk_indices(n_feature_rows: int, n_frames: int, fps: int = 25) -> np.ndarray:
    """Feature rows behind each video frame: (n_frames, 10) int64.

    Frame i sits on row ``int(i · 50 / fps)`` (2i at 25 fps) and takes rows −4 … +5 around it,
    clamped to the rows that exist, so the first and last frames repeat their edge rows.
    """
    if n_feature_rows < 1:
        raise ValueError("need at least one feature row")
    return np.clip(chunk_rows(np.arange(n_frames), fps), 0, n_feature_rows - 1)


def frame_count(n_feature_rows: int, fps: int = 25) -> int:
    """How many chunks LatentSync makes from ``n_feature_rows`` rows: floor(rows / 2) + 2 at 25 fps.

    Upstream's ``feature2chunks`` emits frame i and stops after the first i whose centre row is
    past the end, so it yields two frames more than the audio covers; the pipeline loops the
    video to match. This is the count to reproduce its output length.
    """
    first_past_end = -(-(n_feature_rows + 1) * fps // FEATURE_RATE)  # smallest i with centre > rows
    return first_past_end + 1


def feature_chunks(features, n_frames: int, fps: int = 25):
    """Per-frame conditioning: features (rows, layers, dim) -> (n_frames, 10 · layers, dim).

    Flattened time-major, as LatentSync does: token k is row k // layers, layer k % layers.
    Works on numpy arrays and torch tensors alike and returns the same kind.
    """
    rows, layers, dim = features.shape
    return features[chunk_indices(rows, n_frames, fps)].reshape(n_frames, len(_CHUNK_OFFSETS) * layers, dim)
