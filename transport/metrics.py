"""Prometheus metrics of a ``SessionManager``, read from the sessions at each scrape.

Nothing is counted twice: the sessions already count their frames (``LiveSession.stats()``) and
their latency (``LatencyLog.histogram()``), so the collector writes no metric of its own from the
pipeline's threads. It reads them when ``/metrics`` is scraped, on the event loop that owns the
sessions; that is why it goes in a registry of its own and never in prometheus_client's global one,
whose ``start_http_server`` would scrape from another thread.

Per-session series (labels ``session`` and ``kind``) exist while the session lives, so a server
that runs sessions for months keeps a bounded set of series. The ``*_all_total`` counters (label
``kind``) add the closed sessions' final counts, read from the manager's record of recently closed
sessions; a session counts there once, even if it opened and closed between two scrapes, as long
as fewer sessions close between two scrapes than that record keeps (``RECENT_SESSIONS``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from stream.sessions import KINDS, SessionManager

log = logging.getLogger(__name__)

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SESSION_LABELS = ["session", "kind"]

# lipstream_frames_<name>_total: what it counts.
FRAME_COUNTERS = {
    "out": "Frames sent",
    "generated": "Frames whose lower face the model generated",
    "late": "Frames of windows already late, sent unchanged",
    "dropped": "Frames never sent: ticks a full pipeline refused, and output nobody read",
    "silent": "Frames in silence, shown unchanged without running the model",
    "interrupted": "Frames in flight at an interrupt, sent as the idle avatar with silence",
}


def frame_counts(stats: dict) -> dict[str, int]:
    """FRAME_COUNTERS' values from a session's ``stats()`` (or the description of a closed one).

    ``dropped_frames`` in the stats includes the late frames; here they are apart, so that the
    counters add up.
    """
    return {"out": stats["frames_out"], "generated": stats["frames_generated"],
            "late": stats["late_frames"], "dropped": stats["dropped_frames"] - stats["late_frames"],
            "silent": stats["silent_frames"], "interrupted": stats["interrupted_frames"]}


class SessionMetrics:
    """A prometheus_client collector: register it in a ``CollectorRegistry`` scraped on the loop.

    ``gauges``: more gauges, name -> a callable read at each scrape (``add_gauge``), for parts of
    the server that live elsewhere, such as the MQTT bridge's ``lipstream_mqtt_connected``.
    """

    def __init__(self, manager: SessionManager, gauges: dict[str, Callable[[], float]] | None = None):
        self.manager = manager
        self._gauges: dict[str, tuple[Callable[[], float], str]] = {}
        for name, read in (gauges or {}).items():
            self.add_gauge(name, read)
        self._closed: dict[str, Counter] = {kind: Counter() for kind in KINDS}
        self._closed_sessions: Counter = Counter()
        self._folded: list[dict] = []  # the closed-session records already counted

    def add_gauge(self, name: str, read: Callable[[], float], documentation: str = "") -> None:
        """Report ``read()`` as gauge ``name`` at every scrape (a failing ``read`` is left out)."""
        if not METRIC_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a Prometheus metric name")
        self._gauges[name] = (read, documentation or name)

    def collect(self) -> Iterator[Metric]:
        self._fold_closed()
        sessions = list(self.manager.sessions.values())
        stats = {session.name: session.stats() for session in sessions}

        by_kind = Counter(session.kind for session in sessions)
        live = GaugeMetricFamily("lipstream_sessions", "Live sessions", labels=["kind"])
        for kind in KINDS:
            live.add_metric([kind], by_kind[kind])
        yield live
        yield GaugeMetricFamily("lipstream_sessions_max", "Live sessions the server may run at once",
                                value=self.manager.max_sessions)
        closed = CounterMetricFamily("lipstream_sessions_closed", "Sessions closed", labels=["kind"])
        for kind in KINDS:
            closed.add_metric([kind], self._closed_sessions[kind])
        yield closed

        counts = {session.name: frame_counts(stats[session.name]) for session in sessions}
        for counter, documentation in FRAME_COUNTERS.items():
            per_session = CounterMetricFamily(f"lipstream_frames_{counter}", f"{documentation}, per live session",
                                              labels=SESSION_LABELS)
            every = {kind: self._closed[kind][counter] for kind in KINDS}
            for session in sessions:
                per_session.add_metric([session.name, session.kind], counts[session.name][counter])
                every[session.kind] += counts[session.name][counter]
            yield per_session
            all_sessions = CounterMetricFamily(f"lipstream_frames_{counter}_all",
                                               f"{documentation}, by every session, closed ones included",
                                               labels=["kind"])
            for kind in KINDS:
                all_sessions.add_metric([kind], every[kind])
            yield all_sessions

        latency = HistogramMetricFamily("lipstream_latency_seconds",
                                        "Added latency of each frame sent (capture to emission)",
                                        labels=SESSION_LABELS)
        for session in sessions:
            buckets, total = session.latency.histogram()
            latency.add_metric([session.name, session.kind],
                               [(floatToGoString(bound), count) for bound, count in buckets], total)
        yield latency

        offset = GaugeMetricFamily("lipstream_av_offset_seconds", "The largest gap between a frame's "
                                   "timestamp and its audio's over the last 1000 frames (audio late > 0)",
                                   labels=SESSION_LABELS)
        depth = GaugeMetricFamily("lipstream_queue_depth", "Items waiting in a pipeline stage's inbox",
                                  labels=SESSION_LABELS + ["queue"])
        buffered = GaugeMetricFamily("lipstream_program_audio_buffered_seconds",
                                     "Program audio waiting to be played", labels=SESSION_LABELS)
        for session in sessions:
            labels, numbers = [session.name, session.kind], stats[session.name]
            if numbers["av_offset_ms"] is not None:
                offset.add_metric(labels, numbers["av_offset_ms"] / 1000)
            for queue, items in numbers["queue_depths"].items():
                depth.add_metric(labels + [queue], items)
            if "buffered_seconds" in numbers:
                buffered.add_metric(labels, numbers["buffered_seconds"])
        yield from (offset, depth, buffered)

        for name, (read, documentation) in self._gauges.items():
            try:
                value = float(read())
            except Exception:
                log.exception("metric %s could not be read", name)
                continue
            yield GaugeMetricFamily(name, documentation, value=value)

    def _fold_closed(self) -> None:
        """Add the sessions that closed since the last scrape to the closed sessions' totals.

        The manager's records of closed sessions are new objects, and the ones counted stay
        referenced here, so identity tells the new ones apart.
        """
        recent = list(self.manager.recent)
        for record in recent:
            if not any(record is folded for folded in self._folded):
                self._closed[record["kind"]].update(frame_counts(record))
                self._closed_sessions[record["kind"]] += 1
        self._folded = recent
