"""Incoming WebRTC media handed on as soon as it is complete, not a packet or four later.

aiortc's receive jitter buffer releases a video frame only when the first packet of the NEXT frame
arrives (one frame interval, 40 ms at 25 fps, ignoring the RTP marker bit that ends a frame), and
holds audio until four more packets are in (80 ms). A player needs such a cushion; lipstream does
not play what it receives: it puts it on its own media clock, whose playout delay already absorbs
jitter. So the server's receivers release a video frame on its marker bit and an audio packet at
once, which takes ~40 ms off the picture's way in and ~60-80 ms off the audio's (the audio is what a
window waits for). Reordering inside a frame still waits for the missing packet; an audio packet
that arrives after a later one is dropped (a 20 ms gap), where aiortc would have reordered it.

A lost packet that will never come blocks aiortc's buffer until it overflows: a video buffer of
512 packets, which after a 3 s blackout left the server decoding broken pictures for 6-8 s more
(tests/test_network_faults.py), and an audio buffer of 16 packets, whose backlog of 300 ms then
stayed for good (it releases one packet per packet in). So the prompt buffer gives up on a hole:

- video: once the sender can no longer resend it (the newest packet is RTP_HISTORY_SIZE, 128,
  packets past it: aiortc's retransmission history, and its receiver asks only for those) or it has
  held the buffer up for HOLE_SECONDS (NACKs had a few round trips), everything held is dropped
  and a keyframe is asked for (PLI), again every PLI_SECONDS until one comes; the frames before it
  are dropped too (they decode to broken pictures without the lost one), and so are packets from
  before the drop that come late;
- audio (no retransmission): once AUDIO_REORDER packets arrived after it, the hole is skipped.

This reaches into aiortc's receiver (a private attribute, aiortc 1.16): where that is not found,
the receiver is left as it is and a warning says so.
"""

from __future__ import annotations

import logging
import time

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RTP_HISTORY_SIZE, RtpPacket
from aiortc.utils import uint16_add, uint16_gt

log = logging.getLogger(__name__)

_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"
HOLE_SECONDS = 0.5  # how long a missing video packet may hold the buffer up: NACK and resend, a few times
AUDIO_REORDER = 3  # packets (60 ms) that may arrive after a missing audio packet before it is given up
PLI_SECONDS = 0.25  # while waiting for a keyframe after a drop, ask again this often (a few round trips)
_START_CODE = b"\x00\x00\x00\x01"  # before each H.264 NAL unit, as aiortc depayloads them


def is_keyframe(data: bytes) -> bool:
    """Whether a depayloaded VP8 or H.264 frame (aiortc's depayloaders) decodes on its own.

    H.264 (Annex B, 4-byte start codes): it holds an IDR slice (NAL type 5) or a sequence parameter
    set (7, sent before one). VP8: the frame tag's first bit is 0 (RFC 6386, 9.1).
    """
    if data.startswith(_START_CODE):
        at = 0
        while (at := data.find(_START_CODE, at)) >= 0 and at + 4 < len(data):
            if data[at + 4] & 0x1F in (5, 7):
                return True
            at += 4
        return False
    return bool(data) and not data[0] & 1


class PromptJitterBuffer(JitterBuffer):
    """aiortc's buffer that releases a frame when it is complete and gives up on lost packets."""

    def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
        super().__init__(capacity, prefetch, is_video)
        self._blocked_since: float | None = None  # time.monotonic() when a hole first held the buffer up
        self._floor: int | None = None  # the newest sequence number when it was last flushed
        self.flushes = 0  # holes given up (video: buffer dropped and a keyframe asked for)
        self._awaiting_keyframe = False
        self._asked_at = 0.0  # time.monotonic() of the last keyframe request

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        if self._floor is not None:
            if not uint16_gt(packet.sequence_number, self._floor):
                return False, None  # from before a flush: its frame is gone
            if uint16_add(packet.sequence_number, -self._floor) >= 0x4000:
                self._floor = None  # long past: no longer a useful mark (sequence numbers wrap)
        pli, frame = super().add(packet)
        if frame is None and self._held_up(packet):
            pli, frame = self._give_up(packet, pli)
        else:
            self._blocked_since = None
        if self._awaiting_keyframe:
            # The frames after a dropped one decode to broken pictures: wait for a keyframe, and ask
            # again now and then (a PLI can be lost too).
            if frame is not None and is_keyframe(frame.data):
                self._awaiting_keyframe = False
            else:
                frame = None
                now = time.monotonic()
                if now - self._asked_at >= PLI_SECONDS:
                    pli, self._asked_at = True, now
        return pli, frame

    def _give_up(self, packet: RtpPacket, pli: bool) -> tuple[bool, JitterFrame | None]:
        """A hole holds the buffer up: skip it (audio) or drop everything and ask for a keyframe
        (video) once it has waited long enough; else keep waiting."""
        behind = uint16_add(packet.sequence_number, -self._origin)
        if behind >= 0x8000:
            return pli, None  # a late packet from before the origin, which aiortc dropped
        if not self._is_video:
            if behind < AUDIO_REORDER:
                return pli, None
            self._skip_hole()
            self.flushes += 1
            return pli, self._remove_frame(packet.sequence_number)
        now = time.monotonic()
        if self._blocked_since is None:
            self._blocked_since = now
        if behind < RTP_HISTORY_SIZE and now - self._blocked_since < HOLE_SECONDS:
            return pli, None
        self.remove(self.capacity)
        self._origin = None
        self._floor = packet.sequence_number
        self._blocked_since = None
        self._awaiting_keyframe, self._asked_at = True, now
        self.flushes += 1
        return True, None

    def _held_up(self, newest: RtpPacket) -> bool:
        """Nothing can leave although a later frame than the oldest one held has begun: a hole."""
        if self._origin is None:
            return False
        oldest = self._packets[self._origin % self.capacity]
        return oldest is None or oldest.timestamp != newest.timestamp

    def _skip_hole(self) -> None:
        """Move the origin past the missing packets at its start."""
        for _ in range(self.capacity):
            if self._packets[self._origin % self.capacity] is not None:
                return
            self.remove(1)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                break
            packets.append(packet)
            if packet.marker or not self._is_video:  # the frame's last packet (every Opus packet is one)
                self.remove(count + 1)
                return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packet.timestamp)
        return super()._remove_frame(sequence_number)


def make_prompt(receiver) -> bool:
    """Swap ``receiver``'s jitter buffer for a prompt one of the same size; False if it cannot."""
    current = getattr(receiver, _ATTRIBUTE, None)
    if not isinstance(current, JitterBuffer):
        log.warning("aiortc's receiver has no jitter buffer where expected: incoming media keep its delay")
        return False
    setattr(receiver, _ATTRIBUTE, PromptJitterBuffer(current.capacity, is_video=current._is_video))
    return True
