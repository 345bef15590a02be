"""Streaming voice activity (stream/vad.py) on real speech, and its memory over a long stream."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MEDIA
from stream.vad import CHUNK, KEPT_SECONDS, StreamingVad
from transport.files import read_audio


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_audio(MEDIA / "speech_16k.wav")[0]


def test_speech_is_speech_and_a_pause_is_not_however_long_the_stream(speech):
    hush = np.random.default_rng(0).normal(0, 3e-5, 16000 * 3).astype(np.float32)  # -90 dBFS room noise
    vad = StreamingVad()
    stream = np.concatenate([speech, hush] * 4)  # 91 s
    for start in range(0, len(stream), 320):  # 20 ms at a time, as a microphone delivers it
        vad.push(stream[start : start + 320])
    period = (len(speech) + len(hush)) / 16000
    last = 3 * period  # the last round: speech from `last` s, then 3 s of hush
    assert vad.chunks == len(stream) // CHUNK
    assert len(vad.probabilities) == int(KEPT_SECONDS * 16000 / CHUNK), "kept a minute, not the whole stream"
    assert vad.speaking(last + 1.0, last + 3.0)  # the clip's first words
    assert not vad.speaking(last + len(speech) / 16000 + 0.5, last + period)  # the hush after it
    assert not vad.speaking(1.0, 3.0), "a moment no longer kept is not speech"
