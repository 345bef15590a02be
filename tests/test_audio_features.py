"""Log-mel and per-frame chunking against the LatentSync fixtures (README section C)."""

import hashlib

import numpy as np
import pytest
import torch
from faster_whisper.feature_extractor import FeatureExtractor

from stream.audio_features import chunk_indices, feature_chunks, frame_count, log_mel

# Our STFT is faster-whisper's (numpy, float64 FFT); the fixture's is torch.stft (float32 FFT).
# They differ in the last bits of near-silent bins: measured max |Δ| 5.0e-5 on values in [-0.56, 1.44].
MEL_ATOL = 1e-4
# The same frame computed from inputs of different lengths: the mel filterbank matmul is blocked by
# length, so its sums round differently (measured 2.4e-7 with OPENBLAS_CORETYPE=Prescott, 0 natively,
# on values in [-1.5, 1.44]). Letting the future reach the floor moves values by 0.15 here.
LENGTH_ATOL = 1e-5


def upstream_chunk_count(n_rows: int, fps: int) -> int:
    """feature2chunks' loop, restated: emit frame i, stop after the first centre past the end."""
    i = 0
    while True:
        centre = int(i * 50 / fps)
        i += 1
        if centre > n_rows:
            return i


def test_chunk_indices_match_fixture(whisper_io):
    assert np.array_equal(chunk_indices(100, 52), whisper_io["chunk_indices"])
    assert frame_count(100) == 52 == len(whisper_io["chunk_indices"])


@pytest.mark.parametrize("fps", [25, 30])
def test_frame_count_and_centres_follow_upstream(fps):
    for n_rows in range(1, 160):
        assert frame_count(n_rows, fps) == upstream_chunk_count(n_rows, fps)
    centres = chunk_indices(10_000, 300, fps)[:, 4]
    assert centres.tolist() == [min(int(i * 50 / fps), 9_999) for i in range(300)]
    assert frame_count(100) == 100 // 2 + 2


def test_chunks_from_stored_features_are_exact(whisper_io, whisper_summary):
    features = whisper_io["whisper_feature"]
    chunks = feature_chunks(features, frame_count(len(features)))
    assert chunks.shape == (52, 50, 384)
    # chunks only gather stored rows, with no arithmetic: the copy is bit-exact on any machine
    assert hashlib.sha256(chunks.astype("<f4").tobytes()).hexdigest() == whisper_summary["chunks"]["sha256_fp32"]
    # time-major: token k is row k // 5, layer k % 5
    rows = whisper_io["chunk_indices"][7]
    assert np.array_equal(chunks[7, 13], features[rows[13 // 5], 13 % 5])
    assert torch.equal(feature_chunks(torch.from_numpy(features), 52), torch.from_numpy(chunks))


def test_global_log_mel_matches_fixture(whisper_io):
    mel = log_mel(whisper_io["waveform"])
    assert mel.shape == (80, 200) and mel.dtype == np.float32
    np.testing.assert_allclose(mel, whisper_io["log_mel"], rtol=0, atol=MEL_ATOL)
    # and it is faster-whisper's own output when that is not padded on the right (the same steps on
    # the same array, in one process: bit-identical)
    assert np.array_equal(mel, FeatureExtractor()(whisper_io["waveform"], padding=0))


def decaying_burst_then(waveform: np.ndarray) -> np.ndarray:
    """A full-scale 1 kHz ping, loudest at sample 0 and decaying fast, followed by ``waveform``.

    A cosine, so that the STFT's reflect padding continues it smoothly and frame 0 holds its peak.
    """
    t = np.arange(4000) / 16000
    ping = np.exp(-t / 0.02) * np.cos(2 * np.pi * 1000 * t)
    return np.concatenate([ping, waveform]).astype(np.float32)


def test_running_floor_equals_global_when_loudest_frame_is_first(whisper_io):
    waveform = decaying_burst_then(whisper_io["waveform"])
    global_mel = log_mel(waveform, "global")
    assert global_mel.max(axis=0).argmax() == 0  # the premise: frame 0 is the loudest
    # one input, the same floor: equal to float rounding
    np.testing.assert_allclose(log_mel(waveform, "running"), global_mel, rtol=0, atol=LENGTH_ATOL)


def test_running_floor_never_uses_future_audio(whisper_io):
    waveform = np.concatenate([np.zeros(8000, np.float32), whisper_io["waveform"]])
    cut = 16000
    louder_future = waveform.copy()
    louder_future[cut:] = np.cos(2 * np.pi * 440 * np.arange(len(waveform) - cut) / 16000)  # 2x the chirp
    # frame t's STFT window ends at sample 160 t + 200: frames before that are fixed by then
    settled = (cut - 200) // 160 + 1

    running = log_mel(waveform, "running")
    # Same length, and only samples no settled frame sees differ (a leak would move them by ~0.15).
    np.testing.assert_allclose(log_mel(louder_future, "running")[:, :settled], running[:, :settled],
                               rtol=0, atol=LENGTH_ATOL)
    np.testing.assert_allclose(log_mel(waveform[:cut], "running")[:, :settled], running[:, :settled],
                               rtol=0, atol=LENGTH_ATOL)
    # the global floor, by contrast, moves with what comes later (the test would catch a leak)
    moved = log_mel(louder_future, "global")[:, :settled] - log_mel(waveform, "global")[:, :settled]
    assert np.abs(moved).max() > 1000 * LENGTH_ATOL


def test_running_floor_differs_only_before_the_loudest_frame(whisper_io):
    waveform = np.concatenate([np.zeros(8000, np.float32), whisper_io["waveform"]])
    global_mel, running_mel = log_mel(waveform, "global"), log_mel(waveform, "running")
    loudest = global_mel.max(axis=0).argmax()
    # one input, the same floor from the loudest frame on: equal to float rounding
    np.testing.assert_allclose(running_mel[:, loudest:], global_mel[:, loudest:], rtol=0, atol=LENGTH_ATOL)
    # digital silence sits at log10(1e-10) with no louder frame yet: far below the global floor
    assert running_mel[:, 0].max() < global_mel.min()


def test_log_mel_rejects_unknown_floor(whisper_io):
    with pytest.raises(ValueError, match="floor"):
        log_mel(whisper_io["waveform"], "peak")
