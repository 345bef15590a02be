"""Incoming WebRTC media handed on as soon as it is complete, not a packet or four later.

aiortc's receive jitter buffer releases a video frame only when the first packet of the NEXT frame
arrives (one frame interval, 40 ms at 25 fps, ignoring the RTP marker bit that ends a frame), and
holds audio until four more packets are in (80 ms). A player needs such a cushion; lipstream does
not play what it receives: it puts it on its own media clock, whose playout delay already absorbs
jitter. So the server's receivers release a video frame on its marker bit and an audio packet at
once, which takes ~40 ms off the picture's way in and ~60-80 ms off the audio's (the audio is what a
window waits for). Reordering inside a frame still waits for the missing packet; an audio packet
that arrives after a later one is dropped (a 20 ms gap), where aiortc would have reordered it.

This reaches into aiortc's receiver (a private attribute, aiortc 1.16): where that is not found,
the receiver is left as it is and a warning says so.
"""

from __future__ import annotations

import logging

from aiortc.jitterbuffer import JitterBuffer, JitterFrame

log = logging.getLogger(__name__)

_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"


class PromptJitterBuffer(JitterBuffer):
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
