"""A WebRTC peer's incoming audio and video on one timeline: the video's RTP time, in seconds.

Each track's RTP timestamps start from a random origin and run at its own rate (48 kHz audio,
90 kHz video). Only the sender's reports relate the two: an RTCP sender report gives an RTP time
and the sender's wall-clock (NTP) time of the same moment, for each track, on one wall clock. A
browser's lip-sync lines its playout up by them, and browsers stamp RTP time at capture, so through
the reports audio and video line up as they were captured, whatever each then spent in encoders,
pacers and networks. Until both tracks have been reported on (aiortc reports every 0.5-1.5 s, a
browser's audio every few seconds), and wherever a report would move the audio by more than
REPORT_TRUSTED from where it arrived, audio is put on the video's timeline by arrival: its fastest
packets lined up with the video's fastest (``ClockMap``).

This reads aiortc's receivers (aiortc 1.16, private attributes): the RTP time its frames' pts count
from, and the reports it receives. Where they cannot be read, the arrival rule stays in force.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from aiortc.rtp import RtcpSrPacket

from transport.session_feed import ClockMap

log = logging.getLogger(__name__)

# A report that puts the audio farther than this from where its arrival puts it is not believed:
# a sender whose wall clock jumped, or whose reports are wrong (seconds off, or a stream restarted).
REPORT_TRUSTED = 0.5
# Reports whose mapping is taken at its earliest. A browser reports the capture time of an RTP time;
# aiortc reports when it sent the newest packet, which a slow encode (a keyframe) makes late by tens
# of milliseconds: of recent reports, the one that maps the track earliest is the least delayed.
REPORTS_KEPT = 10
_WRAP = 1 << 32


def _signed(difference: int) -> int:
    """An RTP timestamp difference, modulo 2^32, as the nearest signed value."""
    return (difference + (1 << 31)) % _WRAP - (1 << 31)


@dataclass(frozen=True)
class SenderReport:
    wall: float  # seconds on the sender's NTP clock
    rtp: int  # the RTP timestamp of that moment

    @classmethod
    def of(cls, packet) -> SenderReport | None:
        """A sender report's mapping; None for any other RTCP packet, and for aiortc's zeros before it
        has sent a packet (a mapping to 1900 would always be the earliest)."""
        if not isinstance(packet, RtcpSrPacket) or not packet.sender_info.ntp_timestamp:
            return None
        return cls(packet.sender_info.ntp_timestamp / _WRAP, packet.sender_info.rtp_timestamp)


def earliest_wall(reports, rtp: int, rate: int) -> float:
    """The sender's wall time of RTP time ``rtp`` (any number: compared modulo 2^32), by whichever of
    ``reports`` (SenderReport) maps it earliest (REPORTS_KEPT says why)."""
    return min(report.wall + _signed(rtp - report.rtp) / rate for report in reports)


class TrackTimes:
    """One incoming track: its frames' times in seconds, and their wall time from its reports."""

    def __init__(self, receiver) -> None:
        self.reports: collections.deque[SenderReport] = collections.deque(maxlen=REPORTS_KEPT)
        self.clock = ClockMap()  # its timestamps on our clock, from the fastest arrivals
        self._mapper = getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None)
        self._streams = getattr(receiver, "_RTCRtpReceiver__remote_streams", None)
        self._last: tuple[int, int] | None = None  # (pts, rate) of the newest frame
        handle = getattr(receiver, "_handle_rtcp_packet", None)
        if self._mapper is None or handle is None:
            log.warning("cannot read aiortc's receiver: audio and video are lined up by arrival only")
            return

        async def reported(packet) -> None:
            report = SenderReport.of(packet)
            if report is not None and (self._streams is None or packet.ssrc in self._streams):
                self.reports.append(report)
            await handle(packet)

        receiver._handle_rtcp_packet = reported

    def seconds(self, frame, arrived: float) -> float:
        """``frame``'s time on this track's timeline (from its first frame), noted with its arrival."""
        seconds = float(frame.pts * frame.time_base)
        self._last = (frame.pts, frame.time_base.denominator // frame.time_base.numerator)
        self.clock.observe(seconds, arrived)
        return seconds

    def wall(self) -> float | None:
        """The sender's wall time of the newest frame, by the report that maps it earliest."""
        origin = getattr(self._mapper, "_origin", None)
        if not self.reports or origin is None or self._last is None:
            return None
        pts, rate = self._last
        return earliest_wall(self.reports, origin + pts, rate)

    def seconds_at_wall(self, wall: float) -> float | None:
        """This track's time at the sender's wall time ``wall``."""
        newest = self.wall()
        if newest is None:
            return None
        pts, rate = self._last
        return pts / rate + (wall - newest)


class SenderClock:
    """Puts a peer's frames on the video's timeline: ``video_ts`` and ``audio_ts`` return seconds."""

    def __init__(self) -> None:
        self._tracks: dict[str, TrackTimes] = {}
        self.codec_delay = 0.0  # seconds the audio's sound is behind its timestamps (an encoder's look-ahead)
        self.by_report = 0  # audio frames placed by the sender's reports
        self.by_arrival = 0  # and by arrival

    def watch(self, receiver, kind: str) -> None:
        self._tracks[kind] = TrackTimes(receiver)

    def video_ts(self, frame, arrived: float) -> float:
        return self._tracks["video"].seconds(frame, arrived)

    def audio_ts(self, frame, arrived: float) -> float | None:
        """None while there is no picture to line it up with (yet): it then goes by its arrival."""
        audio = self._tracks["audio"]
        seconds = audio.seconds(frame, arrived)
        video = self._tracks.get("video")
        if video is None or not video.clock.started:
            return None
        by_arrival = video.clock.ts_at(audio.clock.at(seconds))
        wall = audio.wall()
        by_report = video.seconds_at_wall(wall) if wall is not None else None
        if by_report is not None and abs(by_report - by_arrival) <= REPORT_TRUSTED:
            self.by_report += 1
            return by_report - self.codec_delay
        self.by_arrival += 1
        return by_arrival - self.codec_delay
