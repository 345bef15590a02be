"""Test media made at test time, and a lipstream server running in a background thread.

Everything stays on loopback: the server offers 127.0.0.1 host candidates only (aioice skips
loopback unless told, see ``IceSettings.hosts``) and no STUN/TURN server is configured.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from aiortc.mediastreams import MediaStreamTrack

from av_helpers import decode, write_video, write_wav
from stream.config import load_config
from stream.pipeline import LipSync
from transport.files import read_audio
from transport.server import LipstreamServer, ServeSettings, listen
from transport.webrtc import IceSettings

REPO = Path(__file__).resolve().parents[1]

LOOPBACK_ICE = IceSettings(hosts=("127.0.0.1",))
# (width, height): small enough for 2 cores to decode, lip-sync and re-encode at 25 fps.
CAMERA_SIZE = (360, 640)


def make_camera_files(source: Path, folder: Path, seconds: float = 6.0,
                      size: tuple[int, int] = CAMERA_SIZE) -> tuple[Path, Path]:
    """A .y4m (what Chromium's fake camera plays) and a 48 kHz .wav (its fake microphone) from a clip."""
    y4m, wav = folder / "camera.y4m", folder / "microphone.wav"
    frames = int(seconds * 25)
    with av.open(str(source)) as container, av.open(str(y4m), "w", format="yuv4mpegpipe") as out:
        stream = out.add_stream("rawvideo", rate=25)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i, frame in enumerate(container.decode(video=0)):
            if i >= frames:
                break
            picture = frame.reformat(width=size[0], height=size[1], format="yuv420p")
            picture.pts, picture.time_base = i, Fraction(1, 25)
            out.mux(stream.encode(picture))
        out.mux(stream.encode(None))
    write_wav(wav, read_audio(source)[1][0, : int(seconds * 48_000)], 48_000)
    return y4m, wav


def make_clip(y4m: Path, path: Path, frames: int = 50) -> Path:
    """A short H.264 mp4 of the fake camera's first frames: an avatar clip to upload."""
    return write_video(path, decode(y4m, limit=frames))


class LoopingTrack(MediaStreamTrack):
    """A camera or microphone for an aiortc test peer: loops a file's frames in real time.

    aiortc's MediaPlayer restarts timestamps when it loops, which its VP8 encoder rejects.
    """

    def __init__(self, kind: str, frames: list, step: int, rate: int) -> None:
        super().__init__()
        self.kind, self._frames, self._step, self._rate = kind, frames, step, rate
        self._index = 0
        self._started: float | None = None

    @classmethod
    def camera(cls, y4m: Path) -> "LoopingTrack":
        with av.open(str(y4m)) as container:
            frames = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
        return cls("video", frames, step=90_000 // 25, rate=90_000)

    @classmethod
    def microphone(cls, wav: Path) -> "LoopingTrack":
        with wave.open(str(wav)) as source:
            samples = np.frombuffer(source.readframes(source.getnframes()), "<i2")
        chunks = [samples[i : i + 960] for i in range(0, len(samples) - 959, 960)]  # 20 ms at 48 kHz
        return cls("audio", chunks, step=960, rate=48_000)

    async def recv(self):
        if self._started is None:
            self._started = time.monotonic()
        pts = self._index * self._step
        await asyncio.sleep(max(0.0, self._started + pts / self._rate - time.monotonic()))
        data = self._frames[self._index % len(self._frames)]
        self._index += 1
        if self.kind == "video":
            frame = av.VideoFrame.from_ndarray(data, format="yuv420p")
        else:
            frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self._rate
        frame.pts, frame.time_base = pts, Fraction(1, self._rate)
        return frame


@functools.lru_cache(maxsize=1)
def tiny_lipsync():
    """The real tiny model, built once per test process like a server builds it once."""
    return LipSync.from_config(load_config("tiny"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerRequests:
    """Plain HTTP requests to a server at ``self.url``, and waiting for it to be idle."""

    url: str

    def request(self, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30) -> tuple[int, dict]:
        """(status, JSON body) of a GET (or a POST with ``body``), errors included."""
        request = urllib.request.Request(self.url + path, data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def post_json(self, path: str, payload, timeout: float = 30) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request(path, body, {"Content-Type": "application/json"}, timeout)

    def post_file(self, path: str, name: str, data: bytes, content_type: str) -> tuple[int, dict]:
        boundary = "lipstream-test-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        return self.request(path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def sessions(self) -> dict:
        return self.request("/sessions")[1]

    def wait_until_idle(self, timeout: float) -> float:
        """Seconds until no session is active; raises AssertionError past ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.sessions()["active"] == 0:
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"sessions still active after {timeout} s: {self.sessions()}")




class ServerThread(ServerRequests):
    """``transport.server`` on its own event loop in a daemon thread, bound to 127.0.0.1."""

    def __init__(self, batch: int = 0, **settings) -> None:
        """``batch``: as ``serve --batch``, a model worker batching up to that many windows (0: none)."""
        settings = {"host": "127.0.0.1", "port": free_port(), "ice": LOOPBACK_ICE, **settings}
        self.settings = ServeSettings(**settings)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        lipsync = tiny_lipsync()
        if batch:
            lipsync.share_model(max_batch=batch)
        self.server = LipstreamServer(lipsync, self.settings)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lipstream-server", daemon=True)
        self._runner = None
        self._error: BaseException | None = None

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            raise RuntimeError(f"the server did not start: {self._error}")
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def call(self, function):
        """``function()``'s result, called on the server's loop (which owns the server's state)."""
        async def on_loop():
            return function()
        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = self._loop.run_until_complete(listen(self.server))
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()


class ServerProcess(ServerRequests):
    """``run_stream.py serve --config tiny`` in a process of its own, bound to 127.0.0.1: measured
    from outside, as a user runs it (its resident set is its own, not the test process's)."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = ["serve", "--config", "tiny", "--host", "127.0.0.1", "--port", str(self.port),
                      "--ice-host", "127.0.0.1", *args]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen([sys.executable, "run_stream.py", *self._args], cwd=REPO,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}")
            try:
                self.sessions()
                return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("serve did not answer within 90 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def resident_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


class Viewer:
    """A receive-only aiortc peer watching a running session: every frame with its arrival time.

    ``frames`` holds (time.monotonic() on arrival, RGB image); audio frames are counted.
    """

    def __init__(self, url: str, session: str) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.url, self.session = url, session
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.frames: list[tuple[float, np.ndarray]] = []
        self.audio_frames = 0
        self._tasks: list[asyncio.Task] = []
        self.pc.on("track", lambda track: self._tasks.append(asyncio.ensure_future(self._read(track))))

    async def connect(self, http) -> tuple[int, dict]:
        """POST /offer in viewer mode; (status, body). On 200 the answer is applied."""
        from aiortc import RTCSessionDescription

        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer", "mode": "viewer", "session": self.session}
        async with http.post(self.url + "/offer", json=body) as reply:
            status, answer = reply.status, await reply.json()
        if status == 200:
            await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        return status, answer

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    self.frames.append((time.monotonic(), frame.to_ndarray(format="rgb24")))
                else:
                    self.audio_frames += 1
        except MediaStreamError:
            pass

    async def wait_for_frames(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count:
            assert time.monotonic() < deadline, f"{len(self.frames)} frames after {timeout} s ({self.pc.connectionState})"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()


async def run_session(session, feed) -> tuple[dict, list]:
    """Start ``session``, feed it with the coroutine ``feed`` (which ends it), and take every output
    frame until the end; returns (its final stats, the outputs). The session is closed after."""
    await session.start()
    feeder = asyncio.create_task(feed)
    outputs = []
    while (out := await session.output()) is not None:
        outputs.append(out)
    await feeder
    stats = session.stats()
    await session.close()
    return stats, outputs
