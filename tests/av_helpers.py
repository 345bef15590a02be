"""Small media helpers the tests share: write WAVs and clips, decode frames, compare pictures."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from stream.frames import VideoFrame
from transport.files import Mp4Writer


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Mono float samples in [-1, 1] -> a 16-bit WAV."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def write_video(path: Path, frames: Iterable[np.ndarray], fps: int = 25) -> Path:
    """RGB frames -> an H.264 mp4 without audio, through the project's own writer."""
    writer = None
    for index, image in enumerate(frames):
        writer = writer or Mp4Writer(path, image.shape[1], image.shape[0], fps, audio_rate=None)
        writer.write_frame(VideoFrame(index, index / fps, image))
    writer.close()
    return path


def decode(path: Path, limit: int | None = None) -> Iterator[np.ndarray]:
    """A file's pictures as RGB arrays, every one or the first ``limit``."""
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if limit is not None and index >= limit:
                return
            yield frame.to_ndarray(format="rgb24")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
