"""Where the WebRTC transport puts media in time: incoming audio on the video's timeline (by the
sender's reports, else by arrival), and outgoing audio's timestamps when frames leave late."""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from aiortc.rtp import RtcpSenderInfo, RtcpSrPacket

from transport.sender_clock import REPORT_TRUSTED, SenderClock
from transport.webrtc import AUDIO_RATE, OutputAudioTrack, SendDelay

VIDEO_RATE = 90_000
SSRC = {"audio": 1111, "video": 2222}
# RTP origins of the two tracks (random in real life); the video's wraps past 2^32 a few seconds in.
ORIGIN = {"audio": 123_456, "video": (1 << 32) - 300_000}
RATE = {"audio": AUDIO_RATE, "video": VIDEO_RATE}
# One-way delay from capture to our receive call: the video's encoder and decoder make it the slower.
DELAY = {"audio": 0.020, "video": 0.050}
WALL = 3_900_000_000.0  # the sender's NTP clock at capture time 0, seconds
NOW = 1000.0  # our monotonic clock at capture time 0, seconds


class FakeReceiver:
    """What SenderClock reads of aiortc's RTCRtpReceiver."""

    def __init__(self, kind: str) -> None:
        setattr(self, "_RTCRtpReceiver__timestamp_mapper", SimpleNamespace(_origin=ORIGIN[kind]))
        setattr(self, "_RTCRtpReceiver__remote_streams", {SSRC[kind]: None})
        self.handled = 0

    async def _handle_rtcp_packet(self, packet) -> None:
        self.handled += 1


def frame(kind: str, capture: float) -> SimpleNamespace:
    """A decoded frame captured at ``capture`` s: its pts counts from the track's first timestamp."""
    return SimpleNamespace(pts=round(capture * RATE[kind]), time_base=Fraction(1, RATE[kind]))


def report(kind: str, capture: float, wall_error: float = 0.0) -> RtcpSrPacket:
    rtp = (ORIGIN[kind] + round(capture * RATE[kind])) % (1 << 32)
    ntp = round((WALL + capture + wall_error) * (1 << 32))
    info = RtcpSenderInfo(ntp_timestamp=ntp, rtp_timestamp=rtp, packet_count=1, octet_count=1)
    return RtcpSrPacket(ssrc=SSRC[kind], sender_info=info)


def arrive(clock: SenderClock, kind: str, capture: float, jitter: float = 0.0) -> float:
    arrived = NOW + capture + DELAY[kind] + jitter
    return (clock.video_ts if kind == "video" else clock.audio_ts)(frame(kind, capture), arrived)


@pytest.fixture
def peer():
    clock = SenderClock()
    receivers = {kind: FakeReceiver(kind) for kind in ("audio", "video")}
    for kind, receiver in receivers.items():
        clock.watch(receiver, kind)
    return clock, receivers


def test_audio_goes_by_arrival_until_both_tracks_are_reported(peer):
    clock, receivers = peer
    assert arrive(clock, "audio", 0.0) is None, "before any picture: no timeline to put it on"
    for k in range(25):  # a second of pictures, some late
        assert arrive(clock, "video", k / 25, jitter=0.03 * (k % 3 == 1)) == pytest.approx(k / 25, abs=1e-9)
    # By arrival: the audio's fastest lined up with the video's fastest, so 30 ms early (the video's slower path).
    assert arrive(clock, "audio", 0.5) == pytest.approx(0.5 - 0.030, abs=1e-6)
    asyncio.run(receivers["audio"]._handle_rtcp_packet(report("audio", 0.4)))
    assert arrive(clock, "audio", 0.52) == pytest.approx(0.52 - 0.030, abs=1e-6), "one track's report is not enough"
    assert receivers["audio"].handled == 1, "aiortc's own handler still runs"
    assert clock.by_report == 0 and clock.by_arrival == 2


def test_reports_put_audio_where_it_was_captured(peer):
    clock, receivers = peer
    empty = report("video", 0.0)  # what aiortc reports before it has sent a packet: zeros
    empty.sender_info.ntp_timestamp = empty.sender_info.rtp_timestamp = 0
    asyncio.run(receivers["video"]._handle_rtcp_packet(empty))
    for kind in ("audio", "video"):
        asyncio.run(receivers[kind]._handle_rtcp_packet(report(kind, 0.2)))
    for k in range(200):  # 8 s: the video's RTP time wraps past 2^32 on the way
        capture = k / 25
        assert arrive(clock, "video", capture, jitter=0.02 * (k % 4 == 0)) == pytest.approx(capture, abs=1e-9)
        assert arrive(clock, "audio", capture, jitter=0.01 * (k % 5 == 0)) == pytest.approx(capture, abs=1e-6)
    assert clock.by_report == 200
    arrive(clock, "video", 7.96)
    # aiortc reports when it sent a packet: one after a slow (keyframe) encode maps the video 40 ms late.
    asyncio.run(receivers["video"]._handle_rtcp_packet(report("video", 7.9, wall_error=0.04)))
    assert arrive(clock, "audio", 7.96) == pytest.approx(7.96, abs=1e-6), "the earliest mapping is kept"
    clock.codec_delay = 0.0065
    assert arrive(clock, "audio", 8.0) == pytest.approx(8.0 - 0.0065, abs=1e-6), "the codec's look-ahead comes off"


def test_a_report_far_from_the_arrivals_is_not_believed(peer):
    clock, receivers = peer
    asyncio.run(receivers["video"]._handle_rtcp_packet(report("video", 0.2)))
    asyncio.run(receivers["audio"]._handle_rtcp_packet(report("audio", 0.2, wall_error=2 * REPORT_TRUSTED)))
    for k in range(10):
        arrive(clock, "video", k / 25)
    assert arrive(clock, "audio", 0.3) == pytest.approx(0.3 - 0.030, abs=1e-6)
    assert clock.by_arrival == 1 and clock.by_report == 0


def test_another_streams_report_is_ignored(peer):
    clock, receivers = peer
    for kind in ("audio", "video"):
        asyncio.run(receivers[kind]._handle_rtcp_packet(report(kind, 0.2)))
    stray = report("audio", 0.2, wall_error=0.1)
    stray.ssrc = 9999  # e.g. a retransmission stream's
    asyncio.run(receivers["audio"]._handle_rtcp_packet(stray))
    for k in range(10):
        arrive(clock, "video", k / 25)
    assert arrive(clock, "audio", 0.3) == pytest.approx(0.3, abs=1e-6)


def _sent_audio(frames_at: list[float]) -> list[int]:
    """The pts of each 20 ms packet the output audio track makes of frames that left at ``frames_at``."""
    fps = 25
    output = SimpleNamespace(origin=time.monotonic() - 100.0, start=lambda: None,
                             video=SimpleNamespace(send_delay=SendDelay()))
    track = OutputAudioTrack(output)
    rng = np.random.default_rng(0)
    for at in frames_at:
        track.offer(at, rng.uniform(-0.5, 0.5, (2, AUDIO_RATE // fps)).astype(np.float32))

    async def packets() -> list[int]:
        return [(await track.recv()).pts for _ in range(2 * len(frames_at))]
    return asyncio.run(packets())


def test_one_late_frame_leaves_the_audio_on_its_time():
    frames_at = [k / 25 for k in range(12)]
    frames_at[4] += 0.025  # late alone: the next is on time again
    pts = _sent_audio(frames_at)
    assert np.all(np.diff(pts) == AUDIO_RATE // 50), "no gap: the audio was not moved after the frame"


def test_a_slip_moves_the_audio_with_the_frames():
    slip = 0.060  # the session's clock re-anchored: every frame from the 5th leaves 60 ms later
    frames_at = [k / 25 + (slip if k >= 4 else 0.0) for k in range(12)]
    pts = np.array(_sent_audio(frames_at))
    gaps = np.diff(pts) - AUDIO_RATE // 50
    assert np.count_nonzero(gaps) == 1 and gaps.sum() == round(slip * AUDIO_RATE)
    # It follows within a few frames (the median of the last five), and then stays with them.
    assert pts[-1] == round((11 / 25 + slip) * AUDIO_RATE) + AUDIO_RATE // 50
