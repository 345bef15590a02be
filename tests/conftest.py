"""Shared test paths (the repo sits beside ../shared: media and parity fixtures) and fixtures."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MEDIA = SHARED / "media"
FIXTURES = SHARED / "fixtures" / "latentsync"


@pytest.fixture(scope="session")
def media() -> Path:
    return MEDIA


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True, scope="session")
def two_threads():
    """The machine's two cores, whatever torch guessed: numerics and timings as CI sees them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def whisper_io(fixtures) -> dict:
    return load_file(fixtures / "whisper_feature_io.safetensors")


@pytest.fixture(scope="session")
def whisper_summary(fixtures) -> dict:
    return json.loads((fixtures / "whisper_feature_summary.json").read_text())


@pytest.fixture(scope="session")
def speech_24k() -> bytes:
    """speech_24k.wav as a TTS engine would send it: 24 kHz mono s16le."""
    import av
    import numpy as np

    with av.open(str(MEDIA / "speech_24k.wav")) as container:
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    if samples.dtype != np.int16:
        samples = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    return samples.astype("<i2").tobytes()
