"""Latency accounting for live output: every emitted frame, generated or passed through, is recorded."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque

import numpy as np

from stream.frames import Trace

# Upper bounds (seconds) of the added-latency histogram: from a fast GPU's window to a stalled CPU.
LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


def percentiles(values_s) -> dict[str, float]:
    """p50 / p95 / max in milliseconds (zeros when there is nothing yet)."""
    if not len(values_s):
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    ms = np.asarray(values_s) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
            "max": round(float(ms.max()), 1)}


class LatencyLog:
    """Added latency per output frame (emit time - capture time), and per stage from the trace's marks.

    Counts are for the whole stream; the percentiles are over the last ``limit`` frames, so a long
    session keeps a bounded, recent sample. ``untraced`` counts frames that reached the output
    without a capture time: a stage that lost the trace, which must never happen live.
    ``histogram()`` covers every traced frame of the stream, in fixed buckets (``LATENCY_BUCKETS``).
    """

    def __init__(self, limit: int = 10_000):
        self.frames = 0
        self.frames_generated = 0
        self.untraced = 0
        self._all: deque[float] = deque(maxlen=limit)
        self._generated: deque[float] = deque(maxlen=limit)
        self._passed: deque[float] = deque(maxlen=limit)
        self._per_stage: dict[str, deque[float]] = {}
        self._limit = limit
        self._in_bucket = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound
        self._sum = 0.0

    def record(self, trace: Trace, emitted_at: float) -> None:
        self.frames += 1
        if trace.captured_at is None:
            self.untraced += 1
            return
        added = emitted_at - trace.captured_at
        self._all.append(added)
        self._in_bucket[bisect_left(LATENCY_BUCKETS, added)] += 1
        self._sum += added
        if trace.generated:
            self.frames_generated += 1
            self._generated.append(added)
        else:
            self._passed.append(added)
        for stage, at in trace.marks.items():
            self._per_stage.setdefault(stage, deque(maxlen=self._limit)).append(at - trace.captured_at)

    def summary(self) -> dict:
        return {"latency_ms": percentiles(self._all),
                "latency_generated_ms": percentiles(self._generated),
                "latency_passed_ms": percentiles(self._passed),
                "frames_traced": self.frames - self.untraced,
                "stage_done_ms_p50": {stage: percentiles(values)["p50"]
                                      for stage, values in self._per_stage.items()}}

    def histogram(self) -> tuple[list[tuple[float, int]], float]:
        """([(upper bound s, frames at or below it)...], sum of seconds): cumulative, +inf last."""
        counts, total = [], 0
        for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), self._in_bucket):
            total += count
            counts.append((bound, total))
        return counts, self._sum
