"""A live session's output, encoded and pushed to an RTMP server (or written to a file).

``Publisher`` is a sink of the session's one output pump (``stream/broadcast.py``): ``offer()``
runs on the event loop and only queues; one worker thread encodes H.264 (x264, zero-latency
tuning, a keyframe every 2 s, constrained to ``bitrate``) and AAC (48 kHz stereo) and muxes FLV.

Timestamps come from the session's media clock: a frame's pts is its place on that clock, and the
audio that left with it (exactly its 1/fps) is written at the same place, sample-continuous, so
audio and video cannot drift apart however long the stream runs; a frame or two the session
left out is filled with the picture before (and silence), so the stream keeps its frame rate. Each
connection starts its timestamps at 0, from the first frame it carries.

The queue is bounded and never blocks the pump: past VIDEO_BACKLOG pictures waiting, new pictures
are dropped (their audio still goes), and whatever arrives while the server is unreachable is
discarded. A connection that fails (the server restarted, the network went) is reopened with
bounded exponential backoff; a server that does not answer the RTMP handshake within
``write_timeout`` is not connected to (``answers_rtmp``), and a write that hangs longer than that
is abandoned with its thread and a new connection is made. All of it is
counted and reported as events: ``output_connected``, ``output_lost``, ``output_reconnected``,
``output_failed``.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import cv2
import numpy as np

from transport.ingest import backoff_seconds, error_reason

log = logging.getLogger(__name__)

AUDIO_RATE = 48_000
FILE_FORMATS = {".flv": "flv", ".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".ts": "mpegts"}
VIDEO_BACKLOG = 12  # pictures waiting to be encoded (~0.5 s): a picture is worth sending only while fresh
ITEM_BACKLOG = 250  # frames waiting at all (10 s at 25 fps); older ones are dropped, audio included
HANDSHAKE_BYTES = 1536  # RTMP's C1 and S1
REPEAT_AT_MOST = 3  # frames missing from the session's output that the last picture stands in for


class OutputError(ValueError):
    """An output that cannot be used: one line for the user."""


def check_output(text: str) -> str:
    """An rtmp:// or rtmps:// URL (with an application and a stream key) or a file path, or OutputError."""
    text = text.strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("rtmp", "rtmps"):
        parts = urllib.parse.urlsplit(text)
        try:
            parts.port
        except ValueError:
            raise OutputError(f"{text!r}: the port is not a number from 0 to 65535") from None
        if not parts.hostname or any(c.isspace() for c in text):
            raise OutputError(f"{text!r}: a malformed URL (no host, or spaces in it)")
        if len([p for p in parts.path.split("/") if p]) < 2:
            raise OutputError(f"{text!r}: an RTMP URL names an application and a stream key: "
                              "rtmp://HOST[:PORT]/APP/KEY")
        return text
    if scheme:
        raise OutputError(f"{text!r}: push to rtmp:// or rtmps://, or write a file ({', '.join(FILE_FORMATS)})")
    path = Path(text)
    if path.suffix.lower() not in FILE_FORMATS:
        raise OutputError(f"{text}: write {', '.join(FILE_FORMATS)} (or push to rtmp://HOST/APP/KEY)")
    if not path.parent.resolve().is_dir():
        raise OutputError(f"{text}: the folder {path.parent} does not exist")
    return str(path.resolve())


def fit_picture(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` at width x height: as it is when it fits exactly, else scaled to fit and padded with black."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    scale = min(width / w, height / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.zeros((height, width, 3), np.uint8)
    x, y = (width - new_w) // 2, (height - new_h) // 2
    out[y : y + new_h, x : x + new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return out


@dataclass(frozen=True)
class OutputSettings:
    bitrate_kbps: int = 2500
    audio_kbps: int = 128
    preset: str = "veryfast"  # x264's; ultrafast where the CPU is short
    keyframe_seconds: float = 2.0
    retries: int = 0  # attempts after the first before an output that never opened is given up
    write_timeout: float = 10.0  # a connect or a write blocked this long: the connection is abandoned


@dataclass
class _Item:
    pts: float  # seconds on the session's media clock
    image: np.ndarray | None  # None: the picture was dropped (the encoder is behind)
    audio: np.ndarray  # (2, n) float32 at AUDIO_RATE


_END = object()


def answers_rtmp(url: str, timeout: float) -> None:
    """Raise OSError unless the server at ``url`` answers an RTMP handshake within ``timeout`` s.

    PyAV connects an output while holding the GIL, and FFmpeg gives that no timeout: a server that
    accepts and then says nothing would freeze the whole process, not just the publisher's thread.
    So the handshake is tried here first, where a timeout works (C0+C1 out, S0+S1 back, then goodbye).
    """
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme.lower() == "rtmps"
    with socket.create_connection((parts.hostname, parts.port or (443 if secure else 1935)), timeout) as raw:
        stream = raw
        if secure:  # as FFmpeg's TLS, which does not verify the server's certificate by default
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            stream = context.wrap_socket(raw, server_hostname=parts.hostname)
        stream.settimeout(timeout)
        stream.sendall(b"\x03" + bytes(HANDSHAKE_BYTES))
        received = 0
        try:
            while received < 1 + HANDSHAKE_BYTES:
                chunk = stream.recv(4096)
                if not chunk:
                    raise ConnectionError("the server closed the connection during the RTMP handshake")
                received += len(chunk)
        except socket.timeout:
            raise TimeoutError(f"no answer to the RTMP handshake in {timeout:g} s") from None


class _Connection:
    """One open output: its container, encoders and timestamp origin. Owned by one worker thread."""

    def __init__(self, target: str, size: tuple[int, int], fps: int, settings: OutputSettings, origin: float):
        self.fps, self.origin = fps, origin
        self.width, self.height = size
        live = "://" in target
        if live:
            answers_rtmp(target, settings.write_timeout)
        form = "flv" if live else FILE_FORMATS[Path(target).suffix.lower()]
        self.container = av.open(target, "w", format=form,
                                 container_options={"flvflags": "no_duration_filesize"} if form == "flv" else None)
        try:
            keyint = max(1, round(settings.keyframe_seconds * fps))
            kbps = settings.bitrate_kbps
            self.video = self.container.add_stream("libx264", rate=fps)
            self.video.width, self.video.height = size
            self.video.pix_fmt = "yuv420p"
            self.video.bit_rate = kbps * 1000
            self.video.options = {
                "preset": settings.preset, "tune": "zerolatency",
                "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:"
                               f"vbv-maxrate={kbps}:vbv-bufsize={kbps}"}
            self.audio = self.container.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
            self.audio.bit_rate = settings.audio_kbps * 1000
            self.container.start_encoding()  # connects and writes the header: fail here, not mid-frame
        except BaseException:
            self.abandon()
            raise
        self._next_sample = 0
        self._last: np.ndarray | None = None  # the last picture sent, as sent
        self._next_index = 0  # the frame (at fps, from the origin) after it
        self.repeated = 0

    def write(self, item: _Item) -> None:
        if item.image is not None:
            index = round((item.pts - self.origin) * self.fps)
            image = np.ascontiguousarray(fit_picture(item.image, self.width, self.height))
            # A frame or two the session left out (a dropped tick, a playout delay eased back): the
            # picture before goes on showing, so the stream keeps its frame rate, as servers expect.
            if self._last is not None and index - self._next_index <= REPEAT_AT_MOST:
                for missing in range(self._next_index, index):
                    self._encode(self._last, missing)
                    self.repeated += 1
            self._encode(image, index)
            self._last, self._next_index = image, index + 1
        start = round((item.pts - self.origin) * AUDIO_RATE)
        samples = item.audio
        if start > self._next_sample:  # frames the session dropped: their span is silence
            samples = np.concatenate([np.zeros((2, start - self._next_sample), np.float32), samples], axis=1)
        elif start < self._next_sample:
            samples = samples[:, self._next_sample - start :]
        if samples.shape[1]:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32), format="fltp",
                                               layout="stereo")
            frame.sample_rate = AUDIO_RATE
            frame.pts = self._next_sample
            frame.time_base = Fraction(1, AUDIO_RATE)
            self._next_sample += samples.shape[1]
            for packet in self.audio.encode(frame):
                self.container.mux(packet)

    def _encode(self, image: np.ndarray, index: int) -> None:
        picture = av.VideoFrame.from_ndarray(image, format="rgb24")
        picture.pts, picture.time_base = index, Fraction(1, self.fps)
        for packet in self.video.encode(picture):
            self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoders and finish the stream (a file's index)."""
        for stream in (self.video, self.audio):
            for packet in stream.encode(None):
                self.container.mux(packet)
        self.container.close()

    def abandon(self) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - the connection is gone already; nothing to save
            pass


class Publisher:
    """Encodes a session's output and pushes it to ``target`` (an rtmp(s):// URL or a file path).

    ``report(event, **fields)`` is called from the worker thread (pass something thread-safe).
    """

    def __init__(self, target: str, fps: int, settings: OutputSettings = OutputSettings(),
                 report: Callable[..., None] = lambda event, **fields: None):
        self.target = target
        self.fps = fps
        self.settings = settings
        self._report = report
        self._live = "://" in target
        self._items: collections.deque = collections.deque()
        self._pictures = 0  # items in the queue that carry a picture
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._busy: tuple[threading.Thread, float] | None = None  # (worker, when) in a connect or a write
        self._size: tuple[int, int] | None = None  # fixed by the first picture, for every connection
        self._retry_at = 0.0
        self._attempts = 0
        self._down_since: float | None = None
        self._ended = False
        self.done = threading.Event()
        self.connected = False
        self.ever_connected = False
        self.failed: str | None = None
        self.frames_written = 0
        self.pictures_dropped = 0
        self.frames_dropped = 0
        self.pictures_repeated = 0
        self.reconnects = 0
        self.lost = 0

    # -- the sink, on the event loop ------------------------------------------------------------

    def start(self) -> None:
        self._spawn()

    def offer(self, at: float, out) -> None:
        if self._ended:
            return
        image = out.frame.image
        with self._cond:
            if self._pictures >= VIDEO_BACKLOG:
                image = None
                self.pictures_dropped += 1
            if len(self._items) >= ITEM_BACKLOG:
                dropped = self._items.popleft()
                self._pictures -= dropped.image is not None
                self.frames_dropped += 1
            self._items.append(_Item(out.frame.pts, image, out.audio))
            self._pictures += image is not None
            self._cond.notify()
        self._watch()

    def end(self) -> None:
        with self._cond:
            if self._ended:
                return
            self._ended = True
            self._items.append(_END)
            self._cond.notify()

    def stats(self) -> dict:
        return {"target": self.target, "connected": self.connected, "frames_written": self.frames_written,
                "pictures_dropped": self.pictures_dropped, "pictures_repeated": self.pictures_repeated,
                "frames_dropped": self.frames_dropped,
                "lost": self.lost, "reconnects": self.reconnects, "failed": self.failed}

    def _watch(self) -> None:
        """A worker stuck in a connect or a write: give up on it and carry on with a new one.

        The stuck thread is left to FFmpeg (a daemon; it ends when the socket finally fails)."""
        busy = self._busy
        if busy is None or time.monotonic() - busy[1] <= self.settings.write_timeout or self.failed is not None:
            return
        self._busy = None
        reason = f"no progress for {self.settings.write_timeout:g} s"
        if self.connected:
            self._lost(reason)
        else:
            self._failed_attempt(reason)
        if self.failed is None:
            self._spawn()

    def _spawn(self) -> None:
        self._worker = threading.Thread(target=self._run, name=f"publish {self.target}", daemon=True)
        self._worker.start()

    # -- the worker -------------------------------------------------------------------------------

    def _take(self):
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            if item is not _END:
                self._pictures -= item.image is not None
            return item

    def _run(self) -> None:
        me = threading.current_thread()
        connection: _Connection | None = None
        finished = False
        try:
            while self._worker is me and self.failed is None:
                item = self._take()
                if item is _END:
                    finished = True
                    break
                if self._size is None and item.image is not None:
                    h, w = item.image.shape[:2]
                    self._size = (w - w % 2, h - h % 2)  # yuv420p wants even sides
                if self._size is None or time.monotonic() < self._retry_at:
                    continue  # nothing to size the stream by yet, or waiting to retry: live media is not kept
                if connection is None:
                    connection = self._connect(item.pts)
                    if connection is None:
                        continue
                self._set_busy(True)
                try:
                    repeated = connection.repeated
                    connection.write(item)
                    self.frames_written += 1
                    self.pictures_repeated += connection.repeated - repeated
                except (av.error.FFmpegError, OSError) as exc:
                    connection.abandon()
                    connection = None
                    if self._worker is me:
                        self._lost(error_reason(exc))
                finally:
                    self._set_busy(False)
        finally:
            if connection is not None:
                if finished and self._worker is me:
                    try:
                        connection.close()
                    except (av.error.FFmpegError, OSError) as exc:
                        log.info("output %s: closing: %s", self.target, error_reason(exc))
                else:
                    connection.abandon()
            if finished:
                self.done.set()

    def _set_busy(self, busy: bool) -> None:
        me = threading.current_thread()
        if busy:
            self._busy = (me, time.monotonic())
        elif self._busy is not None and self._busy[0] is me:  # not a newer worker's mark
            self._busy = None

    def _connect(self, origin: float) -> _Connection | None:
        self._set_busy(True)
        try:
            connection = _Connection(self.target, self._size, self.fps, self.settings, origin)
        except (av.error.FFmpegError, OSError) as exc:
            if self._worker is threading.current_thread():
                self._failed_attempt(error_reason(exc))
            return None
        finally:
            self._set_busy(False)
        if self._worker is not threading.current_thread():  # given up on while connecting
            connection.abandon()
            return None
        if self.ever_connected:
            self.reconnects += 1
            self._report("output_reconnected", output=self.target, attempts=self._attempts,
                         lost_seconds=round(time.monotonic() - self._down_since, 2))
        else:
            self._report("output_connected", output=self.target, width=self._size[0], height=self._size[1])
        self.connected = self.ever_connected = True
        self._attempts = 0
        return connection

    def _failed_attempt(self, reason: str) -> None:
        """A connection that could not be made: retry after a backoff, or give up."""
        self._attempts += 1
        if not self._live or (not self.ever_connected and self._attempts > self.settings.retries):
            self._fail(reason)
            return
        log.info("output %s: %s (attempt %d)", self.target, reason, self._attempts)
        self._retry_at = time.monotonic() + backoff_seconds(self._attempts)

    def _fail(self, reason: str) -> None:
        self.failed = f"{self.target}: {reason}"
        self._report("output_failed", output=self.target, reason=reason, attempts=max(1, self._attempts))
        self.done.set()

    def _lost(self, reason: str) -> None:
        if not self._live:
            self._fail(reason)
            return
        if self.connected:
            self.connected = False
            self.lost += 1
            self._down_since = time.monotonic()
            self._report("output_lost", output=self.target, reason=reason)
        self._retry_at = time.monotonic() + backoff_seconds(1)

