"""The soak (bench/soak.py) for two and a half minutes after a warm-up, and its trend verdict on
series made to leak.

The short run is the real thing: ``run_stream.py serve --config tiny`` with the MQTT bridge in a
subprocess, mosquitto started here, the glass-to-glass probe as a WebRTC camera peer (one session
after another, CYCLE seconds each) and an avatar session fed speech over MQTT, all on loopback. It
fails on a growing RSS or A/V offset trend over the span after WARMUP (the limits are
bench/soak.py's, with their reasons); the verdict itself is shown to fail on a leak and a drift made
up here, and to let through the noise and the steps a busy machine makes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import soak

MINUTES = 4.0
WARMUP = 90.0  # s: the first sessions' arenas and the offset settle (bench/soak.py's limits)
CYCLE = 40.0  # s per WebRTC session: six start and five end in the run, four of them in the judged span


def samples(rss_mb: np.ndarray, offset_ms: np.ndarray) -> dict:
    times = soak.SAMPLE_SECONDS * np.arange(1, len(rss_mb) + 1)
    return {"samples": [{"t_s": float(t), "rss_mb": float(r), "av_offset_ms": float(o)}
                        for t, r, o in zip(times, rss_mb, offset_ms)]}


def test_the_verdict_fails_a_leak_or_a_drift_and_passes_noise():
    rng = np.random.default_rng(7)
    n = 12  # a 2-minute run's samples
    t = soak.SAMPLE_SECONDS * np.arange(1, n + 1)
    quiet_rss = 1000 + rng.normal(0, 15, n)
    quiet_offset = 20 + rng.normal(0, 30, n)
    # A busy machine: a stall queues frames (+120 MB for one sample), an allocator arena grows once
    # (+20 MB from then on), one window's offset rests on a single bad marker, the last three sit
    # 250 ms later.
    busy_rss = quiet_rss + 120 * (t == 70) + 20 * (t >= 90)
    busy_offset = quiet_offset + 400 * (t == 80) + 250 * (t >= 100)
    assert soak.verdict(samples(quiet_rss, quiet_offset)) == []
    assert soak.verdict(samples(busy_rss, busy_offset)) == []

    leak = quiet_rss + 1.5 * t  # 1.5 MB/s: three 374x398 RGB pictures a second
    problems = soak.verdict(samples(leak, quiet_offset))
    assert len(problems) == 1 and problems[0].startswith("RSS grows"), problems
    drift = quiet_offset - 10.0 * t  # audio 10 ms/s earlier: a 1 % clock error
    problems = soak.verdict(samples(quiet_rss, drift))
    assert len(problems) == 1 and problems[0].startswith("A/V offset drifts"), problems

    trend = soak.fit_trend(list(t), list(leak))
    assert trend.slope_per_hour == pytest.approx(5400, rel=0.15) and trend.points == n - 2  # after 30 s
    assert soak.fit_trend([10.0, 20.0], [1.0, 2.0]) is None, "too few points for a trend"


def test_webrtc_and_mqtt_sessions_show_no_growing_rss_or_offset_over_minutes(tmp_path):
    if not soak.MOSQUITTO.exists():
        pytest.skip(f"needs mosquitto at {soak.MOSQUITTO} (apt-get install mosquitto)")
    settings = soak.SoakSettings(minutes=MINUTES, cycle=CYCLE, json_path=str(tmp_path / "soak.json"),
                                 png_path=str(tmp_path / "soak.png"), warmup=WARMUP)
    result = soak.run(settings)
    summary = result["summary"]
    print(f"\nsoak {MINUTES:g} min: " + json.dumps({k: summary[k] for k in (
        "rss_mb_per_hour", "av_offset_ms_per_hour", "rss_mb_first_minute", "rss_mb_last_minute",
        "av_offset_ms_first_minute", "av_offset_ms_last_minute", "latency_p50_ms_first_minute",
        "latency_p50_ms_last_minute", "errors", "windows_without_frames")}))
    assert json.loads((tmp_path / "soak.json").read_text())["summary"] == summary
    assert (tmp_path / "soak.png").read_bytes().startswith(b"\x89PNG")

    measured = [s for s in result["samples"] if s["t_s"] >= WARMUP]
    assert len(result["samples"]) >= 23 and summary["rss_mb_per_hour"]["points"] >= 14
    assert summary["av_offset_ms_per_hour"] is not None and summary["av_offset_ms_per_hour"]["points"] >= 5, \
        "too few windows with a marker matched to judge the offset"
    assert sum(s["frames"] > 0 for s in measured) >= 0.8 * len(measured), "the WebRTC session stalled"
    assert sum((s["avatar_frames"] or 0) > 0 for s in measured) >= 0.8 * len(measured), "the avatar stalled"
    assert result["webrtc_runs"], "no WebRTC session ran to its end"
    assert summary["errors"]["probe"] == 0 and summary["errors"]["mqtt"] == 0, result["errors"]
    assert summary["verdict"] == [], summary["verdict"]
