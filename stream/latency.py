"""Latency accounting for live output: every emitted frame, generated or passed through, is recorded."""

from __future__ import annotations

from collections import deque

import numpy as np

from stream.frames import Trace


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

    def record(self, trace: Trace, emitted_at: float) -> None:
        self.frames += 1
        if trace.captured_at is None:
            self.untraced += 1
            return
        added = emitted_at - trace.captured_at
        self._all.append(added)
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
