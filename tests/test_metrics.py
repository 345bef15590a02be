"""GET /metrics during a program session fed over its WebSocket, and after it closed; the latency
histogram; the JSON-lines log formatter.

Runs the real tiny model on loopback (tests/media_helpers.ServerThread), its model calls through a
model worker as ``serve --batch 2`` makes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import wave

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from media_helpers import ServerThread
from stream.frames import Trace
from stream.latency import LATENCY_BUCKETS, LatencyLog
from transport.logs import JsonLines

FEED_SECONDS = 2.0
TIMEOUT = 90


@pytest.fixture(scope="module")
def server(media):
    with ServerThread(batch=2, max_sessions=2, avatar=str(media / "portrait.png")) as running:
        yield running


@pytest.fixture(scope="module")
def speech(media) -> bytes:
    with wave.open(str(media / "speech_16k.wav")) as source:
        assert (source.getframerate(), source.getnchannels(), source.getsampwidth()) == (16_000, 1, 2)
        return source.readframes(int(FEED_SECONDS * 16_000))


async def scrape(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url + "/metrics") as reply:
        assert reply.status == 200
        assert reply.content_type == "text/plain"
        return {family.name: family for family in text_string_to_metric_families(await reply.text())}


def samples(families: dict, family: str, suffix: str = "", **labels) -> list:
    """The samples of ``family`` named family + suffix whose labels include ``labels``."""
    return [s for s in families[family].samples
            if s.name == family + suffix and labels.items() <= s.labels.items()]


def value(families: dict, family: str, suffix: str = "", **labels) -> float:
    found = samples(families, family, suffix, **labels)
    assert len(found) == 1, (family, suffix, labels, found)
    return found[0].value


def test_metrics_follow_a_program_session_and_forget_it_when_it_closes(server, speech):
    server.server.metrics.add_gauge("lipstream_mqtt_connected", lambda: 1.0, "The MQTT bridge is connected")
    server.server.metrics.add_gauge("lipstream_broken", lambda: 1 / 0)

    async def scenario() -> tuple[dict, dict, dict, dict]:
        async with aiohttp.ClientSession() as http:
            before = await scrape(http, server.url)
            body = {"session": "m1", "avatar": "default", "audio": {"rate": 16_000, "channels": 1}}
            async with http.post(server.url + "/sessions", json=body) as reply:
                assert reply.status == 200, await reply.text()
            async with http.ws_connect(server.url + "/sessions/m1/audio") as socket:
                chunk = 3200  # 100 ms of s16le at 16 kHz
                for start in range(0, len(speech), chunk):
                    await socket.send_bytes(speech[start : start + chunk])
                    await asyncio.sleep(0.05)
                deadline = time.monotonic() + TIMEOUT
                while True:
                    async with http.get(server.url + "/sessions/m1") as reply:
                        stats = await reply.json()
                    if stats["frames_generated"] > 0 and stats["frames_out"] >= 25:
                        break
                    assert time.monotonic() < deadline, f"no generated frames after {TIMEOUT} s: {stats}"
                    await asyncio.sleep(0.2)
                during = await scrape(http, server.url)
            async with http.delete(server.url + "/sessions/m1") as reply:
                assert reply.status == 200
            after = await scrape(http, server.url)
        return before, stats, during, after

    before, stats, during, after = asyncio.run(scenario())
    m1 = {"session": "m1", "kind": "program"}

    assert value(before, "lipstream_sessions", kind="program") == 0
    assert value(during, "lipstream_sessions", kind="program") == 1
    assert value(during, "lipstream_sessions_max") == 2
    # Read a moment after the stats, so at least as far along.
    frames_out = value(during, "lipstream_frames_out", "_total", **m1)
    assert frames_out >= stats["frames_out"] >= 25
    assert value(during, "lipstream_frames_generated", "_total", **m1) > 0
    for counter in ("late", "dropped", "silent", "interrupted"):
        assert value(during, f"lipstream_frames_{counter}", "_total", **m1) >= 0
    assert value(during, "lipstream_frames_out_all", "_total", kind="program") == frames_out

    buckets = samples(during, "lipstream_latency_seconds", "_bucket", **m1)
    bounds = [float(b.labels["le"]) for b in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf") and len(bounds) == len(LATENCY_BUCKETS) + 1
    counts = [b.value for b in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    count = value(during, "lipstream_latency_seconds", "_count", **m1)
    assert counts[-1] == count == frames_out  # every frame sent is traced, read in the same scrape
    assert 0 < value(during, "lipstream_latency_seconds", "_sum", **m1) < 5 * count

    queues = {s.labels["queue"] for s in samples(during, "lipstream_queue_depth", **m1)}
    assert {"face", "audio", "windows", "model", "paste", "output"} <= queues, queues
    assert all(s.value >= 0 for s in samples(during, "lipstream_queue_depth", **m1))
    assert value(during, "lipstream_program_audio_buffered_seconds", **m1) >= 0
    assert abs(value(during, "lipstream_av_offset_seconds", **m1)) < 0.1
    assert value(during, "lipstream_mqtt_connected") == 1.0
    assert "lipstream_broken" not in during  # a gauge that cannot be read is left out, the rest served
    assert value(during, "process_resident_memory_bytes") > 0
    assert value(during, "lipstream_model_worker_busy_seconds") > 0  # the session's windows ran there
    assert value(during, "lipstream_model_worker_windows_per_call") >= 1
    assert value(during, "lipstream_model_worker_queued") >= 0

    for family in after.values():
        assert not any(s.labels.get("session") == "m1" for s in family.samples), family
    assert value(after, "lipstream_sessions", kind="program") == 0
    assert value(after, "lipstream_sessions_closed", "_total", kind="program") == 1
    # The closed session's final counts stay in the totals over every session.
    assert value(after, "lipstream_frames_out_all", "_total", kind="program") >= frames_out
    assert (value(after, "lipstream_frames_generated_all", "_total", kind="program")
            >= value(during, "lipstream_frames_generated", "_total", **m1))


def test_latency_histogram_counts_every_traced_frame_in_cumulative_buckets():
    log = LatencyLog(limit=2)
    for added in (0.01, 0.05, 0.12, 0.12, 7.0):
        log.record(Trace(captured_at=100.0), 100.0 + added)
    log.record(Trace(), 100.0)  # untraced: counted as a frame, not in the histogram
    buckets, total = log.histogram()
    counts = dict(buckets)
    assert [bound for bound, _ in buckets] == [*LATENCY_BUCKETS, float("inf")]
    assert (counts[0.05], counts[0.1], counts[0.15], counts[5.0], counts[float("inf")]) == (2, 2, 4, 4, 5)
    assert total == pytest.approx(7.30)
    assert log.summary()["frames_traced"] == 5 and log.frames == 6


def test_json_log_lines_carry_level_logger_message_extras_and_the_exception():
    formatter = JsonLines()
    record = logging.LogRecord("transport.server", logging.WARNING, __file__, 1, "session %s: %d viewers",
                               ("m1", 3), None)
    record.session = "m1"
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "transport.server"
    assert entry["message"] == "session m1: 3 viewers" and entry["session"] == "m1"
    assert entry["time"].endswith("+00:00")
    assert "args" not in entry and "exception" not in entry

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    entry = json.loads(formatter.format(failed))
    assert "RuntimeError: boom" in entry["exception"] and entry["message"] == "failed"
