"""The server's receive buffers hand a frame on when it is complete (transport/prompt_jitter.py)."""

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from transport.prompt_jitter import HOLE_SECONDS, PLI_SECONDS, PromptJitterBuffer, is_keyframe


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



VP8_KEY, VP8_INTER = b"\x10\x02\x00", b"\x31\x01\x00"  # frame tag bit 0: 0 = keyframe (RFC 6386)


def vp8(sequence: int, timestamp: int, key: bool = False) -> RtpPacket:
    p = packet(sequence, timestamp, marker=True)
    p._data = (VP8_KEY if key else VP8_INTER) + bytes([sequence % 256]) * 10
    return p


def test_keyframes_are_told_from_the_others():
    assert is_keyframe(VP8_KEY) and not is_keyframe(VP8_INTER)
    sps, idr, slice_ = (b"\x00\x00\x00\x01" + bytes([header]) + b"\x00" * 4 for header in (0x67, 0x65, 0x41))
    assert is_keyframe(sps + idr) and is_keyframe(idr) and not is_keyframe(slice_ + slice_)


def test_video_gives_up_a_packet_the_sender_can_no_longer_resend_and_waits_for_a_keyframe(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("transport.prompt_jitter.time.monotonic", lambda: clock[0])
    ours = PromptJitterBuffer(512, is_video=True)
    assert ours.add(vp8(0, 0, key=True))[1].timestamp == 0
    # Packet 1 is lost for good (a blackout): the frames after it are held, one packet each...
    held = [ours.add(vp8(n, 3600 * n)) for n in range(2, 129)]
    assert held == [(False, None)] * len(held) and ours.flushes == 0
    # ...until the newest is 128 packets past it, beyond aiortc's retransmission history: all are
    # dropped and a keyframe is asked for (the PLI flag).
    assert ours.add(vp8(129, 3600 * 129)) == (True, None) and ours.flushes == 1
    assert ours.add(vp8(1, 3600)) == (False, None), "a late packet from before the drop is ignored"
    # Frames that need the dropped ones are not released; the request is made again after a while.
    assert ours.add(vp8(130, 3600 * 130)) == (False, None)
    clock[0] += PLI_SECONDS
    assert ours.add(vp8(131, 3600 * 131)) == (True, None)
    assert ours.add(vp8(132, 3600 * 132, key=True))[1].timestamp == 3600 * 132
    assert ours.add(vp8(133, 3600 * 133))[1].timestamp == 3600 * 133


def test_video_gives_up_a_hole_that_held_it_up_too_long(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("transport.prompt_jitter.time.monotonic", lambda: clock[0])
    ours = PromptJitterBuffer(512, is_video=True)
    ours.add(vp8(10, 0, key=True))
    assert ours.add(vp8(12, 7200)) == (False, None)  # 11 lost
    clock[0] += HOLE_SECONDS - 0.01
    assert ours.add(vp8(13, 10800)) == (False, None), "NACK and resend still have time"
    clock[0] += 0.02
    assert ours.add(vp8(14, 14400)) == (True, None)
    assert ours.add(vp8(15, 18000, key=True))[1].timestamp == 18000


def test_a_resent_packet_in_time_fills_the_hole_and_nothing_is_dropped():
    ours = PromptJitterBuffer(512, is_video=True)
    ours.add(vp8(10, 0, key=True))
    assert ours.add(vp8(12, 7200)) == (False, None)
    assert ours.add(vp8(11, 3600))[1].timestamp == 3600
    assert ours.add(vp8(13, 10800))[1].timestamp == 7200  # one frame per packet in: catching up
    assert ours.add(vp8(14, 14400))[1].timestamp == 10800
    assert ours.flushes == 0


def test_audio_skips_a_lost_packet_after_a_few_more_and_its_backlog_stays_small():
    ours = PromptJitterBuffer(16)
    assert ours.add(packet(0, 0))[1].timestamp == 0
    # 1 is lost; 2 and 3 may still be overtaking it (jitter reorders).
    assert ours.add(packet(2, 1920))[1] is None and ours.add(packet(3, 2880))[1] is None
    assert ours.add(packet(4, 3840))[1].timestamp == 1920  # given up after AUDIO_REORDER packets
    later = [ours.add(packet(n, 960 * n))[1].timestamp // 960 for n in range(5, 40)]
    assert later == list(range(3, 38)), "two packets (40 ms) behind from then on, not the buffer's 16"
    assert ours.flushes == 1
