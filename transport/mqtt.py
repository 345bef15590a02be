"""``serve --mqtt``: program sessions driven over MQTT, one aiomqtt client per server.

    PREFIX/control       in   {"cmd": "create", "session": NAME, "avatar": ID|"default",
                               "audio": {"rate", "channels"}, "options": {}}  |  {"cmd": "close", "session": NAME}
    PREFIX/NAME/audio    in   PCM s16le, whole samples of the format declared at creation
    PREFIX/NAME/control  in   {"cmd": "interrupt"} | {"cmd": "avatar", "avatar": ID}
                              | {"cmd": "options", "options": {}} | {"cmd": "close"}
    PREFIX/NAME/events   out  every event of the session (JSON, QoS 1, not retained), and ``created``
    PREFIX/NAME/status   out  retained session.describe(), every second; emptied when the session closes
    PREFIX/events        out  errors that no session can take: a bad create or close on PREFIX/control,
                              a message for a session that does not exist
    PREFIX/status        out  retained {"state": "online", "sessions": [...], "max_sessions": N};
                              "offline" on a clean stop, and as the last will when the link dies

It is an adapter like transport/server.py, over the same ``SessionManager`` and ``AvatarStore``:
commands are read by stream/commands.py, so MQTT and HTTP answer bad input with the same words.
With a server token (``--token``), every JSON command carries it as ``"token"``; PCM on the audio
topics cannot, so give those topics to the publishers that may send with the broker's own ACLs.
Nothing a client sends can stop the bridge: every bad message becomes an ``error`` event. Sessions
made through other doors (HTTP, WebRTC) are published too, from the next status tick on.

The event loop is never blocked and memory stays bounded while the broker is away: events wait in
a bounded deque (the oldest go first when it is full), retained state in a dict holding only the
newest payload per topic, both drained by one task while connected. The link is re-made with
backoff (0.5 s doubling to 10 s); on each connection the bridge subscribes again (QoS 1) and
republishes every retained topic, so a broker that restarted without persistence is whole again.
Sessions never wait for the broker: their audio plays from their own buffer and they idle after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import urllib.parse
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable

import aiomqtt

from stream import commands
from stream.avatars import AvatarStore
from stream.live import LiveSession
from stream.program_audio import BufferFull
from stream.sessions import SessionLimit, SessionManager
from transport.access import token_matches

log = logging.getLogger(__name__)

BACKOFF_SECONDS = (0.5, 10.0)  # first and longest wait before connecting again
STATUS_PERIOD = 1.0
KEEPALIVE = 10  # seconds; a silently dead link is noticed after 1.5 times this
EVENT_BACKLOG = 1000  # events kept while the broker is away
RETAINED_BACKLOG = 256  # retained topics waiting; the clears of closed sessions are all that can pile up
INCOMING_BACKLOG = 1000  # messages received but not handled yet (aiomqtt drops past it, with a warning)
FLUSH_SECONDS = 2.0  # what a clean stop waits for the last events and "offline" to leave
PREFIX = re.compile(r"[^/+#\x00]+(/[^/+#\x00]+)*")


@dataclass(frozen=True)
class MqttSettings:
    """The broker and the topic prefix. ``ca``: a PEM file of the CAs that sign the broker's
    certificate (TLS only; default: the system's)."""

    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    prefix: str = "lipstream"

    def __post_init__(self) -> None:
        if not PREFIX.fullmatch(self.prefix):
            raise ValueError(f"MQTT prefix {self.prefix!r}: want topic levels without '+', '#' or empty levels")
        if self.password is not None and self.username is None:
            raise ValueError("an MQTT password needs a user name (--mqtt-user)")
        if self.ca is not None:
            if not self.tls:
                raise ValueError("an MQTT CA file is for TLS: use an mqtts:// URL")
            self.tls_context()  # a missing or unreadable file is told at once, not at the first connection

    @classmethod
    def from_url(cls, url: str, **fields) -> "MqttSettings":
        """mqtt://HOST[:PORT] (1883) or mqtts://HOST[:PORT] (TLS, 8883); raises ValueError."""
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"MQTT broker {url!r}: {exc}") from None
        if (parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.username is not None
                or parts.path not in ("", "/") or parts.query or parts.fragment):
            raise ValueError(f"MQTT broker {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] "
                             "(credentials go in --mqtt-user and --mqtt-password)")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls, **fields)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        try:
            return ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"MQTT CA file {self.ca}: {exc.strerror or exc}") from None


class MqttBridge:
    """MQTT in and out for the sessions of one ``SessionManager``; ``start()``, then ``await stop()``."""

    def __init__(self, manager: SessionManager, avatars: AvatarStore, settings: MqttSettings,
                 token: str | None = None) -> None:
        """``token``: when set, every JSON command must carry it as ``"token"`` (transport/access.py)."""
        self.manager = manager
        self.token = token
        self.avatars = avatars
        self.settings = settings
        self.prefix = settings.prefix
        self.identifier = f"lipstream-{uuid.uuid4().hex[:12]}"
        self.connected = False
        self._dropped = 0  # events lost to a full backlog since the last connection
        self._tls = settings.tls_context()
        self._events: deque[tuple[str, bytes]] = deque(maxlen=EVENT_BACKLOG)
        self._retained: dict[str, bytes] = {}  # topic -> the newest payload not yet published
        self._wake = asyncio.Event()  # something was queued
        self._sent_all = asyncio.Event()  # nothing is left to publish
        self._watched: dict[str, Callable[[], None]] = {}  # session name -> how to stop listening
        self._state = "online"
        self._server_status: bytes | None = None
        self._tasks: set[asyncio.Task] = set()
        self._connection: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None

    def start(self) -> None:
        self.manager.on_created(self._watch)  # its first events too, whichever door it came in by
        self._connection = asyncio.ensure_future(self._stay_connected())
        self._ticker = asyncio.ensure_future(self._tick())

    async def stop(self) -> None:
        """Publish "offline" (after what is still queued, for up to FLUSH_SECONDS) and disconnect."""
        if self._ticker is not None:
            self._ticker.cancel()
        self._state = "offline"
        self._publish_server_status()
        if self.connected:
            try:
                await asyncio.wait_for(self._sent_all.wait(), FLUSH_SECONDS)
            except asyncio.TimeoutError:
                log.warning("MQTT: stopped with messages still unsent")
        if self._connection is not None:
            self._connection.cancel()
        # Closes in progress finish (a session is never left half-closed); nothing else is running.
        await asyncio.gather(*(t for t in (self._connection, self._ticker, *self._tasks) if t is not None),
                             return_exceptions=True)
        for stop_listening in self._watched.values():
            stop_listening()
        self._watched.clear()

    # -- the connection ----------------------------------------------------------------------

    async def _stay_connected(self) -> None:
        delay = BACKOFF_SECONDS[0]
        will = aiomqtt.Will(f"{self.prefix}/status", self._status_payload("offline"), qos=1, retain=True)
        while True:
            client = aiomqtt.Client(self.settings.host, self.settings.port, username=self.settings.username,
                                    password=self.settings.password, identifier=self.identifier, will=will,
                                    keepalive=KEEPALIVE, tls_context=self._tls,
                                    max_queued_incoming_messages=INCOMING_BACKLOG)
            try:
                async with client:
                    self.connected = True
                    delay = BACKOFF_SECONDS[0]
                    log.info("MQTT: connected to %s, topics under %s/", self.settings.url, self.prefix)
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                log.warning("MQTT: %s: %s; trying again in %.1f s", self.settings.url, exc, delay)
            except Exception:
                log.exception("MQTT: the connection failed; trying again in %.1f s", delay)
            finally:
                self.connected = False
            await asyncio.sleep(delay)
            delay = min(2 * delay, BACKOFF_SECONDS[1])

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Subscribe, republish the retained state, then receive and publish until the link breaks."""
        await client.subscribe([(f"{self.prefix}/control", 1), (f"{self.prefix}/+/audio", 1),
                                (f"{self.prefix}/+/control", 1)])
        if self._dropped:
            log.warning("MQTT: %d events were dropped while the broker was away", self._dropped)
            self._dropped = 0
        self._server_status = None
        self._refresh()
        tasks = [asyncio.ensure_future(self._receive(client)), asyncio.ensure_future(self._publish(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _publish(self, client: aiomqtt.Client) -> None:
        """The one publisher: retained state first (a few topics), then events in order.

        A message leaves the queue only once the broker has it, so the one in flight when the link
        breaks is sent again on the next connection.
        """
        while True:
            if self._retained:
                topic, payload = next(iter(self._retained.items()))
                await client.publish(topic, payload, qos=1, retain=True)
                if self._retained.get(topic) is payload:
                    del self._retained[topic]
            elif self._events:
                item = self._events[0]
                await client.publish(*item, qos=1)
                if self._events and self._events[0] is item:
                    self._events.popleft()
            else:
                self._wake.clear()
                self._sent_all.set()
                await self._wake.wait()

    def _queue_event(self, topic: str, event: dict) -> None:
        if len(self._events) == self._events.maxlen:
            self._dropped += 1
        self._events.append((topic, json.dumps(event).encode()))
        self._wake.set()
        self._sent_all.clear()

    def _retain(self, topic: str, payload: bytes) -> None:
        self._retained.pop(topic, None)  # the newest goes last
        self._retained[topic] = payload
        while len(self._retained) > RETAINED_BACKLOG:
            del self._retained[next(iter(self._retained))]
        self._wake.set()
        self._sent_all.clear()

    # -- state and events out -----------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            self._refresh()
            await asyncio.sleep(STATUS_PERIOD)

    def _refresh(self) -> None:
        """Every session's status (watching the ones that came through another door), and the server's."""
        for name, session in list(self.manager.sessions.items()):
            try:
                if name in self._watched:
                    self._retain(f"{self.prefix}/{name}/status", json.dumps(session.describe()).encode())
                else:
                    self._watch(session)
            except Exception:
                log.exception("MQTT: cannot describe session %s", name)
        self._publish_server_status()

    def _watch(self, session: LiveSession) -> None:
        name = session.name
        if name in self._watched:
            return
        self._watched[name] = session.listen(lambda event: self._session_event(name, event))
        self._retain(f"{self.prefix}/{name}/status", json.dumps(session.describe()).encode())
        self._publish_server_status()

    def _session_event(self, name: str, event: dict) -> None:
        self._queue_event(f"{self.prefix}/{name}/events", event)
        if event["event"] == "closed":
            self._watched.pop(name, None)
            self._retain(f"{self.prefix}/{name}/status", b"")  # an empty retained message deletes it
            # The manager forgets the session right after telling its listeners.
            asyncio.get_running_loop().call_soon(self._publish_server_status)

    def _status_payload(self, state: str) -> bytes:
        sessions = sorted(self.manager.sessions) if state == "online" else []
        return json.dumps({"state": state, "sessions": sessions,
                           "max_sessions": self.manager.max_sessions}).encode()

    def _publish_server_status(self) -> None:
        payload = self._status_payload(self._state)
        if payload != self._server_status:
            self._server_status = payload
            self._retain(f"{self.prefix}/status", payload)

    def _error(self, topic: str, message: str, session: LiveSession | None = None,
               name: str | None = None) -> None:
        """An ``error`` event on the session's events topic, or on PREFIX/events when there is none."""
        if session is not None:
            if session.name not in self._watched:
                self._watch(session)
            session.report_error(f"{topic}: {message}")
        else:
            self._queue_event(f"{self.prefix}/events", {"event": "error", "session": name, "topic": topic,
                                                        "message": message})

    # -- messages in -------------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            try:
                await self._handle(topic, message.payload, message.retain)
            except Exception:
                log.exception("MQTT: handling a message on %s failed", topic)
                self._error(topic, "the server failed to handle this message (see its log)")

    async def _handle(self, topic: str, payload: bytes, retained: bool) -> None:
        levels = topic[len(self.prefix) + 1 :].split("/")
        if levels == ["control"]:
            await self._server_command(topic, payload, retained)
            return
        name, kind = levels
        session = self.manager.sessions.get(name)
        try:
            if retained:
                raise commands.CommandError("a retained message is not taken (it would be replayed at every "
                                            "reconnection): publish commands and audio without retain")
            # The token is checked first: without it, not even whether the session exists is told.
            body = None if kind == "audio" else self._command(payload)
            if session is None:
                raise commands.CommandError(f"no session {name!r}")
            if body is None:
                try:
                    session.write_audio(payload)
                except BufferFull:
                    pass  # the session told its listeners (buffer_full)
            else:
                if body.get("cmd") == "close":  # freeing a session takes a while: others' audio goes on
                    self._spawn(commands.apply(session, self.avatars, body))
                else:
                    await commands.apply(session, self.avatars, body)
        except ValueError as exc:  # CommandError, and write_audio's AudioRejected
            self._error(topic, str(exc), session, name)

    async def _server_command(self, topic: str, payload: bytes, retained: bool) -> None:
        name = None
        try:
            if retained:
                raise commands.CommandError("a retained command is not taken (it would be replayed at every "
                                            "reconnection): publish it without retain")
            body = self._command(payload)
            name = body.get("session") if isinstance(body.get("session"), str) else None
            command = body.get("cmd")
            if command == "create":
                if body.get("session") is None:
                    raise commands.CommandError(f'a create needs "session": NAME (its topics are '
                                                f'{self.prefix}/NAME/...)')
                session = await commands.create_program_session(self.manager, self.avatars, body)
                self._watch(session)
                self._queue_event(f"{self.prefix}/{session.name}/events",
                                  {"event": "created", "session": session.name, "media_time": 0.0})
            elif command == "close":
                self._spawn(self.manager.get(body.get("session")).close(reason="closed by a client"))
            else:
                raise commands.CommandError(
                    f"unknown command {command!r}: use create or close (a session's own "
                    f"commands go to {self.prefix}/NAME/control)")
        except (ValueError, SessionLimit) as exc:  # CommandError, SessionError
            self._error(topic, str(exc), name=name)

    def _command(self, payload: bytes) -> dict:
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            raise commands.CommandError(f"a binary payload ({len(payload)} bytes) on a control topic: commands "
                                        f"are JSON text; PCM goes to {self.prefix}/NAME/audio") from None
        body = commands.parse_json(text)
        given = body.pop("token", None)
        if self.token is not None and not (isinstance(given, str) and token_matches(given, self.token)):
            raise commands.CommandError('this server needs its access token: add "token": TOKEN to the command')
        return body

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("MQTT: a command failed", exc_info=task.exception())
