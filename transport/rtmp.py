"""``run_stream.py rtmp``: live dubbing. One stream in, the same stream lip-synced out, on any RTMP server.

    --in URL | FILE, or --listen rtmp://HOST:PORT/APP/KEY (a publisher such as OBS connects to us)
        -> SourceReader (transport/ingest.py) -> SessionFeed -> LiveSession "camera"
        -> Broadcast -> Publisher (transport/publish.py) -> --out rtmp://... | FILE
                     -> WebRTC viewers, "viewer" mode of --serve's page and API

``--audio`` replaces the input's audio: FILE or URL (a second reader, played in real time; silence
after it ends), or ``api``: the session takes program audio, PCM written over --serve's
WebSocket (``WS /sessions/NAME/audio``), the same API as a program session's.

The relay runs until the input ends (a file), ``stop()`` (Ctrl-C), or a failure it cannot retry:
an input or output that never opened (``InputFailed``/``OutputFailed``: one line for the user).
Once the input has been up, it is reopened forever when it drops, while the output carries on
with the last picture and silence; once the output has been up, it is reopened forever too.
Every such change is an event of the session (``listen()``), counted in the summary.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from stream.session_options import AudioFormat, SessionOptions
from stream.sessions import SessionManager
from transport.ingest import ReaderSettings, SourceReader
from transport.session_feed import SessionFeed, Status
from transport.publish import OutputSettings, Publisher

log = logging.getLogger(__name__)

EVENTS = ("input_connected", "input_lost", "input_restored", "input_ended", "input_failed",
          "output_connected", "output_lost", "output_reconnected", "output_failed")
# After the pipeline has drained, how long the encoder may take to finish the stream.
CLOSE_TIMEOUT = 10.0


class RelayFailed(RuntimeError):
    """The input or the output could not be used (never opened, or a file could not be written)."""


@dataclass(frozen=True)
class RelaySettings:
    source: str  # checked by transport.ingest.check_input
    out: str  # checked by transport.publish.check_output
    listen: bool = False
    audio: str | None = None  # None: the input's own; "api": program audio; else a checked file or URL
    api_format: AudioFormat = AudioFormat(24_000, 1)
    options: SessionOptions = field(default_factory=SessionOptions)
    output: OutputSettings = field(default_factory=OutputSettings)
    open_timeout: float = 10.0
    read_timeout: float = 5.0
    retries: int = 0
    name: str = "rtmp"


class Relay:
    """One relay: ``await run()`` until it ends; ``stop()`` from the loop ends it early.

    ``manager``: the SessionManager the session is registered in (a server's, to be watched over
    WebRTC and driven over its API); a private one when None.
    """

    def __init__(self, lipsync, settings: RelaySettings, manager: SessionManager | None = None,
                 on_event: Callable[[dict], None] | None = None):
        self.lipsync = lipsync
        self.settings = settings
        self.manager = manager or SessionManager(lipsync, max_sessions=1)
        self.fps = int(lipsync.config["fps"])
        self._on_event = on_event
        self.session = None
        self.feed: SessionFeed | None = None
        self.publisher: Publisher | None = None
        self.readers: dict[str, SourceReader] = {}
        self.events: collections.Counter = collections.Counter()
        self._outcome: asyncio.Future | None = None
        self._stats: dict = {}  # the session's, taken just before it closes
        self.started_at: float | None = None

    def stop(self) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result("stopped")

    async def run(self) -> dict:
        """Relay until the input ends or ``stop()``; returns the summary. Raises RelayFailed."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        self._outcome = loop.create_future()
        program = settings.audio == "api"
        session = self.manager.create("camera", name=settings.name, options=settings.options,
                                      audio_format=settings.api_format if program else None)
        self.session = session
        session.listen(self._heard)
        self.started_at = time.monotonic()
        try:
            await session.start()
            audio_from = None if program else ("audio" if settings.audio else "in")
            self.feed = SessionFeed(session, audio_from=audio_from, fps=self.fps, on_status=self._status)
            self.publisher = Publisher(settings.out, self.fps, settings.output,
                                       report=lambda event, **fields: loop.call_soon_threadsafe(
                                           functools.partial(session.report, event, **fields)))
            session.broadcast.subscribe(_Output(self.feed, self.publisher))
            self.publisher.start()
            session.broadcast.start()
            reading = dict(open_timeout=settings.open_timeout, read_timeout=settings.read_timeout,
                           retries=settings.retries)
            self.readers["in"] = SourceReader(
                ReaderSettings(settings.source, listen=settings.listen, audio=audio_from == "in", **reading),
                self.feed.deliverer("in", loop))
            if audio_from == "audio":
                self.readers["audio"] = SourceReader(ReaderSettings(settings.audio, video=False, **reading),
                                                     self.feed.deliverer("audio", loop))
            for reader in self.readers.values():
                reader.start()
            asyncio.ensure_future(self._wait_published())
            outcome = await self._outcome
        finally:
            await self._shut_down()
        if isinstance(outcome, RelayFailed):
            raise outcome
        return self.summary()

    def _heard(self, event: dict) -> None:
        name = event["event"]
        if name in EVENTS:
            self.events[name] += 1
            log.info("%s", " ".join(f"{k}={v}" for k, v in event.items() if k not in ("session",)))
        if name == "output_failed":
            self._finish(RelayFailed(f"cannot publish to {event['output']}: {event['reason']}"))
        if self._on_event is not None:
            self._on_event(event)

    def _status(self, name: str, status: Status) -> None:
        if status.kind == "failed":
            what = self.settings.source if name == "in" else self.settings.audio
            self._finish(RelayFailed(f"cannot open {what}: {status.detail['reason']} "
                                     f"({status.detail['attempts']} attempt(s) of up to "
                                     f"{self.settings.open_timeout:g} s; see --timeout, --retries)"))
        elif status.kind == "ended" and name == "in":
            self.session.end()  # the pipeline drains, then the pump ends the publisher

    async def _wait_published(self) -> None:
        """The stream is finished once the publisher is: after the input ended, or the pipeline failed."""
        await asyncio.to_thread(self.publisher.done.wait)
        error = self.session.error
        self._finish(RelayFailed(f"the lip-sync pipeline failed: {error!r}") if error is not None else "ended")

    def _finish(self, outcome) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(outcome)

    async def _shut_down(self) -> None:
        for reader in self.readers.values():
            reader.stop()
        if self.session is not None:
            self._stats = self.session.stats() if self.session.stages else {}
            await self.session.close()
        if self.publisher is not None:
            self.publisher.end()
            await asyncio.to_thread(self.publisher.done.wait, CLOSE_TIMEOUT)
        if self.feed is not None:
            self.feed.close()

    def summary(self) -> dict:
        stats = self._stats or (self.session.stats() if self.session and self.session.stages else {})
        feed = self.feed
        return {
            **stats,
            "seconds": round(time.monotonic() - self.started_at, 2) if self.started_at else 0.0,
            "events": {name: self.events[name] for name in EVENTS},
            "pictures_in": feed.pictures if feed else 0,
            "audio_filled_s": round(feed.filled, 3) if feed else 0.0,
            "output": self.publisher.stats() if self.publisher else {},
        }


class _Output:
    """The relay's sink of the session's pump: the publisher, and the feed learning where pictures were shown."""

    def __init__(self, feed: SessionFeed, publisher: Publisher):
        self._feed, self._publisher = feed, publisher

    def offer(self, at: float, out) -> None:
        self._feed.shown(out)
        self._publisher.offer(at, out)

    def end(self) -> None:
        self._publisher.end()


async def serve_and_relay(lipsync, settings: RelaySettings, serve=None,
                          on_ready: Callable[[Relay], None] | None = None) -> dict:
    """Run a relay, with ``serve`` (transport.server.ServeSettings) also serving the page and API on
    the same SessionManager: WebRTC viewers watch the session, a program drives its audio.
    ``on_ready(relay)`` is called once the relay exists (to wire ``stop()`` to a signal)."""
    if serve is None:
        relay = Relay(lipsync, settings)
        if on_ready is not None:
            on_ready(relay)
        return await relay.run()
    from transport.server import LipstreamServer, listen

    server = LipstreamServer(lipsync, serve)
    relay = Relay(lipsync, settings, manager=server.manager)
    if on_ready is not None:
        on_ready(relay)
    runner = await listen(server)
    try:
        return await relay.run()
    finally:
        await runner.cleanup()


def format_summary(summary: dict) -> str:
    """The summary as a few lines for the terminal."""
    latency = summary.get("latency_ms", {})
    output = summary.get("output", {})
    events = ", ".join(f"{name} {count}" for name, count in summary["events"].items() if count) or "none"
    return "\n".join([
        f"rtmp {summary.get('config', '?')} on {summary.get('device', '?')}: {summary.get('frames_out', 0)} frames "
        f"out in {summary['seconds']:.1f} s ({summary.get('fps', 0):.2f} fps), "
        f"{summary.get('frames_generated', 0)} through the model",
        f"  added latency ms  p50 {latency.get('p50', 0):.0f}  p95 {latency.get('p95', 0):.0f}"
        f"   dropped {summary.get('dropped_frames', 0)}   clock slips {summary.get('clock_slips', 0)}",
        f"  output: {output.get('frames_written', 0)} frames written, {output.get('pictures_dropped', 0)} pictures "
        f"dropped, {output.get('pictures_repeated', 0)} repeated, {output.get('reconnects', 0)} reconnects   "
        f"audio: {summary['audio_filled_s']:.2f} s of silence while none came, retimed "
        + (f"by {summary['audio_retimed_ms']} ms" if summary.get("audio_retimed_ms") else "never"),
        f"  events: {events}",
    ])
