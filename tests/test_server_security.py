"""The server against hostile input from outside, over real HTTP on loopback: media that is not what it
claims (an FFmpeg concat script as an "mp4"), requests without the token or from another Host or Origin,
the bodies and options that used to end in a 500, and slow or numerous connections."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import aiohttp
import av
import pytest

from media_helpers import ServerThread
from stream.session_options import OptionError, SessionOptions
from transport.access import exposure_warning
from transport.media_probe import input_options

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SDP = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"  # passes the shape check, nothing more


@pytest.fixture(scope="module")
def server(media):
    with ServerThread(max_sessions=2, avatar=str(media / "portrait.png")) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(media):
    with ServerThread(max_sessions=2, avatar=str(media / "portrait.png"), token=TOKEN,
                      allowed_hosts=("lipstream.example",)) as running:
        yield running


def raw_request(server: ServerThread, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, dict]:
    """One HTTP/1.1 request over a plain socket: the Host and Origin headers exactly as given."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=30) as connection:
        connection.sendall("\r\n".join(lines).encode() + body)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, content = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(content) if content.startswith(b"{") else {}


# -- 1. media that names other media ------------------------------------------------------------


@pytest.fixture
def secret_beside_uploads(media, tmp_path):
    """A picture where an FFmpeg concat script in the upload's temporary folder could name it: a
    relative path of portable characters (what concat's safe mode lets through)."""
    secret = tmp_path / "secret.png"
    shutil.copy(media / "portrait.png", secret)
    relative = os.path.relpath(secret, tempfile.gettempdir())
    assert not any(part.startswith(".") for part in Path(relative).parts), relative
    return relative


@pytest.mark.parametrize("name, content_type", [("a.mp4", "video/mp4"), ("a.webm", "video/webm"),
                                                ("a.mov", "video/quicktime")])
def test_a_concat_script_uploaded_as_a_clip_reads_no_local_file(server, secret_beside_uploads, name, content_type):
    script = f"ffconcat version 1.0\nfile '{secret_beside_uploads}'\n".encode()
    status, body = server.post_file("/avatar", name, script, content_type)
    assert status == 400, body  # before: 200, and the session showed the named file
    assert "not a readable clip" in body["error"]


def test_a_named_input_file_opens_only_streaming_containers(media, tmp_path):
    """``rtmp --in FILE``: the same script as a file input is refused by FFmpeg's own whitelist."""
    shutil.copy(media / "portrait.png", tmp_path / "secret.png")
    script = tmp_path / "input.mp4"
    script.write_text("ffconcat version 1.0\nfile 'secret.png'\n")
    with pytest.raises(av.error.FFmpegError):
        av.open(str(script), options=input_options(str(script)))
    clip = str(media / "speaker_wide.mp4")
    with av.open(clip, options=input_options(clip)) as container:
        assert container.streams.video
    assert input_options("https://example.com/live.m3u8")["protocol_whitelist"] == "http,https,tcp,tls,crypto"


# -- 5. token, Host, Origin, Content-Type --------------------------------------------------------


def test_the_token_is_needed_on_every_api_route_but_not_for_the_page(guarded):
    host = {"Host": f"127.0.0.1:{guarded.settings.port}"}
    for path in ("/sessions", "/avatars", "/ice", "/metrics", "/sessions/x"):
        assert raw_request(guarded, "GET", path, host)[0] == 401, path
        assert raw_request(guarded, "GET", path, {**host, "Authorization": "Bearer wrong"})[0] == 401, path
    status, body = raw_request(guarded, "POST", "/offer", {**host, "Content-Type": "application/json"},
                               json.dumps({"sdp": SDP, "type": "offer"}).encode())
    assert status == 401 and "token" in body["error"]
    assert raw_request(guarded, "GET", "/", host)[0] == 200
    status, listing = raw_request(guarded, "GET", "/sessions", {**host, **BEARER})
    assert status == 200 and listing["sessions"] == {}
    assert raw_request(guarded, "GET", "/ice", {**host, **BEARER})[0] == 200


def test_the_websocket_takes_the_token_in_its_url_and_sessions_show_only_with_it(guarded):
    async def run():
        async with aiohttp.ClientSession() as http:
            async with http.post(guarded.url + "/sessions", json={"session": "p1"}, headers=BEARER) as reply:
                assert reply.status == 200, await reply.text()
            try:
                async with http.get(guarded.url + "/sessions/p1") as reply:
                    anonymous = reply.status
                async with http.get(guarded.url + "/sessions", headers=BEARER) as reply:
                    listed = await reply.json()
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(guarded.url + "/sessions/p1/audio")
                socket_ = await http.ws_connect(guarded.url + f"/sessions/p1/audio?token={TOKEN}")
                await socket_.send_str(json.dumps({"cmd": "interrupt"}))
                event = json.loads((await socket_.receive(timeout=10)).data)
                await socket_.close()
            finally:
                async with http.delete(guarded.url + "/sessions/p1", headers=BEARER) as reply:
                    assert reply.status == 200
        return anonymous, listed, refused.value.status, event

    anonymous, listed, refused, event = asyncio.run(run())
    assert anonymous == 401 and refused == 401
    assert listed["sessions"]["p1"]["kind"] == "program"
    assert event["event"] == "interrupted"


def test_other_hosts_and_origins_are_refused(guarded, server):
    port = guarded.settings.port
    # DNS rebinding: the attacker's name, resolved to 127.0.0.1. The token does not help it either.
    for target in (guarded, server):
        rebound = {"Host": f"attacker.example:{target.settings.port}", **BEARER}
        status, body = raw_request(target, "GET", "/ice", rebound)
        assert status == 403 and "host" in body["error"]
    assert raw_request(guarded, "GET", "/avatars", {"Host": "lipstream.example", **BEARER})[0] == 200
    assert raw_request(guarded, "GET", "/avatars", {"Host": f"[::1]:{port}", **BEARER})[0] == 200
    # Another site's page posting cross-site, with or without a body the server would take.
    for origin in ("http://attacker.example", "null", f"http://127.0.0.1:{port + 1}"):
        status, body = raw_request(server, "POST", "/offer", {
            "Host": f"127.0.0.1:{server.settings.port}", "Origin": origin, "Content-Type": "application/json"},
            json.dumps({"sdp": SDP, "type": "offer"}).encode())
        assert status == 403 and "not accepted" in body["error"], origin
    status, _ = raw_request(server, "GET", "/avatars", {"Host": f"127.0.0.1:{server.settings.port}",
                                                        "Origin": f"http://127.0.0.1:{server.settings.port}"})
    assert status == 200  # the page itself
    assert raw_request(guarded, "GET", "/avatars", {"Host": f"127.0.0.1:{port}", "Origin": "https://lipstream.example",
                                                    **BEARER})[0] == 200


def test_json_routes_take_only_json(server):
    host = {"Host": f"127.0.0.1:{server.settings.port}"}
    body = json.dumps({"sdp": SDP, "type": "offer"}).encode()
    for path in ("/offer", "/sessions", "/sessions/x/control"):
        status, reply = raw_request(server, "POST", path, {**host, "Content-Type": "text/plain"}, body)
        assert status == 415 and "application/json" in reply["error"], path
    status, reply = raw_request(server, "POST", "/avatar", {**host, "Content-Type": "application/json"}, b"{}")
    assert status == 415 and "multipart/form-data" in reply["error"]
    assert server.sessions()["active"] == 0


def test_listening_beyond_loopback_without_a_token_warns():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", TOKEN) is None
    assert "without an access token" in exposure_warning("0.0.0.0", None)
    assert "without an access token" in exposure_warning("192.168.1.20", "")


# -- 7. what used to end in a 500, and options without a range -----------------------------------


def test_what_used_to_fail_with_500_gets_400_with_the_reason(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/offer", "/sessions"):
        status, body = server.post_json(path, deep)
        assert status == 400 and "nested too deeply" in body["error"], path
    assert server.post_json("/sessions", {"session": "ok1"})[0] == 200
    try:
        status, body = server.post_json("/sessions/ok1/control", b'{"a":' * 50_000 + b"1" + b"}" * 50_000)
        assert status == 400 and "nested" in body["error"]
    finally:
        server.post_json("/sessions/ok1/control", {"cmd": "close"})
    for avatar in ([1], {"id": "x"}, 7):
        status, body = server.post_json("/offer", {"sdp": SDP, "type": "offer", "mode": "avatar", "avatar": avatar})
        assert status == 400 and "unknown avatar" in body["error"], avatar
        status, body = server.post_json("/sessions", {"avatar": avatar})
        assert status == 400 and "unknown avatar" in body["error"], avatar
    status, body = server.post_json("/offer", b'{"sdp": "%s", "type": "offer", "options": {"stride": %s}}'
                                    % (SDP.replace("\r\n", "\\r\\n").encode(), b"9" * 400))
    assert status == 400 and "stride" in body["error"]
    for payload in (b"", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\0\0\0\0\0\x08\x02\0\0\0"):
        status, body = server.post_file("/avatar", "empty.png", payload, "image/png")
        assert status == 400 and "not a readable image" in body["error"], payload
    assert server.sessions()["active"] == 0


@pytest.mark.parametrize("options, field", [
    ({"stride": 0}, "stride"), ({"stride": 17}, "stride"), ({"stride": 10**400}, "stride"), ({"stride": 4.0}, "stride"),
    ({"context_seconds": 0}, "context_seconds"), ({"context_seconds": -1}, "context_seconds"),
    ({"context_seconds": 1e6}, "context_seconds"), ({"context_seconds": math.inf}, "context_seconds"),
    ({"context_seconds": 1e308}, "context_seconds"), ({"context_seconds": math.nan}, "context_seconds"),
    ({"late_after": -0.1}, "late_after"), ({"late_after": math.nan}, "late_after"), ({"late_after": 0}, "late_after"),
    ({"fade_frames": -1}, "fade_frames"), ({"fade_frames": 10**6}, "fade_frames"),
    ({"fade_frames": True}, "fade_frames"),
    ({"buffer_seconds": 0}, "buffer_seconds"), ({"buffer_seconds": math.inf}, "buffer_seconds"),
    ({"vad": 1}, "vad"), ({"vad": "yes"}, "vad"), ({"speed": 2}, "speed"),
])
def test_every_option_has_a_type_and_a_range(options, field):
    with pytest.raises(OptionError) as refused:
        SessionOptions.from_json(options)
    assert field in str(refused.value)
    for not_an_object in ([1], "fast", 3):
        with pytest.raises(OptionError, match="JSON object"):
            SessionOptions.from_json(not_an_object)
    kept = SessionOptions.from_json({"stride": 16, "late_after": None, "fade_frames": 25, "context_seconds": 30,
                                     "buffer_seconds": 600, "vad": False})
    assert kept.stride == 16 and kept.late_after is None and math.isclose(kept.context_seconds, 30.0)


def test_options_are_checked_over_http_with_the_reason(server):
    infinite = b'{"sdp": "%s", "type": "offer", "options": {"context_seconds": Infinity}}'
    status, body = server.post_json("/offer", infinite % SDP.replace("\r\n", "\\r\\n").encode())
    assert status == 400 and "context_seconds" in body["error"]
    status, body = server.post_json("/sessions", {"options": {"late_after": -1}})
    assert status == 400 and "late_after" in body["error"]
    status, body = server.post_json("/sessions", {"options": [1, 2]})
    assert status == 400 and '"options" must be a JSON object' in body["error"]


# -- 8. slow and numerous clients ----------------------------------------------------------------


def test_a_client_that_trickles_its_headers_is_cut_off(media):
    with ServerThread(header_timeout=1.5) as running:
        with socket.create_connection(("127.0.0.1", running.settings.port), timeout=10) as slow:
            opened = time.monotonic()
            slow.sendall(b"GET /avatars HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            closed_after = None
            for i in range(20):  # a header line every 0.5 s, never the blank line that ends them
                try:
                    slow.sendall(f"X-Slow-{i}: {i}\r\n".encode())
                    slow.settimeout(0.5)
                    if slow.recv(1024) == b"":
                        closed_after = time.monotonic() - opened
                        break
                except socket.timeout:
                    continue
                except OSError:
                    closed_after = time.monotonic() - opened
                    break
        assert running.request("/avatars")[0] == 200
    assert closed_after is not None, "still open after 10 s of trickled headers"
    assert 1.2 <= closed_after <= 4.0, closed_after
    print(f"slow headers: closed {closed_after:.2f} s after the connection opened (header timeout 1.5 s)")


def test_connections_past_the_cap_are_refused(media):
    with ServerThread(max_connections=6, header_timeout=30) as running:
        idle = [socket.create_connection(("127.0.0.1", running.settings.port), timeout=10) for _ in range(6)]
        try:
            time.sleep(0.3)  # accepted by the loop
            with socket.create_connection(("127.0.0.1", running.settings.port), timeout=10) as extra:
                reply = extra.recv(4096)
            assert reply.startswith(b"HTTP/1.1 503") and b"too many open connections" in reply
        finally:
            for connection in idle:
                connection.close()
        deadline = time.monotonic() + 5
        while running.request("/avatars")[0] != 200:  # the freed places are taken again
            assert time.monotonic() < deadline, "the server did not take connections again"
            time.sleep(0.1)
