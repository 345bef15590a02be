"""The server's receive buffers hand a frame on when it is complete (transport/prompt_jitter.py)."""

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from transport.prompt_jitter import PromptJitterBuffer


def packet(sequence: int, timestamp: int, marker: bool = False) -> RtpPacket:
    p = RtpPacket(payload_type=96, marker=int(marker), sequence_number=sequence, timestamp=timestamp)
    p._data = bytes([sequence % 256]) * 10
    return p


def test_a_video_frame_leaves_on_its_marker_bit_where_aiortc_waits_for_the_next_frame():
    ours, theirs = PromptJitterBuffer(128, is_video=True), JitterBuffer(128, is_video=True)
    frame = [packet(100, 3000), packet(101, 3000), packet(102, 3000, marker=True)]
    released = [ours.add(p)[1] for p in frame]
    assert released[:2] == [None, None]  # incomplete: nothing yet
    assert released[2] is not None and released[2].timestamp == 3000
    assert released[2].data == b"".join(p._data for p in frame)
    assert all(theirs.add(p)[1] is None for p in frame)
    assert theirs.add(packet(103, 6600))[1].timestamp == 3000  # one frame later
    assert ours.add(packet(103, 6600, marker=True))[1].timestamp == 6600  # the next is prompt too


def test_a_frame_with_a_missing_packet_waits_for_it():
    ours = PromptJitterBuffer(128, is_video=True)
    assert ours.add(packet(200, 100))[1] is None
    assert ours.add(packet(202, 100, marker=True))[1] is None  # 201 is missing
    frame = ours.add(packet(201, 100))[1]
    assert frame is not None and frame.data == b"".join(packet(n, 100)._data for n in (200, 201, 202))


def test_audio_packets_leave_at_once_where_aiortc_holds_four():
    ours, theirs = PromptJitterBuffer(16), JitterBuffer(16, prefetch=4)
    for n in range(5):
        assert ours.add(packet(n, 960 * n))[1].timestamp == 960 * n
    assert [theirs.add(packet(n, 960 * n))[1] for n in range(4)] == [None] * 4
