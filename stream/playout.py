"""The playout clock of a live stream: when each frame leaves, and which frame is skipped to give delay back.

Frame at media time ``pts`` leaves at ``anchor + pts``. The first frame sets the anchor, so the
playout delay starts as what that frame needed. A frame ready after its due time leaves at once
and the clock re-anchors (a slip), so later frames keep their spacing instead of bunching up. The
delay then eases back down to the 90th percentile of what recent frames needed, so one slow
window costs a slip, not a permanently higher latency. It comes down a whole frame at a time, the
frame skipped with its audio, at most once every ``EASE_EVERY`` frames: squeezing the spacing of
the frames instead would leave the audio, which a transport plays sample-continuously, behind the
pictures by all the delay given back.

Pure bookkeeping on times it is given: the session's event loop owns it and does the waiting.
"""

from __future__ import annotations

import collections

import numpy as np

EASE_EVERY = 5  # frames shown between two skipped to ease the delay
NEEDED_HISTORY = 50  # frames whose needed delay the target follows (2 s at 25 fps)


class Playout:
    def __init__(self, fps: float):
        self.frame_time = 1.0 / fps
        self._anchor: float | None = None
        self._needed: collections.deque[float] = collections.deque(maxlen=NEEDED_HISTORY)
        self._shown_since_eased = 0
        self.eased = 0  # frames skipped to bring the delay back down
        self.slips = 0  # frames that were late, after which the clock re-anchored

    def skips(self, pts: float, ready_at: float, now: float, next_ready: bool) -> bool:
        """Take the frame at ``pts``, ready (out of the pipeline) at ``ready_at``; whether to skip it.

        ``next_ready``: another frame is waiting behind it, which a skip needs, or the stream would
        go without a picture for a frame. The end of the stream is not a frame: the last is never skipped.
        """
        # From when it was ready, not from now: a frame that waited while the one before it was
        # held to its time would otherwise report the playout delay itself as what it needed,
        # and the delay could never come down.
        self._needed.append(ready_at - pts)
        if self._anchor is None:
            self._anchor = now - pts
        if (not next_ready or self._shown_since_eased < EASE_EVERY  # the cheap tests first
                or self._anchor - float(np.percentile(self._needed, 90)) <= self.frame_time):
            self._shown_since_eased += 1
            return False
        self._anchor -= self.frame_time
        self._shown_since_eased = 0
        self.eased += 1
        return True

    def due(self, pts: float, now: float) -> float:
        """When the frame at ``pts`` (taken, not skipped) leaves: on the clock, or now if that is
        more than a frame behind, and the clock re-anchors on it."""
        due = self._anchor + pts
        if now - due > self.frame_time:
            self._anchor = now - pts
            self.slips += 1
            due = now
        return due
