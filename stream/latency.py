"""Latency accounting for live output: every frame knows when it was captured."""

from __future__ import annotations

import numpy as np


def percentiles(values_s: list[float]) -> dict[str, float]:
    """p50 / p95 / max in milliseconds (zeros when there is nothing yet)."""
    if not values_s:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    ms = np.asarray(values_s) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
            "max": round(float(ms.max()), 1)}


class LatencyLog:
    """Added latency per output frame (emit time - capture time), and per stage from the marks."""

    def __init__(self, limit: int = 10_000):
        self.limit = limit
        self.added: list[float] = []
        self.per_stage: dict[str, list[float]] = {}

    def record(self, captured_at: float, marks: dict[str, float], emitted_at: float) -> None:
        if len(self.added) >= self.limit:  # a long session keeps a bounded, recent sample
            del self.added[: self.limit // 2]
            for values in self.per_stage.values():
                del values[: len(values) // 2]
        self.added.append(emitted_at - captured_at)
        for stage, at in marks.items():
            self.per_stage.setdefault(stage, []).append(at - captured_at)

    def summary(self) -> dict:
        return {"latency_ms": percentiles(self.added),
                "stage_done_ms_p50": {stage: percentiles(values)["p50"]
                                      for stage, values in self.per_stage.items()}}
