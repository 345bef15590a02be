"""Session places and memory against clients that take without giving: a peer that never sends, offers
that arrive together, and decompression bombs uploaded as avatars. Real aiortc peers, real HTTP,
the real tiny model, all on loopback; memory is the resident set of this process, where the server runs."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import threading
import time
import zlib

import aiohttp
import av
import cv2
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

import transport.webrtc
from media_helpers import ServerThread, make_camera_files
from stream.avatars import Avatar, AvatarStore
from test_webrtc_server import Client

BOUND_MB = 500


@pytest.fixture(scope="module")
def camera_files(media, tmp_path_factory):
    return make_camera_files(media / "speaker_wide.mp4", tmp_path_factory.mktemp("camera"), seconds=3)


@pytest.fixture(scope="module")
def server(media):
    with ServerThread(max_sessions=4, avatar=str(media / "portrait.png")) as running:
        yield running


# -- 2. a peer that never sends ------------------------------------------------------------------


class Silent(MediaStreamTrack):
    """A microphone that was offered and never gives a sample."""

    kind = "audio"

    async def recv(self):
        await asyncio.Event().wait()


async def _offer(pc: RTCPeerConnection, http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(url + "/offer", json={"sdp": pc.localDescription.sdp, "type": "offer",
                                               "mode": "avatar"}) as reply:
        return reply.status, await reply.json()


def test_a_receive_only_client_gets_no_session_place(server):
    async def run():
        async with aiohttp.ClientSession() as http:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            try:
                return await _offer(pc, http, server.url)
            finally:
                await pc.close()

    status, body = asyncio.run(run())
    assert status == 400 and "must send audio" in body["error"]  # before: 200, and the place was held forever
    assert server.sessions()["active"] == 0


def test_a_connected_peer_that_never_sends_is_let_go(server, monkeypatch):
    """The rule does not wait for a first frame: the peer stays connected, and its place is freed anyway."""
    monkeypatch.setattr(transport.webrtc, "FIRST_MEDIA_TIMEOUT", 3.0)

    async def run():
        async with aiohttp.ClientSession() as http:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTrack(Silent())
            pc.addTransceiver("video", direction="recvonly")
            try:
                status, answer = await _offer(pc, http, server.url)
                assert status == 200, answer
                answered = time.monotonic()
                await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
                while pc.connectionState != "connected":
                    assert time.monotonic() - answered < 10, pc.connectionState
                    await asyncio.sleep(0.05)
                active = (await (await http.get(server.url + "/sessions")).json())["active"]
                while (await (await http.get(server.url + "/sessions")).json())["active"]:
                    assert time.monotonic() - answered < 10, "the silent peer still holds its place"
                    await asyncio.sleep(0.1)
                return active, time.monotonic() - answered
            finally:
                await pc.close()

    active, freed_after = asyncio.run(run())
    assert active == 1
    assert 2.5 <= freed_after <= 6.0, freed_after
    print(f"silent peer freed {freed_after:.2f} s after its answer (first-media timeout 3 s)")


# -- 3. offers that arrive together ---------------------------------------------------------------


def test_four_offers_at_once_get_the_four_places(server, camera_files):
    async def run():
        async with aiohttp.ClientSession() as http:
            clients = [Client(server.url, "avatar", camera_files) for _ in range(4)]
            try:
                return [status for status, _ in await asyncio.gather(*(c.offer(http) for c in clients))]
            finally:
                await asyncio.gather(*(c.close() for c in clients))

    assert asyncio.run(run()) == [200, 200, 200, 200]
    server.wait_until_idle(timeout=25)  # never connected: freed by the first-media or connect timeout


# -- 4. decompression bombs -----------------------------------------------------------------------


def png_bomb(side: int = 30_000) -> bytes:
    """A valid side x side grey PNG of zeros: 4 MB on the wire, 2.7 GB as RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows, packer = b"\0" * ((side + 1) * 1000), zlib.compressobj(1)
    idat = b"".join(packer.compress(rows) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def clip_bomb(portrait: np.ndarray, frames: int = 100, size: tuple[int, int] = (3840, 2160)) -> bytes:
    """A 4K H.264 clip of a face: ~100 kB, 2.5 GB if every frame is decoded at full size and kept."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "40"}
        canvas = np.zeros((size[1], size[0], 3), np.uint8)
        canvas[: portrait.shape[0], : portrait.shape[1]] = portrait
        picture = av.VideoFrame.from_ndarray(canvas, format="rgb24").reformat(format="yuv420p")
        for index in range(frames):
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
    return out.getvalue()


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


class PeakResidentSet:
    """The largest resident set of this process while the block runs, sampled every 10 ms."""

    def __enter__(self) -> "PeakResidentSet":
        self.before = self.peak = resident_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, resident_mb())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident_mb())

    @property
    def added(self) -> float:
        return self.peak - self.before


def test_upload_bombs_stay_below_500_mb(media):
    portrait = cv2.cvtColor(cv2.imread(str(media / "portrait.png")), cv2.COLOR_BGR2RGB)
    png, clip = png_bomb(), clip_bomb(portrait)
    with ServerThread(max_upload_mb=8) as running:
        uploads = [("bomb.png", png, "image/png"), ("bomb.mp4", clip, "video/mp4")]
        with PeakResidentSet() as both:  # at once, as an attacker would send them
            results = [None, None]

            def upload(i: int) -> None:
                results[i] = running.post_file("/avatar", *uploads[i])

            threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
        (png_status, png_body), (clip_status, clip_body) = results
    assert png_status == 400 and "30000x30000" in png_body["error"], png_body
    assert clip_status == 200, clip_body  # decoded, scaled and prepared, every frame
    assert clip_body["frames"] == 100 and (clip_body["width"], clip_body["height"]) == (640, 360)
    print(f"bombs: {len(png) / 1e6:.1f} MB PNG and {len(clip) / 1e3:.0f} kB 4K clip at once: "
          f"+{both.added:.0f} MB resident at the peak ({both.before:.0f} MB before)")
    assert both.added < BOUND_MB, f"+{both.added:.0f} MB"


def test_uploads_past_the_limit_wait_outside(media):
    """One upload being read holds the only place: a second gets 503 until the first is over."""
    portrait = (media / "portrait.png").read_bytes()
    with ServerThread(max_uploads=1) as running:
        boundary = "slow-boundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", running.settings.port), timeout=10) as slow:
            slow.sendall((f"POST /avatar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(head) + 10**6}\r\n"
                          f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())
            slow.sendall(head + b"\0" * 1000)  # a million bytes promised, a thousand sent
            time.sleep(0.5)  # the handler reads the body
            busy, body = running.post_file("/avatar", "portrait.png", portrait, "image/png")
        deadline = time.monotonic() + 10
        while (after := running.post_file("/avatar", "portrait.png", portrait, "image/png"))[0] == 503:
            assert time.monotonic() < deadline, "the place was not given back"
            time.sleep(0.1)
    assert busy == 503 and "uploads are being checked" in body["error"]
    assert after[0] == 200, after


def test_the_avatar_store_keeps_a_byte_budget():
    frame = np.zeros((640, 640, 3), np.uint8)  # 1.2 MB
    store = AvatarStore(keep=8, max_bytes=5 * frame.nbytes)
    ids = [store.add(Avatar(f"clip{i}", [frame.copy(), frame.copy()])) for i in range(4)]
    assert [a["avatar"] for a in store.describe()] == ids[2:]  # the two oldest went: 4 frames fit, 8 do not
    assert store.nbytes <= 5 * frame.nbytes
    store.get(ids[2])  # used: the newest now
    big = store.add(Avatar("big", [frame.copy() for _ in range(7)]))  # over the budget alone: kept, alone
    assert [a["avatar"] for a in store.describe()] == [big]
