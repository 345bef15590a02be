"""Memory a server keeps after its sessions: short WebRTC avatar sessions one after another (a real
aiortc peer, the real tiny model), the resident set of the server's own process (`run_stream.py
serve`, started here), measured after each once the session is freed. In its own process because
that is what a user runs, and because glibc's arena limit (transport/process_memory.py) only holds
when it is set before the process has made its threads: this test process has made many by now.

``LIPSTREAM_TEST_SESSIONS`` sets how many (default 20, about a minute on 2 cores; the README's figure
is for 50)."""

from __future__ import annotations

import asyncio
import os
import time
import weakref

import aiohttp
import pytest

from media_helpers import LOOPBACK_ICE, ServerProcess, ServerThread, make_camera_files
from test_webrtc_server import Client

SESSIONS = int(os.environ.get("LIPSTREAM_TEST_SESSIONS", 20))
FRAMES = 25  # a second of output each
GROWTH = 0.15


@pytest.fixture(scope="module")
def camera_files(media, tmp_path_factory):
    return make_camera_files(media / "speaker_wide.mp4", tmp_path_factory.mktemp("camera"), seconds=3)


def test_resident_memory_stays_put_across_sequential_sessions(media, camera_files):
    with ServerProcess("--max-sessions", "1", "--avatar", str(media / "portrait.png")) as server:
        async def sessions() -> list[float]:
            LOOPBACK_ICE.install(asyncio.get_running_loop())
            after = []
            async with aiohttp.ClientSession() as http:
                for _ in range(SESSIONS):
                    client = Client(server.url, "avatar", camera_files)
                    try:
                        await client.connect(http)
                        await client.wait_for_frames(FRAMES, 60)
                    finally:
                        await client.close()
                    await asyncio.to_thread(server.wait_until_idle, 10)
                    after.append(server.resident_mb())
            return after

        started = time.monotonic()
        after = asyncio.run(sessions())
    first, last = after[0], after[-1]
    print(f"resident MB after each of {SESSIONS} sessions ({time.monotonic() - started:.0f} s): "
          + " ".join(f"{mb:.0f}" for mb in after) + f"; last/first {last / first:.3f}")
    assert last <= first * (1 + GROWTH), f"{first:.0f} MB after the first session, {last:.0f} MB after {SESSIONS}"


def test_a_closed_webrtc_session_is_freed_when_it_closes(camera_files):
    """Not whenever Python's collector next makes a full pass: aiortc's peer connection is full of
    reference cycles, and with it the session, its tracks and decoders would stay (every few dozen
    sessions in a server of this many objects). The server collects them after each close
    (transport/process_memory.py); nothing here calls the collector."""
    with ServerThread(max_sessions=1) as running:
        sessions, peers = [], []
        running.call(lambda: running.server.manager.on_created(lambda s: sessions.append(weakref.ref(s))))

        async def three_sessions() -> None:
            LOOPBACK_ICE.install(asyncio.get_running_loop())
            async with aiohttp.ClientSession() as http:
                for _ in range(3):
                    client = Client(running.url, "camera", camera_files)
                    try:
                        await client.connect(http)
                        await client.wait_for_frames(10, 60)
                        peers.extend(running.call(lambda: [weakref.ref(p) for p in running.server.peers]))
                    finally:
                        await client.close()
                    await asyncio.to_thread(running.wait_until_idle, 10)

        asyncio.run(three_sessions())
        assert len(sessions) == 3 and len(peers) == 3
        deadline = time.monotonic() + 10
        while any(ref() is not None for ref in sessions + peers) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [type(ref()).__name__ for ref in sessions + peers if ref() is not None]
        assert not alive, f"still alive 10 s after their sessions closed: {alive}"
