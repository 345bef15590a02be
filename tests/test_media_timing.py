"""Where the WebRTC transport puts media in time: incoming audio on the video's timeline (by the
sender's reports, else by arrival), and outgoing audio's timestamps against its pictures'."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import pytest
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtcpSenderInfo, RtcpSrPacket

from transport.sender_clock import REPORT_TRUSTED, SenderClock
from transport.webrtc import AUDIO_CHUNK, AUDIO_RATE, OutputAudioTrack, OutputVideoTrack, SendDelay

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


def _sent(frames_at: list[float], fps: int) -> tuple[list[int], list[av.AudioFrame]]:
    """What the two outgoing tracks make of frames due at ``frames_at`` (s on the session's output
    clock): each picture's pts, and the 20 ms audio packets. Frame k's sound is the level LEVEL(k)."""
    output = SimpleNamespace(origin=time.monotonic() - 100.0, start=lambda: None)
    video, audio = OutputVideoTrack(output), OutputAudioTrack(output)
    output.video = video
    image = np.full((16, 16, 3), 128, np.uint8)
    for k, at in enumerate(frames_at):
        audio.offer(at, np.full((2, AUDIO_RATE // fps), LEVEL(k), np.float32))

    async def tracks() -> tuple[list[int], list[av.AudioFrame]]:
        pictures, packets = [], []
        for at in frames_at:  # the video track keeps only the newest frames: one at a time
            video.offer(at, image)
            pictures.append((await video.recv()).pts)
        with contextlib.suppress(asyncio.TimeoutError):
            while True:  # until the track waits for more
                packets.append(await asyncio.wait_for(audio.next_frame(), 0.5))
        return pictures, packets
    return asyncio.run(tracks())


def LEVEL(k: int) -> float:
    return (k + 1) / 64


@pytest.mark.parametrize("fps", [25, 30])
def test_each_frames_sound_is_stamped_with_its_picture(fps):
    """Frames due on time, then a slip of 110 ms (the session re-anchored its clock), then on time.

    Each frame's sound starts at the frame's own time, as its picture does: the slip's gap is in
    both tracks' timestamps at the same frame (at 30 fps, whose frames are not whole 20 ms packets,
    the packet under way is finished with silence first). No sample is lost or sent twice.
    """
    slip = 0.110
    frames_at = [k / fps + (slip if k >= 6 else 0.0) for k in range(15)]
    pictures, packets = _sent(frames_at, fps)
    assert pictures == [round(at * VIDEO_RATE) for at in frames_at]
    assert all(len(p.to_ndarray()[0]) == 2 * AUDIO_CHUNK for p in packets)  # 20 ms each, stereo interleaved
    assert all(b.pts >= a.pts + AUDIO_CHUNK for a, b in zip(packets, packets[1:])), "no packet overlaps another"
    starts = {}  # frame -> the sample time its sound starts at
    counts = collections.Counter()
    for packet in packets:
        left = packet.to_ndarray()[0][::2] / 32767
        for offset, value in enumerate(left):
            k = round(value * 64) - 1
            if k >= 0:
                starts.setdefault(k, packet.pts + offset)
                counts[k] += 1
    for k, at in enumerate(frames_at):
        assert starts[k] == round(at * AUDIO_RATE), (k, starts[k], round(at * AUDIO_RATE))
        assert starts[k] * VIDEO_RATE / AUDIO_RATE == pytest.approx(pictures[k], abs=2)
        assert counts[k] == AUDIO_RATE // fps


def test_opus_is_encoded_in_the_track_on_the_frames_timeline():
    """Where Opus is settled on, the track hands aiortc packets it encoded itself (aiortc's sender
    would encode each on its executor, which falls behind on a busy machine). Their timestamps keep
    the frames' timeline: 20 ms apart, and the slip's gap once."""
    slip = 0.110
    frames_at = [k / 25 + (slip if k >= 6 else 0.0) for k in range(15)]
    output = SimpleNamespace(origin=time.monotonic() - 100.0, start=lambda: None,
                             video=SimpleNamespace(send_delay=SendDelay()))
    audio = OutputAudioTrack(output)
    audio.encoder = OpusEncoder()
    t = np.arange(AUDIO_RATE // 25) / AUDIO_RATE
    for k, at in enumerate(frames_at):
        audio.offer(at, np.tile(0.3 * np.sin(2 * np.pi * 440 * (t + k / 25)), (2, 1)).astype(np.float32))

    async def packets() -> list:
        got = []
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                got.append(await asyncio.wait_for(audio.recv(), 0.5))
        return got
    sent = asyncio.run(packets())
    assert sent and all(isinstance(p, av.Packet) and p.time_base == Fraction(1, AUDIO_RATE) for p in sent)
    assert len(sent) >= 2 * len(frames_at) - 1  # the first may go into the encoder's look-ahead
    steps = np.diff([p.pts for p in sent])
    assert sorted(steps.tolist()) == [AUDIO_CHUNK] * (len(steps) - 1) + [AUDIO_CHUNK + round(slip * AUDIO_RATE)]
    decoder = OpusDecoder()
    decoded = np.concatenate([frame.to_ndarray()[0] for p in sent
                              for frame in decoder.decode(JitterFrame(bytes(p), 0))]) / 32767
    assert 0.1 < np.sqrt(np.mean(decoded[AUDIO_RATE // 10 :] ** 2)) < 0.4, "the tone came through"
