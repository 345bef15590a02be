"""``run_stream.py serve``: the page, WebRTC signalling, the session API and avatar uploads over aiohttp.

    GET  /                       the page (transport/static/index.html, app.js)
    POST /offer                  {"sdp", "type": "offer", "mode": "camera"|"avatar"|"viewer",
                                  "avatar": ID, "session": NAME (viewer), "options": {}}
                                 -> {"sdp", "type": "answer", "session": NAME}; 400 bad input, 503 full
    POST /sessions               create a program session: {"session": NAME?, "avatar": ID|"default",
                                  "audio": {"rate", "channels"}, "options": {}} -> its description
    GET  /sessions               every session's counters, and the last ones that closed
    GET  /sessions/NAME          one session;  DELETE /sessions/NAME closes it
    POST /sessions/NAME/control  {"cmd": "interrupt" | "avatar" | "options" | "close", ...}
    GET  /sessions/NAME/audio    WebSocket: binary PCM s16le in (the declared format), JSON commands
                                 in, the session's events out
    POST /avatar                 multipart "file": a portrait or a clip with a face -> {"avatar": ID, ...}
    GET  /avatars                the avatars a session can choose ("default": the one given with --avatar)
    GET  /ice                    the STUN/TURN servers the page should use too
    GET  /metrics                Prometheus text format (transport/metrics.py)

The models are built once (one ``LipSync``); sessions live in a ``SessionManager`` shared with the
other transports (MQTT), and this module only translates HTTP, WebSocket and WebRTC to it.

Every request first passes transport/access.py (Host, Origin, Content-Type, the token when one is
set); the listener is bounded by transport/connections.py (header timeout, open connections), and
uploads by their size, by how many are decoded at once and by the avatar store's budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSMsgType, web
from aiortc import RTCSessionDescription
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest

from stream import commands
from stream.avatar_prep import AvatarCache
from stream.avatars import Avatar, AvatarStore, UnknownAvatar
from stream.program_audio import BufferFull
from stream.session_options import OptionError, SessionOptions
from stream.sessions import SessionError, SessionLimit, SessionManager
from transport.access import Access, exposure_warning
from transport.avatar_files import BadInput, load_avatar, load_avatar_file, upload_suffix
from transport.connections import start_listening
from transport.mqtt import MqttBridge, MqttSettings
from transport.logs import JsonLines
from transport.metrics import SessionMetrics
from transport.process_memory import (CycleCollector, freeze_loaded_objects, limit_malloc_arenas,
                                      thaw_loaded_objects)
from transport.webrtc import IceSettings, Peer

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MODES = {"camera": "camera", "avatar": "microphone", "viewer": "viewer"}  # offer mode -> peer role
KEPT_AVATARS = 8
OFFER_MAX_BYTES = 1 << 20  # an SDP offer is a few kB


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 4
    max_upload_mb: float = 20.0
    avatar: str | None = None  # the default avatar (a portrait or a clip); checked at construction
    ice: IceSettings = field(default_factory=IceSettings)
    max_viewers: int = 8  # WebRTC viewers per session
    idle_seconds: float = 300.0  # a program session nobody feeds or watches closes after this
    mqtt: MqttSettings | None = None  # also take commands and audio over MQTT (transport/mqtt.py)
    avatar_cache: str | None = None  # where prepared avatars are kept on disk (None: in memory only)
    token: str | None = None  # required on every API route, the WebSocket and MQTT commands when set
    allowed_hosts: tuple[str, ...] = ()  # Host names besides loopback and ``host`` ("*": any)
    header_timeout: float = 10.0  # seconds for a connection to send a whole request's headers
    max_connections: int = 256  # open HTTP connections (WebSockets included); past it, 503
    max_uploads: int = 2  # avatar uploads read and decoded at once; past it, 503
    max_avatar_mb: float = 1024.0  # uploaded avatars kept in memory, in all (least recently used go)

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.max_connections < 1 or self.max_uploads < 1 or self.max_avatar_mb <= 0:
            raise ValueError("the header timeout and the avatar budget must be positive, the connection "
                             "and upload limits at least 1")


class LipstreamServer:
    """The HTTP/WebRTC face of a ``SessionManager``: the shared models, sessions and avatars."""

    def __init__(self, lipsync, settings: ServeSettings, manager: SessionManager | None = None) -> None:
        self.lipsync = lipsync
        self.settings = settings
        self.fps = int(lipsync.config["fps"])
        # Every avatar is prepared once, when it arrives (stream/avatar_prep.py): its sessions then
        # run no face detection and no VAE encode per frame.
        self.avatar_cache = AvatarCache(settings.avatar_cache, max_bytes=int(settings.max_avatar_mb * 2**20))
        self.manager = manager or SessionManager(lipsync, max_sessions=settings.max_sessions,
                                                 idle_seconds=settings.idle_seconds,
                                                 avatar_cache=self.avatar_cache)
        default = self._prepared(load_avatar_file(settings.avatar, self.fps)) if settings.avatar else None
        self.avatars = AvatarStore(default, keep=KEPT_AVATARS, max_bytes=int(settings.max_avatar_mb * 2**20))
        self.access = Access(settings.host, settings.token, settings.allowed_hosts)
        self._uploads = asyncio.Semaphore(settings.max_uploads)
        self.peers: set[Peer] = set()
        self.cycles = CycleCollector()  # frees closed sessions and peers (transport/process_memory.py)
        self.mqtt: MqttBridge | None = None
        self._uninstall_ice = None
        self.metrics = SessionMetrics(self.manager)  # other transports add gauges (add_gauge)
        self.registry = CollectorRegistry()
        self.registry.register(self.metrics)
        ProcessCollector(registry=self.registry)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=OFFER_MAX_BYTES,  # uploads stream past it
                              middlewares=[self.access.middleware])
        app.add_routes([
            web.get("/", self.index),
            web.post("/offer", self.offer),
            web.post("/sessions", self.create_session),
            web.get("/sessions", self.list_sessions),
            web.get("/sessions/{name}", self.get_session),
            web.delete("/sessions/{name}", self.delete_session),
            web.post("/sessions/{name}/control", self.control_session),
            web.get("/sessions/{name}/audio", self.session_audio),
            web.post("/avatar", self.upload_avatar),
            web.get("/avatars", self.list_avatars),
            web.get("/ice", self.ice_servers),
            web.get("/metrics", self.scrape),
            web.static("/static", STATIC),
        ])
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _startup(self, app: web.Application) -> None:
        limit_malloc_arenas()  # before any session's threads (transport/process_memory.py)
        freeze_loaded_objects()  # the models and libraries: out of every later collector pass
        self.manager.on_created(lambda session: session.on_closed(self.cycles.closed))
        self.metrics.add_gauge("lipstream_gc_seconds", lambda: self.cycles.seconds,
                               "Seconds spent collecting what closed sessions left in reference cycles")
        self._uninstall_ice = self.settings.ice.install(asyncio.get_running_loop())
        self.manager.start_expiry()
        worker = self.lipsync.worker
        if worker is not None:  # serve --batch (stream/model_worker.py)
            self.metrics.add_gauge("lipstream_model_worker_queued", lambda: float(worker.queued()),
                                   "Model jobs of all sessions waiting for a batch")
            self.metrics.add_gauge("lipstream_model_worker_busy_seconds", lambda: worker.busy_seconds,
                                   "Seconds the model worker has spent running batches")
            self.metrics.add_gauge("lipstream_model_worker_windows_per_call",
                                   lambda: worker.mean_batch_size(),
                                   "Windows per U-Net call, mean since the server started")
        if self.settings.mqtt is not None:
            self.mqtt = bridge = MqttBridge(self.manager, self.avatars, self.settings.mqtt, token=self.settings.token)
            bridge.start()
            self.metrics.add_gauge("lipstream_mqtt_connected", lambda: float(bridge.connected),
                                   "1 while the MQTT bridge is connected to its broker")

    async def _shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(peer.close() for peer in list(self.peers)), return_exceptions=True)
        await self.manager.close_all()
        if self.mqtt is not None:  # after the sessions, so that their last events and "offline" go out
            await self.mqtt.stop()
            self.mqtt = None
        if self._uninstall_ice is not None:
            self._uninstall_ice()
            self._uninstall_ice = None
        self.cycles.cancel()
        thaw_loaded_objects()

    def _peer_closed(self, peer: Peer) -> None:
        self.peers.discard(peer)
        self.cycles.closed()

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    # -- WebRTC ------------------------------------------------------------------------------

    async def offer(self, request: web.Request) -> web.Response:
        try:
            body = commands.parse_json(await request.read())
            offer = _read_offer(body)
            mode = body.get("mode", "camera")
            if mode not in MODES:
                raise BadInput(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
            if mode == "viewer":
                session = self.manager.get(body.get("session"))
                viewers = sum(1 for peer in self.peers if peer.session is session and peer.role == "viewer")
                if viewers >= self.settings.max_viewers:
                    return _error(503, f"session {session.name!r} has {viewers} viewers, the most it may")
            else:
                avatar = self.avatars.get(body.get("avatar")).playable() if mode == "avatar" else None
                session = self.manager.create(mode, avatar=avatar,
                                              options=SessionOptions.from_json(body.get("options")))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the offer is over {OFFER_MAX_BYTES} bytes")
        except SessionLimit as exc:
            return _error(503, str(exc))
        except (BadInput, commands.CommandError, OptionError, SessionError, UnknownAvatar) as exc:
            return _error(400, str(exc))
        peer = Peer(session, self.settings.ice, role=MODES[mode], on_closed=self._peer_closed)
        self.peers.add(peer)
        try:
            answer = await peer.answer(offer)
        except ValueError as exc:
            await peer.close()
            return _error(400, str(exc))
        except BaseException:
            await peer.close()
            raise
        log.info("%s peer on session %s: %d sessions", mode, session.name, len(self.manager.sessions))
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "session": session.name})

    # -- the session API ---------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        try:
            body = commands.parse_json(await request.read())
            session = await commands.create_program_session(self.manager, self.avatars, body)
        except commands.CommandError as exc:
            return _error(400, str(exc))
        except SessionLimit as exc:
            return _error(503, str(exc))
        return web.json_response(session.describe())

    async def list_sessions(self, request: web.Request) -> web.Response:
        return web.json_response(self.manager.describe())

    def _session(self, request: web.Request):
        try:
            return self.manager.get(request.match_info["name"])
        except SessionError as exc:
            raise web.HTTPNotFound(text=json.dumps({"error": str(exc)}), content_type="application/json")

    async def get_session(self, request: web.Request) -> web.Response:
        return web.json_response(self._session(request).describe())

    async def delete_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        await session.close(reason="closed by a client")
        return web.json_response({"event": "closed", "session": session.name})

    async def control_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        try:
            reply = await commands.apply(session, self.avatars, commands.parse_json(await request.read()))
        except commands.CommandError as exc:
            return _error(400, str(exc))
        return web.json_response(reply)

    async def session_audio(self, request: web.Request) -> web.WebSocketResponse:
        """PCM in as binary messages, commands in as text, the session's events out as text."""
        session = self._session(request)
        socket = web.WebSocketResponse(heartbeat=20)
        await socket.prepare(request)
        events: asyncio.Queue = asyncio.Queue(maxsize=256)

        def queue_event(event: dict) -> None:
            if not events.full():  # a client that never reads loses events, not the server's memory
                events.put_nowait(event)

        stop_listening = session.listen(queue_event)
        sender = asyncio.ensure_future(_send_events(socket, events))
        stop_waiting = session.on_closed(lambda: events.put_nowait(None) if not events.full() else None)
        try:
            async for message in socket:
                if message.type == WSMsgType.BINARY:
                    try:
                        session.write_audio(message.data)
                    except BufferFull:
                        pass  # the session told every listener (buffer_full)
                    except ValueError as exc:
                        session.report_error(str(exc))
                elif message.type == WSMsgType.TEXT:
                    try:  # its event reaches this socket as a listener
                        await commands.apply(session, self.avatars, commands.parse_json(message.data))
                    except commands.CommandError as exc:
                        session.report_error(str(exc))
        finally:
            stop_listening()
            stop_waiting()
            sender.cancel()
        return socket

    # -- avatars and ICE ---------------------------------------------------------------------

    async def upload_avatar(self, request: web.Request) -> web.Response:
        """One upload read and decoded at a time per ``max_uploads`` place: each may hold its bytes and
        a few hundred MB of frames while it is checked, so how many run at once bounds the server's memory."""
        if self._uploads.locked():
            return _error(503, f"{self.settings.max_uploads} avatar uploads are being checked: try again shortly")
        async with self._uploads:
            return await self._upload_avatar(request)

    async def _upload_avatar(self, request: web.Request) -> web.Response:
        limit = int(self.settings.max_upload_mb * 1024 * 1024)
        try:
            reader = await request.multipart()
            part = await reader.next()
            while part is not None and part.name != "file":
                part = await reader.next()
        except (ValueError, AssertionError, KeyError) as exc:
            return _error(400, f'send the file as multipart/form-data field "file" ({exc})')
        if part is None:
            return _error(400, 'send the file as multipart/form-data field "file"')
        try:
            suffix = upload_suffix(part.headers.get("Content-Type"), part.filename)
        except BadInput as exc:
            return _error(415, str(exc))
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            data += chunk
            if len(data) > limit:
                return _error(413, f"the upload is over the {self.settings.max_upload_mb:g} MB limit")
        name = part.filename or "upload" + suffix
        try:
            avatar = await asyncio.to_thread(
                lambda: self._prepared(load_avatar(bytes(data), suffix, name, self.fps)))
        except BadInput as exc:
            return _error(400, str(exc))
        return web.json_response(avatar.describe(self.avatars.add(avatar)))

    def _prepared(self, avatar: Avatar) -> Avatar:
        avatar.prepared = self.avatar_cache.prepare(avatar.frames, self.lipsync)
        return avatar

    async def list_avatars(self, request: web.Request) -> web.Response:
        return web.json_response(self.avatars.describe())

    async def ice_servers(self, request: web.Request) -> web.Response:
        servers = [{"urls": s.urls, **({"username": s.username, "credential": s.credential}
                                       if s.username else {})}
                   for s in self.settings.ice.configuration().iceServers]
        return web.json_response({"iceServers": servers})

    async def scrape(self, request: web.Request) -> web.Response:
        """Prometheus: read here, on the loop that owns the sessions (see transport/metrics.py)."""
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _read_offer(body: dict) -> RTCSessionDescription:
    sdp, kind = body.get("sdp"), body.get("type")
    if not isinstance(sdp, str) or not sdp.startswith("v=0") or "\nm=" not in sdp:
        raise BadInput('"sdp" must be the offer\'s SDP text (v=0 ... m= sections)')
    if kind != "offer":
        raise BadInput(f'"type" must be "offer", not {kind!r}')
    return RTCSessionDescription(sdp=sdp, type=kind)


async def _send_events(socket: web.WebSocketResponse, events: asyncio.Queue) -> None:
    while (event := await events.get()) is not None:
        await socket.send_str(json.dumps(event))
    await socket.close()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def serve(lipsync, settings: ServeSettings, log_json: bool = False) -> None:
    """Run the server until interrupted; every session is closed on the way out.

    ``log_json``: log one JSON object a line (transport/logs.py) instead of plain text.
    Raises BadInput when the default avatar cannot be used.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if log_json else logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for chatty in ("aiohttp.access", "aioice", "aiortc"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    asyncio.run(_serve_until_stopped(LipstreamServer(lipsync, settings)))


async def listen(server: LipstreamServer) -> web.AppRunner:
    """Serve ``server`` on its settings' host and port, with the header timeout and connection cap of
    transport/connections.py; ``await runner.cleanup()`` stops it and closes every session. Warns
    when it listens beyond loopback without a token (transport/access.py)."""
    settings = server.settings
    warning = exposure_warning(settings.host, settings.token)
    if warning:
        log.warning(warning)
    return await start_listening(server.app(), settings.host, settings.port, header_timeout=settings.header_timeout,
                                 max_connections=settings.max_connections)


async def _serve_until_stopped(server: LipstreamServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    runner = await listen(server)
    print(f"lipstream: open http://{server.settings.host}:{server.settings.port}/ (Ctrl-C to stop)", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
