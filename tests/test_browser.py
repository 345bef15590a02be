"""End to end in headless Chromium: the page, the browser's own WebRTC stack, the real tiny model.

Chromium's fake camera plays a .y4m cut from speaker_wide.mp4 and its fake microphone a .wav; the
page connects to a server in this process; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from media_helpers import CAMERA_SIZE, ServerThread, make_camera_files
from transport.files import read_audio

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium package at /usr/bin/chromium (apt-get install chromium), driven by the "
           "playwright pip package from the test extra; never `playwright install`")

FRAMES = 50
TIMEOUT_MS = 75_000
# ../shared/notes/stack.md: what headless Chromium needs for fake devices and loopback-only ICE.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
         "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required"]

INBOUND = """async () => {
  const out = {};
  const pc = window.lipstream.pc;
  if (!pc) return out;
  for (const report of (await pc.getStats()).values()) {
    if (report.type === "inbound-rtp") out[report.kind] = report;
  }
  return out;
}"""


@pytest.fixture(scope="module")
def camera_files(media, tmp_path_factory):
    return make_camera_files(media / "speaker_wide.mp4", tmp_path_factory.mktemp("chromium"))


@pytest.fixture(scope="module")
def server():
    with ServerThread(max_sessions=2) as running:
        yield running


@pytest.fixture(scope="module")
def browser(camera_files):
    from playwright.sync_api import sync_playwright  # CI installs it; a missing one must fail, not skip

    y4m, wav = camera_files
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=FLAGS + [f"--use-file-for-fake-video-capture={y4m}", f"--use-file-for-fake-audio-capture={wav}"])
        yield chromium
        chromium.close()


def _connect_and_count(page, server: ServerThread, size: tuple[int, int]) -> dict:
    """Click Connect, wait for FRAMES decoded frames; returns what the browser and the server saw."""
    page.click("#connect")
    page.wait_for_function("window.lipstream.pc && window.lipstream.pc.connectionState === 'connected'",
                           timeout=TIMEOUT_MS)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while (first := page.evaluate(INBOUND)).get("video", {}).get("framesDecoded", 0) < FRAMES:
        assert time.monotonic() < deadline, f"too few frames decoded: {first.get('video')}"
        page.wait_for_timeout(250)
    started = time.monotonic()
    page.wait_for_timeout(4000)
    inbound = page.evaluate(INBOUND)
    seconds = time.monotonic() - started
    session = page.evaluate("window.lipstream.session")
    observed = {
        "fps": (inbound["video"]["framesDecoded"] - first["video"]["framesDecoded"]) / seconds,
        "size": (inbound["video"]["frameWidth"], inbound["video"]["frameHeight"]),
        "audio_samples": inbound.get("audio", {}).get("totalSamplesReceived", 0),
        "audio_tracks": page.evaluate("document.getElementById('remote').srcObject.getAudioTracks().length"),
        "page_stats": page.evaluate("window.lipstream.stats"),
        "server": server.sessions()["sessions"][session],
        "session": session,
    }
    assert observed["size"] == size
    assert observed["audio_tracks"] == 1 and observed["audio_samples"] > 0
    assert observed["server"]["frames_out"] >= FRAMES
    assert observed["server"]["frames_generated"] > 0, "frames went through the model"
    assert observed["page_stats"]["session"] == session, "the stats channel reached the page"
    return observed


def _close_and_check_release(page, server: ServerThread, observed: dict) -> float:
    page.close()
    released = server.wait_until_idle(timeout=5)
    latency = observed["server"]["latency_ms"]
    print(f"\n{observed['server']['kind']}: browser decoded {observed['fps']:.1f} fps at "
          f"{observed['size'][0]}x{observed['size'][1]}; server fps {observed['server']['fps']}, "
          f"generated {observed['server']['frames_generated']} of {observed['server']['frames_out']} frames, "
          f"added latency p50 {latency['p50']} ms / p95 {latency['p95']} ms; freed {released:.2f} s after close")
    return released


def test_camera_mode_in_chromium(browser, server):
    page = browser.new_page()
    page.goto(server.url)
    observed = _connect_and_count(page, server, CAMERA_SIZE)
    assert observed["server"]["kind"] == "camera"
    _close_and_check_release(page, server, observed)


def test_avatar_mode_in_chromium_with_an_uploaded_portrait(browser, server, media):
    page = browser.new_page()
    page.goto(server.url)
    page.set_input_files("#upload", str(media / "portrait.png"))
    page.wait_for_function("document.getElementById('status').textContent.includes('ready')",
                           timeout=30_000)
    assert page.is_checked("input[value=avatar]")
    observed = _connect_and_count(page, server, (640, 640))
    assert observed["server"]["kind"] == "avatar"
    _close_and_check_release(page, server, observed)


def test_watching_a_program_session_in_chromium(browser, server, media):
    """The page's Watch mode: a receive-only browser viewer of an avatar a program drives."""
    status, avatar = server.post_file("/avatar", "portrait.png", (media / "portrait.png").read_bytes(), "image/png")
    assert status == 200, avatar
    status, created = server.post_json("/sessions", {"session": "watched", "avatar": avatar["avatar"],
                                                     "audio": {"rate": 16000, "channels": 1}})
    assert status == 200, created
    speech = (read_audio(media / "speech_16k.wav")[0][: 16000 * 4] * 32767).astype("<i2").tobytes()
    feeder = threading.Thread(target=asyncio.run, args=(_speak(server.url, "watched", speech),))
    page = browser.new_page()
    try:
        page.goto(server.url)
        page.check("input[value=viewer]")
        page.click("#refresh-sessions")
        page.wait_for_function("document.getElementById('session').value === 'watched'", timeout=10_000)
        page.click("#connect")
        page.wait_for_function("window.lipstream.pc && window.lipstream.pc.connectionState === 'connected'",
                               timeout=TIMEOUT_MS)
        feeder.start()
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while page.evaluate(INBOUND).get("video", {}).get("framesDecoded", 0) < FRAMES:
            assert time.monotonic() < deadline, "too few frames decoded"
            page.wait_for_timeout(250)
        feeder.join(30)
        inbound = page.evaluate(INBOUND)
        watched = server.sessions()["sessions"]["watched"]
        assert watched["viewers"] == 1 and watched["frames_generated"] > 0
        assert (inbound["video"]["frameWidth"], inbound["video"]["frameHeight"]) == (640, 640)
        assert inbound.get("audio", {}).get("totalSamplesReceived", 0) > 0
    finally:
        page.close()
    deadline = time.monotonic() + 5
    while server.sessions()["sessions"]["watched"]["viewers"]:
        assert time.monotonic() < deadline, "the viewer was not let go"
        time.sleep(0.1)
    assert server.post_json("/sessions/watched/control", {"cmd": "close"})[0] == 200


async def _speak(url: str, session: str, pcm: bytes) -> None:
    """A program sending speech over the WebSocket, 40 ms at a time, twice as fast as real time."""
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/sessions/{session}/audio") as socket:
        for start in range(0, len(pcm), 1280):
            await socket.send_bytes(pcm[start : start + 1280])
            await asyncio.sleep(0.02)
        await asyncio.sleep(3)


def test_the_page_asks_once_for_the_token_and_sends_it(browser, media):
    """A server with a token: the page's first calls are refused, it asks once (both refused calls wait
    for the one answer), keeps the token, and a reload asks no more."""
    with ServerThread(token="page-token", avatar=str(media / "portrait.png")) as guarded:
        page = browser.new_page()
        asked = []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept("page-token")))
        try:
            page.goto(guarded.url)
            page.wait_for_function("document.getElementById('avatar').options.length > 0", timeout=10_000)
            assert page.evaluate("localStorage.getItem('lipstream-token')") == "page-token"
            page.reload()
            page.wait_for_function("document.getElementById('avatar').options.length > 0", timeout=10_000)
            refused = guarded.request("/avatars")[0]
        finally:
            page.close()
    assert len(asked) == 1 and "access token" in asked[0]
    assert refused == 401
