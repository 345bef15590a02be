"""The live sessions one server runs: create, find, list, close, a limit and idle expiry.

Transport-agnostic: WebRTC, the WebSocket audio API, MQTT and RTMP all create and find sessions
here, so the limit counts every session once whichever door it came through. A session is
registered the moment it is created, before any network handshake, so concurrent requests can
never both take the last place. Owned by the event loop.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import deque

from stream.avatar_prep import AvatarCache
from stream.live import LiveSession
from stream.session_options import AudioFormat, SessionOptions

KINDS = ("camera", "avatar", "program")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # also a valid MQTT topic level: no '/', '+' or '#'
RECENT_SESSIONS = 32


class SessionLimit(Exception):
    """The server runs as many sessions as it may."""


class SessionError(ValueError):
    """A session that cannot be created or found as asked: the message says why."""


class SessionManager:
    def __init__(self, lipsync, *, max_sessions: int = 4, idle_seconds: float = 300.0,
                 avatar_cache: AvatarCache | None = None):
        """``avatar_cache``: avatar sessions prepare their avatar once through it (stream/avatar_prep.py);
        without it, an avatar given as plain frames is tracked and encoded every frame."""
        self.lipsync = lipsync
        self.avatar_cache = avatar_cache
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self.sessions: dict[str, LiveSession] = {}
        self.recent: deque[dict] = deque(maxlen=RECENT_SESSIONS)
        self._expiry: asyncio.Task | None = None
        self._created_callbacks: list = []

    def create(self, kind: str, *, name: str | None = None, avatar=None,
               audio_format: AudioFormat | None = None,
               options: SessionOptions | None = None) -> LiveSession:
        """A new session, registered at once (start it with ``await session.start()``).

        ``kind``: camera (a peer's camera and microphone), avatar (an avatar driven by a peer's
        microphone) or program (an avatar driven by audio a program sends, watched by viewers).
        A camera session given ``audio_format`` takes its audio from a program too (live dubbing).
        Raises SessionLimit when full, SessionError for a bad name or kind.
        """
        if kind not in KINDS:
            raise SessionError(f"unknown session kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind != "camera" and avatar is None:
            raise SessionError(f"a {kind} session needs an avatar")
        if name is None:
            name = uuid.uuid4().hex[:12]
        elif not isinstance(name, str) or not NAME.fullmatch(name):
            raise SessionError(f"session name {name!r}: use 1-64 letters, digits, '-' or '_'")
        if name in self.sessions:
            raise SessionError(f"session {name!r} exists already")
        if len(self.sessions) >= self.max_sessions:
            raise SessionLimit(f"the server is full ({self.max_sessions} sessions): try again later")
        session = LiveSession(self.lipsync, name=name, kind=kind, avatar=avatar, options=options,
                              audio_format=audio_format if kind in ("program", "camera") else None,
                              avatar_cache=self.avatar_cache)
        self.sessions[name] = session
        session.on_closed(lambda: self._forget(name))
        for callback in list(self._created_callbacks):
            callback(session)
        return session

    def on_created(self, callback) -> None:
        """Call ``callback(session)`` for every session created from now on, whichever door it came in by."""
        self._created_callbacks.append(callback)

    def get(self, name: str) -> LiveSession:
        try:
            return self.sessions[name]
        except (KeyError, TypeError):
            raise SessionError(f"no session {name!r}") from None

    def describe(self) -> dict:
        return {"active": len(self.sessions), "max_sessions": self.max_sessions,
                "sessions": {name: session.describe() for name, session in self.sessions.items()},
                "recent": list(self.recent)}

    async def close(self, name: str) -> None:
        await self.get(name).close()

    async def close_all(self) -> None:
        await asyncio.gather(*(session.close() for session in list(self.sessions.values())),
                             return_exceptions=True)
        if self._expiry is not None:
            self._expiry.cancel()

    def _forget(self, name: str) -> None:
        session = self.sessions.pop(name, None)
        if session is not None:
            self.recent.append({"closed_at": time.time(), **session.describe()})

    def start_expiry(self, period: float = 1.0) -> None:
        """Close program sessions nobody has fed or watched for ``idle_seconds``."""
        if self._expiry is None:
            self._expiry = asyncio.ensure_future(self._expire(period))

    async def _expire(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            await self._close_idle()

    async def _close_idle(self) -> None:
        # A function of its own: a loop variable in ``_expire`` would keep the last session it saw,
        # with every frame and buffer it holds, alive for as long as the server runs.
        for session in [s for s in self.sessions.values() if s.kind == "program"]:
            if session.idle_for() > self.idle_seconds:
                await session.close(reason=f"idle for {self.idle_seconds:g} s")
