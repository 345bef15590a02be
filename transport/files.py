"""Media files (or any FFmpeg URL) in and out, through PyAV.

The readers turn a container into what the pipeline consumes: a 25 fps stream of RGB frames and
the audio as float32 arrays; the writer muxes H.264 + AAC. Every failure surfaces as a
``MediaError`` with one readable line, never a PyAV traceback.
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from stream.frames import VideoFrame

FEATURE_RATE = 16_000
OUTPUT_AUDIO_RATE = 48_000


class MediaError(RuntimeError):
    """A media input or output that cannot be used; the message is meant for the user."""


@dataclass(frozen=True, slots=True)
class MediaInfo:
    path: str
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    fps: float = 0.0
    duration: float = 0.0


def _open(path: str | Path, mode: str = "r", **kwargs) -> av.container.Container:
    text = str(path)
    if "://" not in text and mode == "r" and not Path(text).exists():
        raise MediaError(f"{text}: no such file")
    try:
        return av.open(text, mode, **kwargs)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{text}: cannot open media ({exc})") from None


def probe(path: str | Path) -> MediaInfo:
    """What a file holds, without decoding it."""
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        duration = container.duration / av.time_base if container.duration else 0.0
        if video is None:
            return MediaInfo(str(path), False, audio is not None, duration=duration)
        rate = video.average_rate or video.guessed_rate or 25
        return MediaInfo(str(path), True, audio is not None, video.codec_context.width,
                         video.codec_context.height, float(rate), duration)


def read_audio(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a file's first audio stream into (16 kHz mono, 48 kHz stereo) float32 arrays.

    The 16 kHz mono copy feeds Whisper; the 48 kHz stereo copy is what gets muxed into the output,
    so the viewer hears the original quality rather than the model's input.
    """
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: no audio stream")
        mono = av.AudioResampler(format="flt", layout="mono", rate=FEATURE_RATE)
        stereo = av.AudioResampler(format="fltp", layout="stereo", rate=OUTPUT_AUDIO_RATE)
        mono_parts: list[np.ndarray] = []
        stereo_parts: list[np.ndarray] = []
        try:
            for frame in container.decode(audio=0):
                frame.pts = None  # resample by sample count, whatever the container's timestamps say
                mono_parts += [f.to_ndarray().reshape(-1) for f in mono.resample(frame)]
                stereo_parts += [f.to_ndarray() for f in stereo.resample(frame)]
        except av.error.FFmpegError as exc:
            if not mono_parts:
                raise MediaError(f"{path}: corrupt audio ({exc})") from None
            # A truncated file: keep what decoded, like a player would.
        mono_parts += [f.to_ndarray().reshape(-1) for f in mono.resample(None)]
        stereo_parts += [f.to_ndarray() for f in stereo.resample(None)]
    if not mono_parts:
        raise MediaError(f"{path}: the audio stream holds no samples")
    return (np.concatenate(mono_parts).astype(np.float32),
            np.concatenate(stereo_parts, axis=1).astype(np.float32))


def read_video(path: str | Path, fps: float) -> Iterator[VideoFrame]:
    """Decode a file's first video stream, re-timed to ``fps`` (nearest earlier source frame).

    Re-timing by timestamp rather than by count keeps variable-frame-rate and odd-rate sources
    in step with the audio, like ``ffmpeg -r 25`` does for upstream LatentSync.
    """
    container = _open(path)
    try:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = stream.start_time * stream.time_base if stream.start_time is not None else 0
        index = 0
        previous: np.ndarray | None = None
        try:
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base - start) if frame.pts is not None else index / fps
                image = frame.to_ndarray(format="rgb24")
                # Emit every output tick that falls before this frame with the frame before it.
                while previous is not None and index / fps < t - 0.5 / fps:
                    yield VideoFrame(index, index / fps, previous)
                    index += 1
                previous = image
        except av.error.FFmpegError as exc:
            if previous is None:
                raise MediaError(f"{path}: corrupt video ({exc})") from None
        if previous is None:
            raise MediaError(f"{path}: the video stream holds no frames")
        yield VideoFrame(index, index / fps, previous)
    finally:
        container.close()


def ping_pong(frames: Iterator[VideoFrame], count: int, fps: float) -> Iterator[VideoFrame]:
    """Exactly ``count`` frames: the clip forward, then backward, then forward... (LatentSync's loop).

    Frames are only kept in memory when the clip turns out to be shorter than ``count``.
    """
    seen: list[np.ndarray] = []
    for frame in frames:
        if frame.index >= count:
            return
        seen.append(frame.image)
        yield frame
    if not seen:
        return
    index = len(seen)
    lap = 1
    while index < count:
        order = reversed(seen) if lap % 2 else iter(seen)
        for image in order:
            if index >= count:
                return
            yield VideoFrame(index, index / fps, image)
            index += 1
        lap += 1


class Mp4Writer:
    """H.264 + AAC into an mp4 (or flv for rtmp:// URLs), frames and audio as they come."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int,
                 audio_rate: int | None = OUTPUT_AUDIO_RATE, crf: int = 18):
        self._container = _open(path, "w", format="flv" if str(path).startswith("rtmp") else None)
        # yuv420p needs even sides; the odd last row/column is dropped rather than failing.
        self.width, self.height = width - width % 2, height - height % 2
        self._fps = fps
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height = self.width, self.height
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"crf": str(crf), "preset": "veryfast"}
        self._audio = None
        if audio_rate:
            self._audio = self._container.add_stream("aac", rate=audio_rate, layout="stereo")
        self._audio_samples = 0

    def write_frame(self, frame: VideoFrame) -> None:
        image = frame.image[: self.height, : self.width]
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        picture.pts = frame.index
        picture.time_base = Fraction(1, self._fps)
        for packet in self._video.encode(picture):
            self._container.mux(packet)

    def write_audio(self, samples: np.ndarray) -> None:
        """Append planar float32 audio, shape (2, n), at the writer's audio rate."""
        if self._audio is None or samples.shape[1] == 0:
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32),
                                           format="fltp", layout="stereo")
        frame.sample_rate = self._audio.rate
        frame.pts = self._audio_samples
        self._audio_samples += samples.shape[1]
        for packet in self._audio.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        for stream in (self._video, self._audio):
            if stream is not None:
                for packet in stream.encode(None):
                    self._container.mux(packet)
        self._container.close()


def fit_audio(samples: np.ndarray, seconds: float, rate: int) -> np.ndarray:
    """Trim or zero-pad (channels, n) audio to exactly ``seconds``."""
    n = int(round(seconds * rate))
    if samples.shape[-1] >= n:
        return samples[..., :n]
    pad = np.zeros(samples.shape[:-1] + (n - samples.shape[-1],), dtype=samples.dtype)
    return np.concatenate([samples, pad], axis=-1)


def output_frame_count(audio_16k: np.ndarray, fps: float) -> int:
    """Output length is driven by the audio, as in LatentSync: one frame per 1/fps of speech."""
    return max(1, math.floor(len(audio_16k) / FEATURE_RATE * fps + 0.5))


class Mp4Sink:
    """The pipeline's last stage in file mode: each frame is written with its 1/fps of audio.

    Writing audio per frame (rather than all at the end) is what a live sink must do too, and it
    keeps both streams the same length by construction.
    """

    name = "encode"

    def __init__(self, path: str | Path, width: int, height: int, fps: int, audio_48k: np.ndarray,
                 progress=None):
        self._writer = Mp4Writer(path, width, height, fps)
        self._audio = audio_48k
        self._samples_per_frame = OUTPUT_AUDIO_RATE / fps
        self._progress = progress

    def process(self, frame: VideoFrame) -> list:
        self._writer.write_frame(frame)
        start = round(frame.index * self._samples_per_frame)
        end = round((frame.index + 1) * self._samples_per_frame)
        self._writer.write_audio(self._audio[:, start:end])
        if self._progress is not None:
            self._progress.update(1)
        return []

    def flush(self) -> list:
        self._writer.close()
        return []
