"""`run_stream.py rtmp`: live dubbing from a stream (or a file) to an RTMP server (or a file).

The tests that need an RTMP server start Debian's nginx with libnginx-mod-rtmp on 127.0.0.1 in a
temp folder (bench/rtmp.py ``Nginx``) and skip when it is not installed. Media are published by
``python -m bench.rtmp publish`` (the stamped clip with chirp markers, in real time) and read back by
``python -m bench.rtmp read``, in subprocesses; the relay runs in this process, so its events and
counters can be checked directly. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import av
import numpy as np
import pytest

from bench.rtmp import Nginx, Reading, default_clip, free_port, publish, read, read_sent, summarise
from conftest import MEDIA, REPO
from stream.config import load_config
from stream.pipeline import LipSync
from stream.runner import run_async
from stream.session_options import AudioFormat, SessionOptions
from transport.ingest import InputError, check_input
from transport.session_feed import Audio, Picture, SessionFeed, Status
from transport.publish import OutputError, OutputSettings, Publisher, check_output, fit_picture
from transport.rtmp import Relay, RelayFailed, RelaySettings, serve_and_relay

FPS = 25
OUT = OutputSettings(preset="ultrafast", bitrate_kbps=1200)
# The model every 8 frames: the relay shares 2 cores with a publisher and a reader here.
LIGHT = SessionOptions(stride=8)
NGINX_MISSING = Nginx.unavailable()
needs_nginx = pytest.mark.skipif(NGINX_MISSING is not None, reason=f"RTMP tests need nginx: {NGINX_MISSING}")


@pytest.fixture(scope="module")
def lipsync() -> LipSync:
    return LipSync.from_config(load_config("tiny"))


@pytest.fixture(scope="module")
def clip() -> Path:
    """The 360x640 stamped-clip source, made once (it decodes the 1080x1920 original)."""
    return default_clip((360, 640))


@pytest.fixture
def nginx():
    if NGINX_MISSING:
        pytest.skip(NGINX_MISSING)
    server = Nginx().start()
    yield server
    server.close()


def python(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def publisher(url: str, seconds: float, folder: Path, first_index: int = 0) -> subprocess.Popen:
    return python("-m", "bench.rtmp", "publish", url, "--seconds", str(seconds), "--first-index",
                  str(first_index), "--log", str(folder / "sent.log"), log=folder / "publish.log")


def reader(url: str, folder: Path, name: str = "read") -> subprocess.Popen:
    return python("-m", "bench.rtmp", "read", url, "--out", str(folder / name), "--seconds", "120",
                  log=folder / f"{name}.log")


async def interrupt(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        await asyncio.to_thread(process.wait, 15)
    except subprocess.TimeoutExpired:
        process.kill()


async def until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.1)


class Events(list):
    def count(self, name: str) -> int:  # type: ignore[override]
        return sum(1 for event in self if event["event"] == name)


# -- checks on what the user names ------------------------------------------------------------


def test_inputs_and_outputs_are_checked(tmp_path):
    existing = tmp_path / "in.mp4"
    existing.write_bytes(b"")
    for good in ("rtmp://127.0.0.1:1935/live/key", "rtmps://example.com/app/key", "srt://10.0.0.1:9000",
                 "https://example.com/live/index.m3u8", str(existing)):
        assert check_input(good)
    assert check_input(str(existing)) == str(existing.resolve())
    for bad, why in (("ftp://example.com/a", "not allowed"), ("concat:a.mp4|b.mp4", "not a file"),
                     ("file:///etc/passwd", "not allowed"), ("rtmp://", "malformed"),
                     ("rtmp://host:99999/live/k", "port"), ("rtmp://host/live", "stream key"),
                     ("rtmp://ho st/live/k", "malformed"), (str(tmp_path / "missing.mp4"), "no such file"),
                     ("", "empty")):
        with pytest.raises(InputError, match=why):
            check_input(bad)
    with pytest.raises(InputError, match="RTMP publishers only"):
        check_input("srt://127.0.0.1:9000", listen=True)
    assert check_output("rtmp://127.0.0.1/live/out") == "rtmp://127.0.0.1/live/out"
    assert check_output(str(tmp_path / "out.flv")).endswith("out.flv")
    for bad, why in (("http://example.com/x", "push to rtmp"), (str(tmp_path / "out.avi"), "write"),
                     (str(tmp_path / "no" / "out.mp4"), "does not exist"), ("rtmp://h/app", "stream key")):
        with pytest.raises(OutputError, match=why):
            check_output(bad)


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    """Checked before any model loads: bad URLs, --audio api without --serve."""
    import run_stream

    for args, message in ((["--in", "rtmp://", "--out", str(tmp_path / "o.flv")], "malformed URL"),
                          (["--in", "gopher://x/y", "--out", str(tmp_path / "o.flv")], "not allowed"),
                          (["--in", "rtmp://127.0.0.1/live/k", "--out", "udp://1.2.3.4:5"], "push to rtmp"),
                          (["--in", "rtmp://127.0.0.1/live/k", "--out", str(tmp_path / "o.flv"), "--audio", "api"],
                           "--serve")):
        assert run_stream.main(["rtmp", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    done = subprocess.run([sys.executable, "run_stream.py", "rtmp", "--in", "rtmp://", "--out", "o.flv"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: 'rtmp://': a malformed URL"), done.stderr


def test_an_input_or_output_that_never_answers_fails_within_its_timeout(lipsync, tmp_path):
    """A TCP port that accepts and then says nothing: as an input, given up after 1 + 1 retry
    attempts of 1.5 s; as an output, once its handshake has made no progress for 1 s. An input
    without pictures fails at once."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"rtmp://127.0.0.1:{silent.getsockname()[1]}/live/key"
        settings = RelaySettings(url, str(tmp_path / "out.flv"), open_timeout=1.5, read_timeout=1.5, retries=1)
        started = time.monotonic()
        with pytest.raises(RelayFailed, match=r"cannot open rtmp://.*: no answer in time \(2 attempt"):
            run_async(Relay(lipsync, settings).run())
        elapsed = time.monotonic() - started
    assert elapsed < 2 * 1.5 + 0.5 + 2.0, elapsed  # two attempts and one backoff, plus slack for a busy CPU
    with socket.socket() as silent:  # an RTMP server that accepts and never answers the handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        settings = RelaySettings(check_input(str(MEDIA / "speaker_wide.mp4")),
                                 f"rtmp://127.0.0.1:{silent.getsockname()[1]}/live/out",
                                 output=OutputSettings(preset="ultrafast", write_timeout=1.0))
        started = time.monotonic()
        # FFmpeg's own timeout or our watchdog on a handshake that makes no progress: whichever fires first
        with pytest.raises(RelayFailed, match=r"cannot publish to rtmp://.*: (no answer in time|no progress for 1 s)"):
            run_async(Relay(lipsync, settings).run())
        assert time.monotonic() - started < 8.0
    with pytest.raises(RelayFailed, match="speech_16k.wav: it has no video stream"):
        run_async(Relay(lipsync, RelaySettings(check_input(str(MEDIA / "speech_16k.wav")),
                                               str(tmp_path / "out.flv"))).run())


# -- the pieces ---------------------------------------------------------------------------------


def test_the_feed_pushes_silence_while_no_audio_comes():
    """Pictures and audio go in; once audio stops (the input dropped), silence takes its place from
    where the audio ended, so the session's audio stage never waits on it."""
    pushed: list[tuple[str, float]] = []
    session = SimpleNamespace(clock=lambda: 0.0,
                              push_video=lambda image, captured_at: pushed.append(("picture", captured_at)),
                              push_audio=lambda samples, rate, began: pushed.append(("audio", samples.shape[1] / rate)),
                              report=lambda event, **fields: pushed.append((event, 0.0)))

    async def scenario():
        feed = SessionFeed(session, audio_from="in", fps=FPS)
        deliver = feed.deliverer("in", asyncio.get_running_loop())
        deliver(Status("connected", {"video": "h264", "audio": "aac"}))
        for _ in range(5):
            deliver(Picture(np.zeros((4, 4, 3), np.uint8), 0.0, time.monotonic()))
            deliver(Audio(np.zeros((2, 1920), np.float32), 0.0, time.monotonic()))
            await asyncio.sleep(0.04)
        before = len(pushed)
        await asyncio.sleep(1.0)  # the input is gone
        feed.close()
        return feed, pushed[before:]

    feed, later = run_async(scenario())
    kinds = [kind for kind, _ in pushed]
    assert kinds[0] == "input_connected" and kinds.count("picture") == 5  # each held a little, none lost
    assert later and all(kind == "audio" for kind, _ in later)
    assert feed.filled == pytest.approx(sum(seconds for _, seconds in later), abs=1e-3) and 0.7 < feed.filled < 1.05


def test_fit_picture_scales_and_pads_to_the_first_size():
    image = np.full((270, 480, 3), 200, np.uint8)
    fitted = fit_picture(image, 320, 240)
    assert fitted.shape == (240, 320, 3)
    assert fitted[0, 0].sum() == 0 and fitted[120, 160].min() == 200  # letterboxed, content centred
    assert fit_picture(image, 480, 270) is image


def test_published_audio_stays_with_the_video_for_ten_minutes(tmp_path):
    """Timestamps from the media clock, audio sample-continuous (a frame the session dropped is
    silence): after 10 minutes of 25 fps the two streams still end together."""
    out = tmp_path / "long.flv"
    publisher = Publisher(str(out), FPS, OutputSettings(preset="ultrafast", bitrate_kbps=50))
    publisher.start()
    image, audio = np.zeros((32, 32, 3), np.uint8), np.full((2, 48_000 // FPS), 0.1, np.float32)
    frames = 10 * 60 * FPS
    for i in range(frames):
        if i != 100:
            publisher.offer(i / FPS, SimpleNamespace(frame=SimpleNamespace(pts=i / FPS, image=image), audio=audio))
        while publisher.stats()["frames_written"] < i - 8:  # keep the encoder's queue short: no picture dropped
            time.sleep(0.001)
    publisher.end()
    assert publisher.done.wait(30) and publisher.stats()["pictures_dropped"] == 0
    ends = {}
    with av.open(str(out)) as container:
        for packet in container.demux():
            if packet.pts is not None:
                ends[packet.stream.type] = float((packet.pts + packet.duration) * packet.time_base)
    assert ends["video"] == pytest.approx(frames / FPS, abs=0.03)  # + the AAC priming both streams are shifted by
    assert abs(ends["audio"] - ends["video"]) < 1024 / 48_000, ends  # within one AAC frame


# -- files in, files out: variable input ------------------------------------------------------


def write_segment(path: Path, size: tuple[int, int], fps: int, seconds: float, rate: int, layout: str, *,
                  start: float = 0.0, video_from: float = 0.0, fmt: str = "mpegts") -> Path:
    """H.264 + AAC: a flat picture per frame, a 220 Hz tone; video from ``video_from`` s after the audio."""
    out = av.open(str(path), "w", format=fmt)
    video = out.add_stream("libx264", rate=fps)
    video.width, video.height = size
    video.pix_fmt = "yuv420p"
    video.options = {"preset": "ultrafast"}
    audio = out.add_stream("aac", rate=rate, layout=layout)
    channels = len(av.AudioLayout(layout).channels)
    for i in range(round((seconds - video_from) * fps)):
        picture = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), i * 5 % 255, np.uint8), format="rgb24")
        picture.pts, picture.time_base = round((start + video_from) * fps) + i, Fraction(1, fps)
        for packet in video.encode(picture):
            out.mux(packet)
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(round(seconds * rate)) / rate)).astype(np.float32)
    for j in range(0, len(tone), 1024):
        block = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.repeat(tone[None, j : j + 1024], channels, 0)),
                                           format="fltp", layout=layout)
        block.sample_rate, block.pts, block.time_base = rate, round(start * rate) + j, Fraction(1, rate)
        for packet in audio.encode(block):
            out.mux(packet)
    for stream in (video, audio):
        for packet in stream.encode(None):
            out.mux(packet)
    out.close()
    return path


def decoded(path: Path) -> tuple[list[tuple[int, int]], list[float], np.ndarray]:
    """Sizes and timestamps of the pictures, and the audio (mono), of a file."""
    with av.open(str(path)) as container:
        frames = [((f.width, f.height), float(f.pts * f.time_base)) for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio = [f.to_ndarray()[0] for f in container.decode(audio=0)]
    return [s for s, _ in frames], [t for _, t in frames], np.concatenate(audio) if audio else np.zeros(0)


def test_variable_input_50fps_44k_mono_whose_resolution_changes(lipsync, tmp_path):
    """320x240 then 480x272 mid-way (an MPEG-TS whose stream restarts): the output keeps 320x240 at 25 fps."""
    parts = [write_segment(tmp_path / "a.ts", (320, 240), 50, 1.6, 44_100, "mono"),
             write_segment(tmp_path / "b.ts", (480, 272), 50, 1.6, 44_100, "mono", start=1.6)]
    source = tmp_path / "variable.ts"
    source.write_bytes(b"".join(p.read_bytes() for p in parts))
    out = tmp_path / "out.flv"
    summary = run_async(Relay(lipsync, RelaySettings(check_input(str(source)), str(out), output=OUT)).run())
    sizes, pts, audio = decoded(out)
    assert set(sizes) == {(320, 240)}
    # Ticks the session drops when the CPU is short leave gaps in the timestamps, not in the audio.
    assert abs(pts[-1] + 1 / FPS - 3.2) < 0.15 and len(pts) >= 0.85 * 3.2 * FPS, (pts[-1], len(pts))
    assert audio.std() > 0.05 and abs(len(audio) / 48_000 - (pts[-1] + 1 / FPS)) < 0.1
    output = summary["output"]
    assert summary["events"]["input_ended"] == 1 and output["frames_written"] + output["pictures_repeated"] == len(pts)


def test_audio_first_24fps_22k_surround(lipsync, tmp_path):
    """Audio (5.1 at 22.05 kHz) starts a second before the pictures (24 fps): the output starts with
    the first picture, at 25 fps, with no burst of ticks at the start."""
    source = write_segment(tmp_path / "late.mkv", (256, 320), 24, 3.0, 22_050, "5.1", video_from=1.0,
                           fmt="matroska")
    out = tmp_path / "out.mp4"
    summary = run_async(Relay(lipsync, RelaySettings(check_input(str(source)), str(out), output=OUT)).run())
    sizes, pts, audio = decoded(out)
    assert set(sizes) == {(256, 320)}
    assert abs(pts[-1] - pts[0] + 1 / FPS - 2.0) < 0.15, (pts[0], pts[-1])
    assert summary["frames_out"] <= 2.0 * FPS + 1  # no ticks for the second with no picture
    assert audio.std() > 0.05 and abs(len(audio) / 48_000 - (pts[-1] - pts[0] + 1 / FPS)) < 0.1


def test_api_audio_dubs_a_camera_session_and_viewers_can_find_it(lipsync, tmp_path, clip):
    """--audio api with --serve: PCM over the session's WebSocket replaces the input's audio."""
    from transport.server import ServeSettings

    source = tmp_path / "stamped.flv"
    publish(str(source), 4.0, realtime=False)  # its own audio is speech with chirps: not wanted here
    out = tmp_path / "out.flv"
    port = free_port()
    settings = RelaySettings(str(source), str(out), audio="api", api_format=AudioFormat(24_000, 1), output=OUT,
                             name="dub")
    rate = 24_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(3 * rate) / rate) * 32767).astype("<i2")

    async def scenario():
        relay_task = asyncio.ensure_future(serve_and_relay(lipsync, settings, ServeSettings(port=port)))
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    async with http.get(base + "/sessions") as reply:
                        listed = await reply.json()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            async with http.ws_connect(base + "/sessions/dub/audio") as ws:
                await ws.send_bytes(tone.tobytes())
                return listed, await relay_task

    listed, summary = run_async(scenario())
    assert "dub" in listed["sessions"] and listed["sessions"]["dub"]["kind"] == "camera"
    _, pts, audio = decoded(out)
    tone_part = audio[: int(2.5 * 48_000)]
    assert len(pts) >= 0.95 * 4 * FPS and tone_part.std() > 0.2  # the tone, not the source's speech
    spectrum = np.abs(np.fft.rfft(tone_part))
    assert abs(np.argmax(spectrum) * 48_000 / len(tone_part) - 440) < 5


# -- through nginx ------------------------------------------------------------------------


@needs_nginx
def test_live_stream_through_nginx(lipsync, nginx, clip, tmp_path):
    """Publisher -> nginx -> lipstream -> nginx -> reader: size, frames, audio, A/V offset, latency."""
    events = Events()
    settings = RelaySettings(nginx.url("in"), nginx.url("out"), output=OUT, options=LIGHT, open_timeout=20)

    async def scenario():
        relay = Relay(lipsync, settings, on_event=events.append)
        task = asyncio.ensure_future(relay.run())
        watch = reader(nginx.url("out"), tmp_path)
        publishing = publisher(nginx.url("in"), 14.0, tmp_path)
        await asyncio.to_thread(publishing.wait, 40)
        await asyncio.sleep(3.0)
        await interrupt(watch)
        relay.stop()
        return await task

    summary = run_async(scenario())
    result = summarise(Reading.load(tmp_path / "read"), read_sent(tmp_path / "sent.log"))
    print(json.dumps({"rtmp": result, "session_latency_ms": summary["latency_ms"]}))
    assert result["sizes"] == ["360x640"]
    assert abs(result["frame_ratio"] - 1) <= 0.05, result["span"]
    assert result["audio_rms"] > 0.02 and result["disconnects"] == 0
    assert result["markers"] >= 3 and result["av_offset_ms"]["max"] <= 40, result["av_offset_ms"]
    assert result["latency_ms"]["p50"] is not None and result["largest_gap_ms"] <= 200
    assert events.count("input_connected") == 1 and events.count("output_connected") == 1
    assert summary["frames_generated"] > 0


def test_listen_accepts_a_publisher(lipsync, clip, tmp_path):
    """--listen: the publisher connects to lipstream itself, no server in between."""
    url = f"rtmp://127.0.0.1:{free_port()}/live/key"
    out = tmp_path / "out.flv"
    events = Events()
    settings = RelaySettings(check_input(url, listen=True), str(out), listen=True, output=OUT, options=LIGHT)

    async def scenario():
        relay = Relay(lipsync, settings, on_event=events.append)
        task = asyncio.ensure_future(relay.run())
        await asyncio.sleep(0.5)
        publishing = publisher(url, 6.0, tmp_path)
        await asyncio.to_thread(publishing.wait, 30)
        await until(lambda: events.count("input_lost"), 10, "the end of the publisher's stream")
        relay.stop()
        return await task

    summary = run_async(scenario())
    reading = read(str(out), 60, open_timeout=5)
    stamps = [stamp for _, _, stamp, _, _ in reading.frames if stamp >= 0]
    # What came while the stream was probed is dropped, and the picture after it waits for a keyframe (2 s).
    assert events.count("input_connected") == 1 and summary["pictures_in"] > 2.5 * FPS
    assert len(set(stamps)) > 0.8 * (max(stamps) - min(stamps) + 1)


@needs_nginx
def test_the_publisher_drops_for_5_s_and_comes_back(lipsync, nginx, clip, tmp_path):
    """The output runs on (no gap over 1 s, no disconnect); the input reconnects; the model resumes."""
    events = Events()
    settings = RelaySettings(nginx.url("in"), nginx.url("out"), output=OUT, options=LIGHT, open_timeout=20, read_timeout=2)
    generated_at_restore, lost_before_restore = [], []

    async def scenario():
        relay = Relay(lipsync, settings, on_event=events.append)
        task = asyncio.ensure_future(relay.run())
        watch = reader(nginx.url("out"), tmp_path)
        first = publisher(nginx.url("in"), 60.0, tmp_path)
        await until(lambda: relay.feed is not None and relay.feed.pictures > 4 * FPS, 30, "4 s of pictures")
        first.kill()  # gone without a goodbye
        first.wait()
        await until(lambda: events.count("input_lost"), 10, "input_lost")
        await asyncio.sleep(5.0)
        second = publisher(nginx.url("in"), 6.0, tmp_path, first_index=5000)
        await until(lambda: events.count("input_restored"), 20, "input_restored")
        generated_at_restore.append(relay.session.generation.frames_generated)
        lost_before_restore.append(events.count("input_lost"))
        await asyncio.to_thread(second.wait, 30)
        await asyncio.sleep(2.0)
        await interrupt(watch)
        relay.stop()
        return await task

    summary = run_async(scenario())
    reading = Reading.load(tmp_path / "read")
    result = summarise(reading, read_sent(tmp_path / "sent.log"))
    print(json.dumps({"events": summary["events"], "largest_gap_ms": result["largest_gap_ms"],
                      "audio_filled_s": summary["audio_filled_s"]}))
    assert reading.disconnects == 0 and result["largest_gap_ms"] < 1000
    assert lost_before_restore == [1] and events.count("input_restored") == 1
    assert summary["audio_filled_s"] >= 4.0  # the gap was filled with silence
    assert summary["frames_generated"] > generated_at_restore[0]  # the model ran on the new stream
    assert any(stamp >= 5000 for _, _, stamp, _, _ in reading.frames)  # and its pictures came out


@needs_nginx
def test_the_output_server_restarts(lipsync, nginx, clip, tmp_path):
    """The server we push to goes down and comes back: the output reconnects, nothing crashes."""
    events = Events()
    with Nginx() as output_server:
        settings = RelaySettings(nginx.url("in"), output_server.url("out"), output=OUT, options=LIGHT, open_timeout=20)

        async def scenario():
            relay = Relay(lipsync, settings, on_event=events.append)
            task = asyncio.ensure_future(relay.run())
            publishing = publisher(nginx.url("in"), 20.0, tmp_path)
            await until(lambda: events.count("output_connected"), 30, "output_connected")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(output_server.restart)
            await until(lambda: events.count("output_reconnected"), 15, "output_reconnected")
            watch = reader(output_server.url("out"), tmp_path)
            await asyncio.sleep(7.0)
            await interrupt(watch)
            publishing.kill()
            relay.stop()
            return await task

        summary = run_async(scenario())
    reading = Reading.load(tmp_path / "read")
    print(json.dumps({"events": summary["events"], "output": summary["output"], "frames_read": len(reading.frames)}))
    assert events.count("output_lost") == 1 and summary["output"]["reconnects"] == 1
    assert len(reading.frames) > 2 * FPS and {(w, h) for *_, w, h in reading.frames} == {(360, 640)}
