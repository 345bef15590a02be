"""``run_stream.py serve``: the page, WebRTC signalling and avatar uploads over aiohttp.

    GET  /            the page (transport/static/index.html, app.js)
    POST /offer       {"sdp", "type": "offer", "mode": "camera"|"avatar", "avatar": ID, "options": {}}
                      -> {"sdp", "type": "answer", "session": ID}; 400 on bad input, 503 when full
    POST /avatar      multipart "file": a portrait (png/jpeg/webp) or a clip (mp4/webm/mov) with a face
                      -> {"avatar": ID, "frames", "width", "height"}
    GET  /avatars     the avatars a session can choose ("default" is the one given with --avatar)
    GET  /sessions    live counters per session, and the last sessions that closed
    GET  /ice         the STUN/TURN servers the page should use too

One ``LipSync`` (the models) is built per server and shared; each offer gets its own
``LiveSession`` and ``Peer``, so sessions share no media state.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import tempfile
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from aiohttp import web
from aiortc import RTCSessionDescription

from stream.face_landmarks import FaceLandmarker
from stream.live import LiveSession
from transport.files import MediaError, read_video
from transport.webrtc import IceSettings, Peer

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MODES = ("camera", "avatar")
IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
CLIP_TYPES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov"}
# Avatars live in memory as RGB frames: bound what one upload can cost (640x640x3 x 200 = 245 MB
# at worst) and how many are kept (least recently used first out; a running session keeps its own).
AVATAR_LONG_SIDE = 640
CLIP_SECONDS = 8
KEPT_AVATARS = 8
RECENT_SESSIONS = 32
OFFER_MAX_BYTES = 1 << 20  # an SDP offer is a few kB
# What an offer's "options" may tune in its LiveSession (stream/live.py), with the JSON types allowed.
SESSION_OPTIONS = {"stride": (int,), "late_after": (int, float, type(None)), "vad": (bool,),
                   "fade_frames": (int,), "context_seconds": (int, float)}


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 4
    max_upload_mb: float = 20.0
    avatar: str | None = None  # the default avatar (a portrait or a clip); checked at construction
    ice: IceSettings = field(default_factory=IceSettings)


class BadInput(ValueError):
    """Something the client sent that cannot be used: answered with 400 and this message."""


@dataclass
class Avatar:
    name: str
    frames: list[np.ndarray]

    def describe(self, avatar_id: str) -> dict:
        height, width = self.frames[0].shape[:2]
        return {"avatar": avatar_id, "name": self.name, "frames": len(self.frames),
                "width": width, "height": height}

    def source(self) -> np.ndarray | list[np.ndarray]:
        return self.frames[0] if len(self.frames) == 1 else self.frames


def load_avatar(data: bytes, suffix: str, name: str, fps: int) -> Avatar:
    """Decode a portrait or a clip (re-timed to ``fps``) into RGB frames; it must show a face (blocking)."""
    if suffix in IMAGE_TYPES.values():
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise BadInput(f"{name}: not a readable image")
        frames = [cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)]
    else:
        with tempfile.NamedTemporaryFile(suffix=suffix) as clip:
            clip.write(data)
            clip.flush()
            try:
                frames = [f.image for f in itertools.islice(read_video(clip.name, fps), CLIP_SECONDS * fps)]
            except MediaError as exc:
                raise BadInput(f"{name}: not a readable clip ({exc})") from None
    frames = [_fit(frame) for frame in frames]
    with FaceLandmarker(static_image=True) as landmarker:
        if landmarker.alignment_points(frames[0]) is None:
            raise BadInput(f"{name}: no face found in it (the first frame must show one face)")
    return Avatar(name, frames)


def load_avatar_file(path: str | Path, fps: int) -> Avatar:
    path = Path(path)
    try:
        suffix = upload_suffix(None, path.name)
        data = path.read_bytes()
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror}") from None
    return load_avatar(data, suffix, path.name, fps)


def _fit(image: np.ndarray) -> np.ndarray:
    """At most AVATAR_LONG_SIDE pixels on the long side, even sides (what the video encoder wants)."""
    height, width = image.shape[:2]
    scale = min(1.0, AVATAR_LONG_SIDE / max(height, width))
    size = (max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2))
    if size != (width, height):
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def upload_suffix(content_type: str | None, filename: str | None) -> str:
    known = {**IMAGE_TYPES, **CLIP_TYPES}
    if content_type in known:
        return known[content_type]
    suffix = Path(filename or "").suffix.lower()
    aliases = {".jpeg": ".jpg", ".m4v": ".mp4"}
    suffix = aliases.get(suffix, suffix)
    if suffix in known.values():
        return suffix
    raise BadInput(f"unsupported upload type {content_type or suffix or 'unknown'}: "
                   "send a png, jpeg or webp portrait, or an mp4, webm or mov clip")


@dataclass
class Session:
    """A live session as the server tracks it."""

    mode: str
    peer: Peer
    opened: float = field(default_factory=time.monotonic)

    def describe(self) -> dict:
        return {"mode": self.mode, "seconds": round(time.monotonic() - self.opened, 2),
                **self.peer.session.stats()}


class LipstreamServer:
    """The server's state: the shared models, the live sessions and the avatars."""

    def __init__(self, lipsync, settings: ServeSettings) -> None:
        self.lipsync = lipsync
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        self.recent: deque[dict] = deque(maxlen=RECENT_SESSIONS)
        self.avatars: OrderedDict[str, Avatar] = OrderedDict()
        self.fps = int(lipsync.config["fps"])
        self._default_avatar = load_avatar_file(settings.avatar, self.fps) if settings.avatar else None
        self._reserved = 0
        self._uninstall_ice = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=OFFER_MAX_BYTES)  # uploads stream past it
        app.add_routes([
            web.get("/", self.index),
            web.post("/offer", self.offer),
            web.post("/avatar", self.upload_avatar),
            web.get("/avatars", self.list_avatars),
            web.get("/sessions", self.list_sessions),
            web.get("/ice", self.ice_servers),
            web.static("/static", STATIC),
        ])
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _startup(self, app: web.Application) -> None:
        self._uninstall_ice = self.settings.ice.install(asyncio.get_running_loop())

    async def _shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(live.peer.close() for live in list(self.sessions.values())),
                             return_exceptions=True)
        if self._uninstall_ice is not None:
            self._uninstall_ice()
            self._uninstall_ice = None

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def offer(self, request: web.Request) -> web.Response:
        try:
            offer, mode, avatar, options = self._read_offer(await request.read())
        except BadInput as exc:
            return _error(400, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the offer is over {OFFER_MAX_BYTES} bytes")
        if len(self.sessions) + self._reserved >= self.settings.max_sessions:
            return _error(503, f"the server is full ({self.settings.max_sessions} sessions): try again later")
        self._reserved += 1
        try:
            return await self._connect(offer, mode, avatar, options)
        finally:
            self._reserved -= 1

    def _read_offer(self, text: bytes):
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise BadInput(f"the body is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise BadInput('the body must be a JSON object {"sdp", "type", "mode", ...}')
        sdp, kind = body.get("sdp"), body.get("type")
        if not isinstance(sdp, str) or not sdp.startswith("v=0") or "\nm=" not in sdp:
            raise BadInput('"sdp" must be the offer\'s SDP text (v=0 ... m= sections)')
        if kind != "offer":
            raise BadInput(f'"type" must be "offer", not {kind!r}')
        mode = body.get("mode", "camera")
        if mode not in MODES:
            raise BadInput(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise BadInput('"options" must be a JSON object')
        for name, value in options.items():
            if name not in SESSION_OPTIONS:
                raise BadInput(f"unknown option {name!r}: use {', '.join(SESSION_OPTIONS)}")
            kinds = SESSION_OPTIONS[name]
            if not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds):
                raise BadInput(f"option {name!r}: {value!r} is not a {'/'.join(k.__name__ for k in kinds)}")
        avatar = None
        if mode == "avatar":
            avatar = self._avatar(body.get("avatar"))
        return RTCSessionDescription(sdp=sdp, type=kind), mode, avatar, options

    def _avatar(self, avatar_id) -> Avatar:
        if avatar_id in (None, "", "default"):
            if self._default_avatar is None:
                raise BadInput("no avatar chosen and the server has no default one: upload a portrait "
                               "(POST /avatar) or start the server with --avatar PATH")
            return self._default_avatar
        if avatar_id not in self.avatars:
            raise BadInput(f"unknown avatar {avatar_id!r}: upload it first (POST /avatar)")
        self.avatars.move_to_end(avatar_id)
        return self.avatars[avatar_id]

    async def _connect(self, offer, mode: str, avatar: Avatar | None, options: dict) -> web.Response:
        session_id = uuid.uuid4().hex[:12]
        try:
            session = LiveSession(self.lipsync, avatar=None if avatar is None else avatar.source(), **options)
        except ValueError as exc:
            return _error(400, f"bad session options {options}: {exc}")
        peer = Peer(session, self.settings.ice, camera=mode == "camera",
                    describe={"session": session_id, "mode": mode},
                    on_closed=lambda _: self._forget(session_id))
        self.sessions[session_id] = Session(mode, peer)
        try:
            answer = await peer.answer(offer)
        except ValueError as exc:
            await peer.close()
            return _error(400, str(exc))
        except BaseException:
            await peer.close()
            raise
        log.info("session %s (%s) open: %d active", session_id, mode, len(self.sessions))
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "session": session_id})

    def _forget(self, session_id: str) -> None:
        live = self.sessions.pop(session_id, None)
        if live is not None:
            self.recent.append({"session": session_id, "closed_at": time.time(), **live.describe()})
            log.info("session %s closed: %d active", session_id, len(self.sessions))

    async def upload_avatar(self, request: web.Request) -> web.Response:
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
            avatar = await asyncio.to_thread(load_avatar, bytes(data), suffix, name, self.fps)
        except BadInput as exc:
            return _error(400, str(exc))
        avatar_id = uuid.uuid4().hex[:12]
        self.avatars[avatar_id] = avatar
        while len(self.avatars) > KEPT_AVATARS:
            self.avatars.popitem(last=False)
        return web.json_response(avatar.describe(avatar_id))

    async def list_avatars(self, request: web.Request) -> web.Response:
        listed = [avatar.describe(avatar_id) for avatar_id, avatar in self.avatars.items()]
        if self._default_avatar is not None:
            listed.insert(0, self._default_avatar.describe("default"))
        return web.json_response(listed)

    async def list_sessions(self, request: web.Request) -> web.Response:
        active = {session_id: {"connection": live.peer.pc.connectionState, **live.describe()}
                  for session_id, live in self.sessions.items()}
        return web.json_response({"active": len(active), "max_sessions": self.settings.max_sessions,
                                  "sessions": active, "recent": list(self.recent)})

    async def ice_servers(self, request: web.Request) -> web.Response:
        servers = [{"urls": s.urls, **({"username": s.username, "credential": s.credential}
                                       if s.username else {})}
                   for s in self.settings.ice.configuration().iceServers]
        return web.json_response({"iceServers": servers})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def serve(lipsync, settings: ServeSettings) -> None:
    """Run the server until interrupted; every peer is closed on the way out.

    Raises BadInput when the default avatar cannot be used.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for chatty in ("aiohttp.access", "aioice", "aiortc"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    app = LipstreamServer(lipsync, settings).app()
    ready = f"lipstream: open http://{settings.host}:{settings.port}/ (Ctrl-C to stop)"
    web.run_app(app, host=settings.host, port=settings.port, shutdown_timeout=5,
                print=lambda _: print(ready, flush=True))
