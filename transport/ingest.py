"""A live stream pushed into a session as it arrives: an RTMP pull, one RTMP publisher accepted
directly (listen), SRT, HLS over http(s), or a file played in real time.

    SourceReader (worker thread: open, demux, decode; reopen with backoff)
        -> call_soon_threadsafe -> SessionFeed (event loop) -> session.push_video / push_audio

One thread owns each container. Pictures go to the session when they arrive (their arrival is
their ``captured_at``); its ticks take the newest picture, which resamples any frame rate to the
config's. Audio is resampled to 48 kHz stereo here (any rate or layout in) and placed where the
pictures of the same timestamp were shown. Live inputs are read without the burst of what queued
while FFmpeg probed them; files (and HLS) are paced by their timestamps. Wherever no audio
arrives (an input that dropped, or one without audio) silence is pushed, so the session, and
whatever reads its output, never stalls.

A URL is hostile until checked (``check_input``): only rtmp, rtmps, srt, http and https URLs and
existing files are opened, always with explicit timeouts, so a dead input fails with one line; and
FFmpeg may use only that scheme's protocols and, for files, streaming containers (no concat script,
no playlist of local files).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np

from transport.media_probe import input_options
from transport.session_feed import AUDIO_RATE, Audio, Picture, Status

log = logging.getLogger(__name__)

SCHEMES = ("rtmp", "rtmps", "srt", "http", "https")
LIVE_SCHEMES = ("rtmp", "rtmps", "srt")  # read as they arrive; anything else is paced by its timestamps
# Backoff between attempts to reopen an input: doubling from the first to the last, then steady.
BACKOFF = (0.5, 8.0)
# A listening input waits this long for a publisher per attempt, so that stopping is never held up longer.
LISTEN_WAIT = 2
# A paced file that falls this far behind its schedule (a slow decoder) starts a new schedule.
PACE_RESET = 1.0


class InputError(ValueError):
    """An input that cannot be used: one line for the user."""


class MissingStream(OSError):
    """An input that opened without the stream it is read for."""


def check_input(text: str, listen: bool = False) -> str:
    """The input as FFmpeg should open it, or InputError. ``listen``: an rtmp:// URL to accept a publisher on."""
    text = text.strip()
    if not text:
        raise InputError("the input is empty: give an rtmp://, rtmps://, srt://, http(s):// URL or a file")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if not scheme:
        if listen:
            raise InputError(f"--listen wants rtmp://HOST:PORT/APP/KEY to listen on, not {text!r}")
        if ":" in text.split("/", 1)[0] and not Path(text).exists():  # concat:, pipe:, subfile:...
            raise InputError(f"{text!r}: not a file, and not an rtmp, rtmps, srt, http or https URL")
        if not Path(text).is_file():
            raise InputError(f"{text}: no such file")
        return str(Path(text).resolve())  # absolute: FFmpeg never takes a part of it for a protocol
    if scheme not in SCHEMES:
        raise InputError(f"{text!r}: the scheme {scheme!r} is not allowed: use {', '.join(SCHEMES)} or a file")
    if listen and scheme != "rtmp":
        raise InputError(f"--listen accepts RTMP publishers only: rtmp://HOST:PORT/APP/KEY, not {text!r}")
    _check_host(text)
    if scheme in ("rtmp", "rtmps") and len([p for p in urllib.parse.urlsplit(text).path.split("/") if p]) < 2:
        raise InputError(f"{text!r}: an RTMP URL names an application and a stream key: rtmp://HOST[:PORT]/APP/KEY")
    return text


def _check_host(text: str) -> None:
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise InputError(f"{text!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname or any(c.isspace() for c in text):
        raise InputError(f"{text!r}: a malformed URL (no host, or spaces in it)")
    if port == 0:
        raise InputError(f"{text!r}: port 0")


def is_live(url: str) -> bool:
    """Read as it arrives (True), or paced by its timestamps like a file (False)."""
    return url.split("://", 1)[0].lower() in LIVE_SCHEMES if "://" in url else False


# -- the reader ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReaderSettings:
    url: str
    listen: bool = False
    video: bool = True
    audio: bool = True
    open_timeout: float = 10.0  # seconds for an attempt to open and probe (listen: per LISTEN_WAIT round)
    read_timeout: float = 5.0  # no data for this long: the input is lost
    retries: int = 0  # attempts after the first before a never-opened input is given up
    paced: bool | None = None  # None: files and http(s) are paced, rtmp/srt are not


class SourceReader:
    """Opens, demuxes and decodes one input in its own thread, and reopens it when it fails.

    ``deliver`` is called from that thread with each ``Picture``, ``Audio`` and ``Status``. Once
    the input has opened, it is reopened forever, with backoff, until ``stop()``; before that, it
    is given up (``Status("failed")``) after ``retries`` more attempts. A paced input that reaches
    its end is ``ended``; a live one is ``lost`` and reopened.
    """

    def __init__(self, settings: ReaderSettings, deliver: Callable[[object], None]):
        self.settings = settings
        self._deliver = deliver
        self._stop = threading.Event()
        self._paced = settings.paced if settings.paced is not None else not (settings.listen or is_live(settings.url))
        self._thread = threading.Thread(target=self._run, name=f"ingest {settings.url}", daemon=True)
        self.connections = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                container = self._open()
            except (av.error.FFmpegError, OSError) as exc:
                if self.settings.listen and isinstance(exc, TimeoutError):
                    continue  # nobody published during this round: listen again
                attempt += 1
                reason = error_reason(exc)
                if not self.connections and attempt > self.settings.retries:
                    self._deliver(Status("failed", {"reason": reason, "attempts": attempt}))
                    return
                log.info("input %s: %s (attempt %d)", self.settings.url, reason, attempt)
                self._stop.wait(backoff_seconds(attempt))
                continue
            attempt = 0
            self.connections += 1
            try:
                reason = self._read(container)
            finally:
                container.close()
            if reason is None:
                if not self._stop.is_set():
                    self._deliver(Status("ended", {}))
                return
            if not self._stop.is_set():
                self._deliver(Status("lost", {"reason": reason}))
                self._stop.wait(BACKOFF[0])

    def _open(self) -> av.container.InputContainer:
        settings = self.settings
        options = {}
        if "://" in settings.url:  # a backstop: PyAV's timeouts below govern the open and each read
            options["rw_timeout"] = str(int(max(settings.open_timeout, settings.read_timeout) * 1e6))
        if not self._paced:  # live: what arrived while the stream was probed is stale, not to be handed over in a burst
            options["fflags"] = "nobuffer"
        if settings.listen:
            options.update(listen="1", timeout=str(LISTEN_WAIT))  # rtmp's "timeout": how long to listen
            timeout = (LISTEN_WAIT + settings.open_timeout, settings.read_timeout)
        else:
            timeout = (settings.open_timeout, settings.read_timeout)
        options.update(input_options(settings.url))  # its scheme's protocols only (transport/media_probe.py)
        container = av.open(settings.url, "r", options=options, timeout=timeout)
        # The pictures are what is lip-synced; audio may be missing (silence), unless it is all we read.
        missing = "video" if settings.video and not container.streams.video else (
            "audio" if not settings.video and not container.streams.audio else None)
        if missing:
            container.close()
            raise MissingStream(f"it has no {missing} stream")
        return container

    def _read(self, container: av.container.InputContainer) -> str | None:
        """Deliver until the input ends (None) or fails (the reason)."""
        video = container.streams.video[0] if container.streams.video and self.settings.video else None
        audio = container.streams.audio[0] if container.streams.audio and self.settings.audio else None
        if video is not None:
            video.thread_type = "SLICE"  # frame threads would hold each picture back by a frame per thread
        self._deliver(Status("connected", {
            "video": f"{video.codec_context.name} {video.codec_context.width}x{video.codec_context.height}"
                     if video is not None else None,
            "audio": f"{audio.codec_context.name} {audio.codec_context.sample_rate} Hz "
                     f"{audio.codec_context.layout.name}" if audio is not None else None}))
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_RATE)
        pace: tuple[float, float] | None = None  # (monotonic, ts) the schedule starts from
        streams = [s for s in (video, audio) if s is not None]
        try:
            for packet in container.demux(streams):
                if self._stop.is_set():
                    return "stopped"
                if packet.dts is None:
                    continue
                ts = float(packet.pts * packet.time_base) if packet.pts is not None else None
                if self._paced and ts is not None:
                    pace = self._wait_for(pace, ts)
                arrived = time.monotonic()
                for frame in packet.decode():
                    at = float(frame.pts * frame.time_base) if frame.pts is not None else ts
                    if packet.stream is video:
                        self._deliver(Picture(frame.to_ndarray(format="rgb24"), at, arrived))
                    else:
                        frame.pts = None  # resample by count: the timestamp goes with the block
                        parts = [f.to_ndarray() for f in resampler.resample(frame)]
                        if parts and at is not None:
                            self._deliver(Audio(np.concatenate(parts, axis=1), at, arrived))
        except (av.error.FFmpegError, OSError) as exc:
            return error_reason(exc)
        return None if self._paced else "the stream ended"

    def _wait_for(self, pace: tuple[float, float] | None, ts: float) -> tuple[float, float]:
        """Sleep until ``ts`` is due on the schedule (a new one after a jump back or a long lag)."""
        now = time.monotonic()
        if pace is None or ts < pace[1] or now - (pace[0] + ts - pace[1]) > PACE_RESET:
            return now, ts
        self._stop.wait(max(0.0, pace[0] + ts - pace[1] - now))
        return pace


def backoff_seconds(attempt: int, first: float = BACKOFF[0], last: float = BACKOFF[1]) -> float:
    """Seconds to wait before attempt ``attempt`` + 1: doubling from ``first``, at most ``last``."""
    return min(last, first * 2 ** (attempt - 1))


def error_reason(exc: BaseException) -> str:
    """An FFmpeg or socket error as a short phrase for a log line or an event."""
    if isinstance(exc, (TimeoutError, av.error.ExitError)):  # ExitError: PyAV's timeout stopped FFmpeg
        return "no answer in time"
    text = getattr(exc, "strerror", None) or str(exc)
    return text if text else type(exc).__name__
