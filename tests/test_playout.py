"""The playout clock (stream/playout.py) on times it is given, and the live output queue's end marker."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream.frames import Trace, VideoFrame
from stream.live import _OutputSink
from stream.playout import EASE_EVERY, Playout

FPS = 25
T = 1.0 / FPS


def play(playout: Playout, ready: list[float], start: float = 100.0) -> list[tuple[int, float]]:
    """Frames 0.. (pts i/FPS) ready at start + ready[i], taken as soon as each is ready and its
    predecessor has left; every frame but the last has another behind it. (index, departure) of those shown."""
    shown, now = [], start
    for i, offset in enumerate(ready):
        ready_at = start + offset
        now = max(now, ready_at)
        if playout.skips(i * T, ready_at, now, next_ready=i + 1 < len(ready)):
            continue
        now = max(now, playout.due(i * T, now))
        shown.append((i, now))
    return shown


def test_frames_leave_on_the_clock_the_first_frame_set():
    playout = Playout(FPS)
    shown = play(playout, [0.3 + i * T for i in range(40)])  # each as late as the first, 0.3 s
    np.testing.assert_allclose(np.diff([t for _, t in shown]), T, rtol=0, atol=1e-9)
    assert [i for i, _ in shown] == list(range(40))
    assert playout.slips == playout.eased == 0


def test_a_late_frame_slips_the_clock_and_later_frames_keep_their_spacing():
    playout = Playout(FPS)
    ready = [0.1 + i * T for i in range(30)]
    ready[10] += 0.2  # one slow window: frame 10 is ready 0.2 s after its time
    ready[11:] = [max(r, ready[10]) for r in ready[11:]]
    shown = play(playout, ready)
    departures = dict(shown)
    assert playout.slips == 1
    assert departures[10] == pytest.approx(100 + ready[10])
    # Frames 11.. were all ready with it: they still leave a frame apart, never bunched up.
    assert min(np.diff([t for _, t in shown])) == pytest.approx(T)


def test_the_delay_eases_back_a_frame_at_a_time_to_what_frames_need():
    playout = Playout(FPS)
    # The first frame needed 0.4 s; from frame 1 on, frames need 0.1 s: 0.3 s to give back.
    ready = [0.4] + [0.1 + i * T for i in range(1, 200)]
    shown = play(playout, ready)
    skipped = sorted(set(range(200)) - {i for i, _ in shown})
    assert len(skipped) == playout.eased
    # Down by whole frames, to within a frame of the target (0.1 s, the 90th percentile once the
    # first frame has left the history): 0.3 s is 7.5 frames.
    assert playout.eased == 7
    assert min(np.diff(skipped)) > EASE_EVERY  # never two skips closer than EASE_EVERY shown frames
    last_index, last_departure = shown[-1]
    assert 0.1 < last_departure - 100 - last_index * T <= 0.1 + T
    # Between two skips the frames keep their spacing; each skip gives back one frame.
    gaps = np.diff([t for _, t in shown])
    np.testing.assert_allclose(gaps, T, rtol=0, atol=1e-9)


def test_the_last_frame_is_never_skipped():
    for n in range(20, 20 + EASE_EVERY + 1):  # every phase of the easing against the stream's end
        playout = Playout(FPS)
        shown = play(playout, [0.8] * n)  # all ready at once, long after their times: delay to give back
        assert playout.eased > 0
        assert shown[-1][0] == n - 1, n


def test_the_output_queue_counts_frames_not_its_end_marker():
    async def main():
        outputs: asyncio.Queue = asyncio.Queue()
        sink = _OutputSink(asyncio.get_running_loop(), outputs, limit=8)
        image = np.full((4, 4, 3), 7, np.uint8)
        for i in range(2):
            sink.process(VideoFrame(i, i * T, image, Trace()))
        sink.flush()
        await asyncio.sleep(0)  # the loop runs what the pipeline's thread handed it
        assert outputs.qsize() == 3 and sink.frames_waiting() == 2
        await outputs.get()
        await outputs.get()
        assert sink.frames_waiting() == 0
        assert await outputs.get() is None

    asyncio.run(main())
