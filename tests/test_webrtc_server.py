"""The WebRTC server against a Python aiortc peer (no browser), and against bad input.

Runs the real tiny model. All traffic stays on 127.0.0.1 (see media_helpers.LOOPBACK_ICE).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from media_helpers import CAMERA_SIZE, LoopingTrack, ServerThread, make_camera_files, make_clip
from transport.webrtc import IceSettings

FRAMES = 50
TIMEOUT = 75
SDP_STUB = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"  # passes the shape check, nothing more


@pytest.fixture(scope="module")
def camera_files(media, tmp_path_factory):
    return make_camera_files(media / "speaker_wide.mp4", tmp_path_factory.mktemp("camera"))


@pytest.fixture(scope="module")
def server(media):
    with ServerThread(max_sessions=1, max_upload_mb=2, avatar=str(media / "portrait.png")) as running:
        yield running


@dataclass
class Received:
    session: str = ""
    video_sizes: list[tuple[int, int]] = field(default_factory=list)
    audio_samples: int = 0
    audio_rates: set[int] = field(default_factory=set)
    stats: list[dict] = field(default_factory=list)
    server_view: dict = field(default_factory=dict)


class Client:
    """An aiortc peer: sends the test camera/microphone files, counts what comes back."""

    def __init__(self, url: str, mode: str, camera_files, avatar: str | None = None) -> None:
        self.url, self.mode, self.avatar = url, mode, avatar
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.received = Received()
        y4m, wav = camera_files
        self._sources = [LoopingTrack.microphone(wav)]
        if mode == "camera":
            self._sources.append(LoopingTrack.camera(y4m))
        for track in self._sources:
            self.pc.addTrack(track)
        if mode != "camera":
            self.pc.addTransceiver("video", direction="recvonly")
        channel = self.pc.createDataChannel("stats")
        channel.on("message", lambda message: self.received.stats.append(json.loads(message)))
        self._counting: list[asyncio.Task] = []
        self.pc.on("track", lambda track: self._counting.append(asyncio.ensure_future(self._count(track))))

    async def offer(self, http: aiohttp.ClientSession) -> tuple[int, dict]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer", "mode": self.mode}
        if self.avatar:
            body["avatar"] = self.avatar
        async with http.post(self.url + "/offer", json=body) as reply:
            return reply.status, await reply.json()

    async def connect(self, http: aiohttp.ClientSession) -> None:
        status, answer = await self.offer(http)
        assert status == 200, answer
        self.received.session = answer["session"]
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    async def _count(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    self.received.video_sizes.append((frame.width, frame.height))
                else:
                    self.received.audio_samples += frame.samples
                    self.received.audio_rates.add(frame.sample_rate)
        except MediaStreamError:
            pass

    async def wait_for_frames(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received.video_sizes) < count:
            assert time.monotonic() < deadline, (
                f"{len(self.received.video_sizes)} video frames after {timeout} s "
                f"(connection {self.pc.connectionState})")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for task in self._counting:
            task.cancel()
        for track in self._sources:
            track.stop()
        await self.pc.close()


async def receive(server: ServerThread, mode: str, camera_files, avatar: str | None = None) -> Received:
    """Connect, take FRAMES frames, read the server's counters, hang up."""
    async with aiohttp.ClientSession() as http:
        client = Client(server.url, mode, camera_files, avatar)
        try:
            await client.connect(http)
            await client.wait_for_frames(FRAMES, TIMEOUT)
            async with http.get(server.url + "/sessions") as reply:
                client.received.server_view = await reply.json()
        finally:
            await client.close()
    return client.received


def test_camera_mode_with_an_aiortc_peer(server, camera_files):
    received = asyncio.run(receive(server, "camera", camera_files))
    assert len(received.video_sizes) >= FRAMES
    assert set(received.video_sizes) == {CAMERA_SIZE}, "the camera's own size comes back"
    assert received.audio_samples >= 48_000 * FRAMES / 25 / 2 and received.audio_rates == {48_000}
    live = received.server_view["sessions"][received.session]
    assert live["kind"] == "camera"
    assert live["frames_generated"] > 0, "frames went through the model"
    assert received.stats and received.stats[-1]["session"] == received.session
    assert {"fps", "latency_ms", "av_offset_ms", "frames_out"} <= set(received.stats[-1])

    released = server.wait_until_idle(timeout=5)
    closed = [s for s in server.sessions()["recent"] if s["session"] == received.session]
    assert closed and closed[0]["frames_generated"] >= live["frames_generated"]
    print(f"aiortc peer: session freed {released:.2f} s after hang-up; "
          f"server latency {closed[0]['latency_ms']}")


def test_avatar_mode_with_the_default_avatar(server, camera_files):
    received = asyncio.run(receive(server, "avatar", camera_files))
    assert len(received.video_sizes) >= FRAMES
    assert set(received.video_sizes) == {(640, 640)}, "portrait.png (1432 px square) fitted to 640"
    assert received.audio_samples > 0
    assert received.server_view["sessions"][received.session]["frames_generated"] > 0
    server.wait_until_idle(timeout=5)


def test_a_peer_that_vanishes_without_a_goodbye_is_freed_within_5_s(server, camera_files):
    """A crashed browser sends no DTLS close: the server notices its media stopped."""
    peer = subprocess.Popen(
        [sys.executable, "-c", VANISHING_PEER, server.url, *map(str, camera_files)],
        cwd=Path(__file__).parent, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().strip() == "receiving", "the peer did not get going"
        assert server.sessions()["active"] == 1
        peer.kill()
        killed = time.monotonic()
        peer.wait(10)
        server.wait_until_idle(timeout=5)
        print(f"vanished peer freed {time.monotonic() - killed:.2f} s after it was killed")
    finally:
        peer.kill()
        peer.wait(10)


# Run in a process of its own, so that it can die without closing anything.
VANISHING_PEER = """
import asyncio, sys
from pathlib import Path
import aiohttp
from media_helpers import LOOPBACK_ICE
from test_webrtc_server import Client

async def main(url, y4m, wav):
    LOOPBACK_ICE.install(asyncio.get_running_loop())
    async with aiohttp.ClientSession() as http:
        client = Client(url, "camera", (Path(y4m), Path(wav)))
        await client.connect(http)
        await client.wait_for_frames(5, 60)
        print("receiving", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


def test_session_limit(server, camera_files):
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            first = Client(server.url, "camera", camera_files)
            second = Client(server.url, "camera", camera_files)
            try:
                await first.connect(http)
                status, body = await second.offer(http)
                assert status == 503 and "full" in body["error"]
                await first.wait_for_frames(1, TIMEOUT)
            finally:
                await first.close()
            await asyncio.to_thread(server.wait_until_idle, 5)
            third = Client(server.url, "avatar", camera_files)
            try:
                await third.connect(http)  # the freed slot can be used again
                await third.wait_for_frames(1, TIMEOUT)
            finally:
                await third.close()

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT + 30))
    server.wait_until_idle(timeout=5)


def _offer_sdp() -> str:
    async def make() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "not JSON"),
    ([1, 2], "JSON object"),
    ({"type": "offer"}, '"sdp"'),
    ({"sdp": "v=0\r\nthis is not an offer\r\n", "type": "offer"}, '"sdp" must be'),
    ({"sdp": "garbage", "type": "offer"}, '"sdp" must be'),
    ({"sdp": SDP_STUB, "type": "answer"}, '"type" must be "offer"'),
    ({"sdp": SDP_STUB, "type": "offer", "mode": "puppet"}, "unknown mode"),
    ({"sdp": SDP_STUB, "type": "offer", "mode": "avatar", "avatar": "nope"}, "unknown avatar"),
    ({"sdp": SDP_STUB, "type": "offer", "options": "fast"}, '"options"'),
    ({"sdp": SDP_STUB, "type": "offer", "options": {"queue_size": 1000}}, "unknown option"),
    ({"sdp": SDP_STUB, "type": "offer", "options": {"stride": "4"}}, "not a int"),
])
def test_bad_offers_get_400_with_a_message(server, payload, message):
    status, body = server.post_json("/offer", payload)
    assert status == 400 and message in body["error"]
    assert server.sessions()["active"] == 0


@pytest.mark.parametrize("damage", ["a=ice-ufrag:", "a=fingerprint:", "m=video"])
def test_broken_sdp_gets_400_and_the_server_keeps_serving(server, damage):
    lines = _offer_sdp().splitlines(keepends=True)
    if damage == "m=video":  # a media line that no parser can read
        broken = "".join("m=video banana\r\n" if line.startswith(damage) else line for line in lines)
    else:
        broken = "".join(line for line in lines if not line.startswith(damage))
    status, body = server.post_json("/offer", {"sdp": broken, "type": "offer"})
    assert status == 400 and body["error"]
    server.wait_until_idle(timeout=5)
    assert server.request("/avatars")[0] == 200


def test_an_offer_without_video_is_refused(server):
    async def audio_only() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()
        return pc.localDescription.sdp

    status, body = server.post_json("/offer", {"sdp": asyncio.run(audio_only()), "type": "offer"})
    assert status == 400 and "no video" in body["error"]
    server.wait_until_idle(timeout=5)


def test_avatar_uploads_are_checked(server, media):
    portrait = (media / "portrait.png").read_bytes()
    status, body = server.post_file("/avatar", "portrait.png", portrait, "image/png")
    assert status == 200 and body["frames"] == 1 and (body["width"], body["height"]) == (640, 640)
    assert body["avatar"] in [a["avatar"] for a in server.request("/avatars")[1]]

    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    faceless = cv2.imencode(".png", cv2.merge([gradient, gradient[::-1], gradient]))[1].tobytes()
    status, body = server.post_file("/avatar", "gradient.png", faceless, "image/png")
    assert status == 400 and "no face" in body["error"]

    status, body = server.post_file("/avatar", "big.png", b"\0" * (3 * 1024 * 1024), "image/png")
    assert status == 413 and "2 MB" in body["error"]

    status, body = server.post_file("/avatar", "notes.txt", b"hello", "text/plain")
    assert status == 415 and "unsupported" in body["error"]

    status, body = server.post_file("/avatar", "broken.png", b"\x89PNG broken", "image/png")
    assert status == 400 and "not a readable image" in body["error"]

    status, body = server.post_file("/avatar", "broken.mp4", b"\0\0\0\x18ftypmp42 broken", "video/mp4")
    assert status == 400 and "not a readable clip" in body["error"]


def test_a_clip_avatar_is_uploaded_and_drives_a_session(server, camera_files, tmp_path):
    clip = make_clip(camera_files[0], tmp_path / "speaker.mp4", frames=30)
    status, body = server.post_file("/avatar", "speaker.mp4", clip.read_bytes(), "video/mp4")
    assert status == 200, body
    assert body["frames"] == 30 and (body["width"], body["height"]) == CAMERA_SIZE
    received = asyncio.run(receive(server, "avatar", camera_files, avatar=body["avatar"]))
    assert len(received.video_sizes) >= FRAMES, "the 30-frame clip loops"
    assert set(received.video_sizes) == {CAMERA_SIZE}
    server.wait_until_idle(timeout=5)


def test_avatar_mode_needs_an_avatar(media):
    with ServerThread() as bare:  # no --avatar
        status, body = bare.post_json("/offer", {"sdp": _offer_sdp(), "type": "offer", "mode": "avatar"})
    assert status == 400 and "--avatar" in body["error"]


def test_ice_settings_are_validated_and_never_default_to_a_public_stun_server():
    assert IceSettings().configuration().iceServers == []
    servers = IceSettings(stun=("stun:stun.example.org:3478",), turn=("turn:turn.example.org?transport=tcp",),
                          turn_username="u", turn_password="p").configuration().iceServers
    assert [s.urls for s in servers] == ["stun:stun.example.org:3478", "turn:turn.example.org?transport=tcp"]
    assert servers[1].username == "u" and servers[1].credential == "p"
    for bad in (dict(hosts=("eth0",)), dict(hosts=("0.0.0.0",)), dict(udp_ports=(5000, 4000)),
                dict(stun=("stun.example.org",)), dict(turn=("http://x",))):
        with pytest.raises(ValueError):
            IceSettings(**bad)


def test_udp_port_range_binds_host_candidates_inside_it():
    async def gather() -> list[int]:
        settings = IceSettings(hosts=("127.0.0.1",), udp_ports=(47000, 47009))
        undo = settings.install(asyncio.get_running_loop())
        pcs = [RTCPeerConnection(settings.configuration()) for _ in range(3)]
        try:
            for pc in pcs:
                pc.addTransceiver("video")
                await pc.setLocalDescription(await pc.createOffer())
            return [int(line.split()[5]) for pc in pcs for line in pc.localDescription.sdp.splitlines()
                    if line.startswith("a=candidate:")]
        finally:
            for pc in pcs:
                await pc.close()
            undo()

    ports = asyncio.run(gather())
    assert len(ports) == 3 and len(set(ports)) == 3
    assert all(47000 <= port <= 47009 for port in ports)
