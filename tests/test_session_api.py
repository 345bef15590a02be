"""The session API over HTTP: a program drives an avatar through the WebSocket while a WebRTC
viewer watches; interrupt, bad input and closing, measured on the frames the viewer receives."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np
import pytest

from media_helpers import ServerThread, Viewer

RATE = 24_000
TIMEOUT = 60


@pytest.fixture(scope="module")
def server(media):
    with ServerThread(max_sessions=3, avatar=str(media / "portrait.png")) as running:
        yield running


def mouth(image: np.ndarray) -> np.ndarray:
    """The lower middle of the 640 px portrait, where its mouth is."""
    return image[300:520, 200:440].astype(np.int16)


class Program:
    """A program on the WebSocket: sends PCM and commands, keeps the events with their arrival times."""

    def __init__(self, socket):
        self.socket = socket
        self.events: list[tuple[float, dict]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.events.append((time.monotonic(), json.loads(message.data)))

    async def speak(self, pcm: bytes, speed: float = 2.0) -> float:
        """``pcm`` in 20-100 ms chunks at ``speed`` times real time; returns its duration."""
        rng = np.random.default_rng(11)
        sent, started = 0, time.monotonic()
        while sent < len(pcm):
            size = int(rng.integers(20, 100) * RATE / 1000) * 2
            await self.socket.send_bytes(pcm[sent : sent + size])
            sent += size
            await asyncio.sleep(max(0.0, started + sent / 2 / RATE / speed - time.monotonic()))
        return len(pcm) / 2 / RATE

    async def wait_for(self, name: str, after: int = 0, timeout: float = TIMEOUT) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        while True:
            for at, event in self.events[after:]:
                if event["event"] == name:
                    return at, event
            assert time.monotonic() < deadline, f"no {name} event in {timeout} s: {self.events}"
            await asyncio.sleep(0.02)


def test_a_program_drives_an_avatar_over_the_websocket_and_a_viewer_watches(server, speech_24k):
    async def run():
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/sessions", json={
                    "session": "tts", "avatar": "default", "audio": {"rate": RATE, "channels": 1}}) as reply:
                assert reply.status == 200, await reply.text()
                created = await reply.json()
            viewer = Viewer(server.url, "tts")
            status, answer = await viewer.connect(http)
            assert status == 200 and answer["session"] == "tts", answer
            socket = await http.ws_connect(server.url + "/sessions/tts/audio")
            program = Program(socket)
            try:
                await viewer.wait_for_frames(25, TIMEOUT)  # idle first
                duration = await program.speak(speech_24k[: 2 * RATE * 3])
                started_at, started = await program.wait_for("speech_started")
                ended_at, ended = await program.wait_for("speech_ended")
                await asyncio.sleep(0.8)

                # Bad input on the socket: an error event each, and the stream goes on.
                seen = len(program.events)
                await socket.send_bytes(b"\x01\x02\x03")
                await socket.send_str("{not json")
                await socket.send_str(json.dumps({"cmd": "dance"}))
                await socket.send_str(json.dumps({"cmd": "options", "options": {"stride": 99}}))
                await asyncio.sleep(0.5)
                errors = [e["message"] for _, e in program.events[seen:] if e["event"] == "error"]
                frames_before = len(viewer.frames)
                await asyncio.sleep(0.5)
                assert len(viewer.frames) > frames_before + 5, "the stream stopped after bad input"

                # Barge-in: a long utterance, interrupted a second into it.
                seen = len(program.events)
                await socket.send_bytes(speech_24k[: 2 * RATE * 6])
                await program.wait_for("speech_started", after=seen)
                await asyncio.sleep(1.0)
                commanded = time.monotonic()
                await socket.send_str(json.dumps({"cmd": "interrupt"}))
                _, interrupted = await program.wait_for("interrupted", after=seen)
                await asyncio.sleep(1.0)

                async with http.get(server.url + "/sessions/tts") as reply:
                    described = await reply.json()
                async with http.delete(server.url + "/sessions/tts") as reply:
                    assert reply.status == 200
                await program.wait_for("closed")
                async with http.get(server.url + "/sessions/tts") as reply:
                    gone = reply.status
            finally:
                await socket.close()
                await viewer.close()
        return (created, duration, started_at, started, ended_at, ended, errors, commanded, interrupted,
                described, gone, viewer.frames)

    (created, duration, started_at, started, ended_at, ended, errors, commanded, interrupted, described,
     gone, frames) = asyncio.run(run())
    assert created["session"] == "tts" and created["kind"] == "program"
    assert abs(ended["position"] - duration) <= 0.04, (ended, duration)
    assert len(errors) == 4, errors
    assert any("whole number" in e for e in errors) and any("not JSON" in e for e in errors)
    assert any("unknown command 'dance'" in e for e in errors) and any("stride" in e for e in errors)

    idle_reference = np.median([mouth(image) for at, image in frames[5:20]], axis=0)

    def change(image):
        return float(np.abs(mouth(image) - idle_reference).mean())

    idle = [change(image) for at, image in frames[20:] if at < started_at - 0.1]
    speaking = [change(image) for at, image in frames if started_at + 0.3 <= at <= ended_at - 0.3]
    assert idle and speaking
    assert np.median(speaking) > 4 * max(np.median(idle), 1.0), (np.median(speaking), np.median(idle))

    assert interrupted["position"] > 0.5, interrupted
    before = [change(image) for at, image in frames if commanded - 0.6 <= at < commanded]
    after = [(at - commanded, change(image)) for at, image in frames if at >= commanded]
    # Idle: far nearer the avatar's own mouth than a speaking one (VP8 takes a few frames to settle
    # after the mouth stops, so "exactly the idle noise level" is too strict a test).
    threshold = max(2 * np.median(idle), 0.2 * np.median(speaking), 1.0)
    assert np.median(before) > 2 * threshold, "it was speaking when interrupted"
    first_idle = next(t for t, c in after if c < threshold)
    assert first_idle <= 0.2, f"idle {1000 * first_idle:.0f} ms after the interrupt"
    assert all(c < threshold for t, c in after if 0.2 <= t <= 0.9), after
    assert described["viewers"] == 1 and described["frames_generated"] > 0
    assert gone == 404


def test_session_api_refuses_what_it_cannot_do(server):
    status, body = server.post_json("/sessions", {"audio": {"rate": 4000}})
    assert status == 400 and "rate 4000" in body["error"]
    status, body = server.post_json("/sessions", {"avatar": "nope"})
    assert status == 400 and "unknown avatar" in body["error"]
    status, body = server.post_json("/sessions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]
    status, body = server.post_json("/sessions", {"session": "bad/name"})
    assert status == 400 and "letters" in body["error"]
    status, body = server.post_json("/sessions/none/control", {"cmd": "interrupt"})
    assert status == 404 and "no session" in body["error"]

    async def viewer_of_nothing():
        async with aiohttp.ClientSession() as http:
            viewer = Viewer(server.url, "missing")
            try:
                return await viewer.connect(http)
            finally:
                await viewer.close()

    status, body = asyncio.run(viewer_of_nothing())
    assert status == 400 and "no session 'missing'" in body["error"]
    status, body = server.post_json("/sessions", {"session": "a1"})
    assert status == 200
    try:
        status, body = server.post_json("/sessions/a1/control", {"cmd": "options", "options": {"stride": 8}})
        assert status == 200 and body["options"]["stride"] == 8
        status, body = server.post_json("/sessions/a1/control", {"cmd": "options", "options": {"vad": False}})
        assert status == 400 and "fixed" in body["error"]
        status, body = server.post_json("/sessions/a1/control", {"cmd": "avatar", "avatar": "default"})
        assert status == 200 and body["event"] == "avatar_switched"
    finally:
        assert server.post_json("/sessions/a1/control", {"cmd": "close"})[0] == 200
    assert "a1" not in server.sessions()["sessions"]


def test_concurrent_offers_get_every_place(server, speech_24k):
    """Four creations at once with three places: three succeed, one is refused (no double counting)."""
    async def run():
        async with aiohttp.ClientSession() as http:
            async def create(i):
                async with http.post(server.url + "/sessions", json={"session": f"c{i}"}) as reply:
                    return reply.status
            statuses = await asyncio.gather(*(create(i) for i in range(4)))
            for i in range(4):
                async with http.delete(server.url + f"/sessions/c{i}"):
                    pass
            return sorted(statuses)

    assert asyncio.run(run()) == [200, 200, 200, 503]
