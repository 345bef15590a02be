"""A session's one output pump: every frame the session releases goes to every subscriber.

Subscribers are a transport's sinks (a WebRTC viewer's tracks, an RTMP writer): objects with
``offer(at, output)``, called on the event loop as each frame leaves, with ``at`` the frame's time on
the session's output clock (its ``due``) in seconds since the first frame's, and
``end()``, called once when the stream ends. The pump runs whether or not anyone watches, so a
session's clock, events and counters advance the same for zero viewers or ten. A sink that
is slower than the session must drop on its own side; ``offer`` never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Sink(Protocol):
    def offer(self, at: float, output) -> None: ...

    def end(self) -> None: ...


class Broadcast:
    def __init__(self, session) -> None:
        self._session = session
        self._sinks: list[Sink] = []
        self._task: asyncio.Task | None = None
        self.origin: float | None = None  # time.monotonic() when the first frame was due
        self.ended = False

    @property
    def sinks(self) -> int:
        return len(self._sinks)

    def subscribe(self, sink: Sink) -> None:
        if self.ended:
            sink.end()
        else:
            self._sinks.append(sink)

    def unsubscribe(self, sink: Sink) -> None:
        with contextlib.suppress(ValueError):
            self._sinks.remove(sink)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while (out := await self._session.output()) is not None:
                self.origin = out.due if self.origin is None else self.origin
                for sink in list(self._sinks):
                    sink.offer(out.due - self.origin, out)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session output failed")
        finally:
            self._end()

    def _end(self) -> None:
        self.ended = True
        # The session holds its broadcast: once the stream is over, let go of the session, so that a
        # closed session is freed as soon as nothing else holds it rather than by the cycle collector,
        # whose full passes come rarely in a process of this many objects.
        self._session = None
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.end()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._end()
