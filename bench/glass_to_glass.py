"""Glass-to-glass bench: a WebRTC peer that sends a real clip to the server and times what comes back.

    python run_stream.py bench --webrtc [--video V] [--audio A] [--config tiny] [--seconds 60]
                                        [--size 374x398] [--json out.json] [--url http://HOST:PORT]
    python -m bench.glass_to_glass ...          (the same, from the repository root)

The session's own stats start at the server's tick and end when the frame leaves the session; they
cannot see the sender's and the server's encoders, packetisation, the network, the jitter buffers or
a stall between the pipeline and the socket. This probe measures from outside, on one clock:

- an aiortc peer (this process) sends camera + microphone in real time: the
  clip looped forward-backward at 25 fps, each picture stamped with its index in the top-left
  corner (``draw_stamp``), and the speech looped, with a chirp once a second aligned with the start
  of a known frame's span (``insert_markers``); each audio packet waits as long as a picture takes
  to be encoded and sent (``SendDelay``), so that the two leave in sync, as a capturing device's
  timestamps would put them;
- without ``--url`` the server is started here, in a subprocess, on loopback only
  (``ServerProcess``), and stopped at the end;
- what comes back is timed at the moment its packets reach this peer (``PacketArrivals``): a
  frame when its last packet arrived, audio when its packet did. aiortc's receiver releases a video
  frame only when the next frame's first packet arrives, and audio 4 packets (80 ms) late (its
  jitter buffer's prefetch); those holds belong to this probe, not to the server, so they are taken
  out, and reported as ``receiver_hold_ms`` (receive call minus packet arrival).

Figures (``summarise``): per-frame latency (arrival of a frame minus the moment the picture with its
stamp was sent; every received frame, generated or passed through), time to first frame, the A/V
offset at the receiver (a marker's arrival in the audio minus the arrival of the first frame stamped
with the marker's frame; positive: audio late; it includes libopus's 6.5 ms lookahead at each of
the two encodes, as any receiver would), the fraction of frames the model changed (``FaceRegions``,
``is_generated``) and the server's own figures for the same session. The ``*_at_recv_ms`` figures
are the same taken when aiortc's ``recv()`` returns (audio less its prefetch, the video's hold left
in), for comparison with measurements made that way.

The module lives in ``bench/``, which is importable from a checkout (the repository root is on
``sys.path`` when ``run_stream.py`` runs); it is not installed with the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import aiohttp
import av
import cv2
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bench.make_clip import make_clip
from transport.files import MediaError, read_audio, read_video
from transport.sender_clock import SenderReport, earliest_wall
from transport.webrtc import IceSettings, SendDelay

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
DEFAULT_SIZE = (374, 398)
FPS = 25
VIDEO_CLOCK = 90_000
AUDIO_RATE = 48_000
PACKET = AUDIO_RATE // 50  # 20 ms, one Opus packet
SAMPLES_PER_FRAME = AUDIO_RATE // FPS

# The stamp: 2 rows of 12 blocks of 16x16 px, one per bit, aligned with VP8's and H.264's 16x16
# macroblocks so that each bit is one flat block. 16 bits of frame index and a CRC-8 of them.
STAMP_BLOCK = 16
STAMP_COLUMNS = 12
STAMP_ROWS = 2
INDEX_BITS = 16
CHECK_BITS = 8
STAMP_DARK, STAMP_LIGHT = 32, 224
# A block read between these (mean luma of its inner 8x8) is neither: the stamp is rejected.
STAMP_UNCLEAR = (80, 176)

# The audio marker: a 60 ms linear chirp, loud and wide-band, so that a matched filter finds it to
# the sample after two Opus encodes. One a second, at the start of frame MARKER_FRAME of that second.
CHIRP_SECONDS = 0.06
CHIRP_BAND = (500.0, 5000.0)
CHIRP_LEVEL = 0.6
MARKER_FRAME = FPS // 2
MARKER_THRESHOLD = 0.5  # normalised cross-correlation; speech stays under 0.3

# A frame counts as generated when its lower face differs from the frame that was sent by more than
# GENERATED_RATIO times the difference around the face (codec noise) plus GENERATED_MARGIN levels.
# Measured (tiny, VP8 twice): passed-through frames 2-4 levels against a ring at ~3; generated ones
# ~30; the 3-frame cross-fades in between (10-20) count as generated, as the model ran for them.
GENERATED_RATIO = 2.0
GENERATED_MARGIN = 2.0
CONTROL_RING = (8, 32)  # px around the paste footprint: the control region for codec noise

SERVER_START_TIMEOUT = 180.0
CONNECT_TIMEOUT = 20.0
FIRST_FRAME_TIMEOUT = 20.0
STALL_TIMEOUT = 5.0  # no video for this long once it flowed: the server has gone
DRAIN_TIMEOUT = 6.0  # after the last measured frame was sent, how long its return may take
MAX_CLIP_SECONDS = 20  # of --video kept in memory (then looped), ~110 MB at 374x398
STATS_CHANNEL = "stats"
REPORT_SPAN = 5.0  # s: the sender reports around a packet that may time it (``presented``)


class ProbeError(RuntimeError):
    """The bench cannot measure (no server, no frames back...): one line for the user."""


# -- the stamp --------------------------------------------------------------------------------


def _crc8(value: int, bits: int = INDEX_BITS) -> int:
    """CRC-8 (polynomial x^8 + x^2 + x + 1) of the ``bits`` low bits of ``value``, MSB first."""
    crc = 0
    for i in reversed(range(bits)):
        crc ^= ((value >> i) & 1) << 7
        crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _stamp_bits(index: int) -> list[int]:
    value = index % (1 << INDEX_BITS)
    word = (value << CHECK_BITS) | _crc8(value)
    return [(word >> i) & 1 for i in reversed(range(INDEX_BITS + CHECK_BITS))]


def stamp_size() -> tuple[int, int]:
    """(width, height) in pixels of the stamp, drawn from the top-left corner."""
    return STAMP_COLUMNS * STAMP_BLOCK, STAMP_ROWS * STAMP_BLOCK


def draw_stamp(yuv: np.ndarray, index: int) -> None:
    """Write ``index`` into the top-left corner of a yuv420p picture ((H * 3 / 2, W) uint8, in place).

    The blocks are grey (neutral chroma), so only the luma carries them.
    """
    width = yuv.shape[1]
    height = yuv.shape[0] * 2 // 3
    for bit_number, bit in enumerate(_stamp_bits(index)):
        row, column = divmod(bit_number, STAMP_COLUMNS)
        y0, x0 = row * STAMP_BLOCK, column * STAMP_BLOCK
        yuv[y0 : y0 + STAMP_BLOCK, x0 : x0 + STAMP_BLOCK] = STAMP_LIGHT if bit else STAMP_DARK
    stamp_w, stamp_h = stamp_size()
    flat = yuv.reshape(-1)
    chroma = (height // 2) * (width // 2)
    for start in (height * width, height * width + chroma):
        plane = flat[start : start + chroma].reshape(height // 2, width // 2)
        plane[: stamp_h // 2, : stamp_w // 2] = 128


def read_stamp(luma: np.ndarray) -> int | None:
    """The index stamped in a picture's luma plane (H, W), or None when a block is unclear or the CRC fails."""
    inner = slice(STAMP_BLOCK // 4, STAMP_BLOCK * 3 // 4)
    bits = []
    for bit_number in range(INDEX_BITS + CHECK_BITS):
        row, column = divmod(bit_number, STAMP_COLUMNS)
        y0, x0 = row * STAMP_BLOCK, column * STAMP_BLOCK
        level = float(luma[y0 : y0 + STAMP_BLOCK, x0 : x0 + STAMP_BLOCK][inner, inner].mean())
        if STAMP_UNCLEAR[0] < level < STAMP_UNCLEAR[1]:
            return None
        bits.append(int(level >= (STAMP_DARK + STAMP_LIGHT) / 2))
    word = int("".join(map(str, bits)), 2)
    value, check = word >> CHECK_BITS, word & ((1 << CHECK_BITS) - 1)
    return value if _crc8(value) == check else None


# -- the audio markers ------------------------------------------------------------------------


def chirp(rate: int = AUDIO_RATE) -> np.ndarray:
    """The marker: a linear chirp across CHIRP_BAND, with 5 ms raised-cosine ramps (float32)."""
    n = round(CHIRP_SECONDS * rate)
    t = np.arange(n) / rate
    f0, f1 = CHIRP_BAND
    wave = np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * CHIRP_SECONDS) * t * t))
    ramp = round(0.005 * rate)
    envelope = np.ones(n)
    envelope[:ramp] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    envelope[-ramp:] = envelope[:ramp][::-1]
    return (CHIRP_LEVEL * wave * envelope).astype(np.float32)


def marker_frames(frames: int, fps: int = FPS) -> list[int]:
    """The frames whose span starts with a marker: frame MARKER_FRAME of every second."""
    return list(range(MARKER_FRAME, frames, fps))


def insert_markers(audio: np.ndarray, frames: list[int], rate: int = AUDIO_RATE, fps: int = FPS) -> None:
    """Replace the audio at the start of each frame's span by the chirp (mono float, in place)."""
    marker = chirp(rate)
    for frame in frames:
        start = frame * rate // fps
        audio[start : start + len(marker)] = marker[: max(0, len(audio) - start)]


def find_markers(audio: np.ndarray, rate: int = AUDIO_RATE, threshold: float = MARKER_THRESHOLD,
                 spacing: float = 0.5) -> list[tuple[int, float]]:
    """(start sample, score) of each chirp found in mono ``audio``, in order.

    The score is the normalised cross-correlation with the chirp (1 = the chirp exactly, whatever
    its level); peaks above ``threshold`` closer than ``spacing`` seconds to a better one are dropped.
    """
    marker = chirp(rate).astype(np.float64)
    n, m = len(audio), len(marker)
    if n < m:
        return []
    size = 1 << int(np.ceil(np.log2(n + m)))
    signal = np.asarray(audio, np.float64)
    correlation = np.fft.irfft(np.fft.rfft(signal, size) * np.conj(np.fft.rfft(marker, size)), size)[: n - m + 1]
    energy = np.concatenate([[0.0], np.cumsum(signal * signal)])
    window = np.sqrt(np.maximum(energy[m:] - energy[:-m], 1e-12))
    score = correlation / (np.linalg.norm(marker) * window)
    found: list[tuple[int, float]] = []
    for start in np.argsort(score)[::-1]:
        if score[start] < threshold:
            break
        if all(abs(int(start) - other) > spacing * rate for other, _ in found):
            found.append((int(start), float(score[start])))
    return sorted(found)


# -- what is sent -----------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """ "374x398" -> (374, 398); both even (yuv420p)."""
    width, x, height = text.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()) or int(width) < 2 or int(height) < 2:
        raise ProbeError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 374x398")
    return int(width) // 2 * 2, int(height) // 2 * 2


def default_clip(size: tuple[int, int]) -> Path:
    """The talking-head clip from the shared media, made the way bench/make_clip.py makes it, cached."""
    source = MEDIA / "speaker_wide.mp4"
    if not source.exists():
        raise ProbeError(f"{source}: no such file (pass --video)")
    folder = Path(tempfile.gettempdir()) / "lipstream-bench"
    folder.mkdir(exist_ok=True)
    clip = folder / f"speaker_wide_{size[0]}x{size[1]}.mp4"
    if not clip.exists():
        partial = clip.with_suffix(".part.mp4")
        make_clip(source, partial, *size)
        partial.replace(clip)
    return clip


@dataclass
class Clip:
    """The camera: the clip's pictures, yuv420p ((H * 3 / 2, W) uint8), played forward-backward."""

    yuv: list[np.ndarray]

    @classmethod
    def load(cls, path: Path, frames: int) -> "Clip":
        """The first ``frames`` pictures at 25 fps (at most MAX_CLIP_SECONDS), cut to even sides."""
        yuv = []
        try:
            for frame in read_video(path, FPS):
                if frame.index >= min(frames, MAX_CLIP_SECONDS * FPS):
                    break
                h, w = frame.image.shape[:2]
                image = np.ascontiguousarray(frame.image[: h // 2 * 2, : w // 2 * 2])
                yuv.append(av.VideoFrame.from_ndarray(image, format="rgb24").to_ndarray(format="yuv420p"))
        except MediaError as exc:
            raise ProbeError(str(exc)) from None
        if not yuv:
            raise ProbeError(f"{path}: no video frames")
        return cls(yuv)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return self.yuv[0].shape[1], self.yuv[0].shape[0] * 2 // 3

    def picture_of(self, index: int) -> int:
        """Which clip picture frame ``index`` shows: forward, backward, forward... as transport.files.ping_pong."""
        n = len(self.yuv)
        if n == 1:
            return 0
        lap, position = divmod(index, n)
        return position if lap % 2 == 0 else n - 1 - position


def speech_track(path: Path, seconds: float) -> np.ndarray:
    """The microphone: the speech at 48 kHz mono float32, looped to ``seconds``."""
    try:
        speech = read_audio(path)[1][0]
    except MediaError as exc:
        raise ProbeError(str(exc)) from None
    if not len(speech):
        raise ProbeError(f"{path}: no audio samples")
    return np.resize(speech, round(seconds * AUDIO_RATE)).astype(np.float32)


@dataclass
class FaceRegions:
    """Per clip picture, the luma pixels the model may change and a control ring around them.

    ``lower``: where the regenerated lower face (LatentSync's mouth mask) lands once pasted back
    (``stream.compositing.paste_back`` of the mask, weight over one half). ``control``: a ring
    CONTROL_RING px outside the paste footprint, where the server changes nothing, so any difference
    there is codec noise. Flat indices into the luma plane; None where no face is found.
    """

    lower: list[np.ndarray | None]
    control: list[np.ndarray | None]

    @classmethod
    def of(cls, clip: Clip) -> "FaceRegions":
        # Imported here: mediapipe takes a second to load, and only this needs it.
        from stream.compositing import paste_back, paste_mask
        from stream.face_alignment import FaceAligner
        from stream.face_landmarks import FaceLandmarker
        from stream.mouth_mask import mouth_mask

        resolution = 256  # the footprint in frame pixels does not depend on the model's resolution
        regenerated = np.repeat(((1 - mouth_mask(resolution)) * 255).astype(np.uint8)[..., None], 3, axis=2)
        stamp_w, stamp_h = stamp_size()
        lower, control = [], []
        aligner = FaceAligner(resolution)
        with FaceLandmarker() as landmarker:
            for yuv in clip.yuv:
                rgb = cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)
                points = landmarker.alignment_points(rgb)
                if points is None:
                    lower.append(None)
                    control.append(None)
                    continue
                face = aligner.align(rgb, points)
                weight = paste_back(np.zeros_like(rgb), regenerated, face)[..., 0]
                inside = paste_mask(face, rgb.shape, margin=CONTROL_RING[0]) > 0
                around = paste_mask(face, rgb.shape, margin=CONTROL_RING[1]) > 0
                ring = around & ~inside
                ring[:stamp_h, :stamp_w] = False
                lower.append(np.flatnonzero(weight > 127))
                control.append(np.flatnonzero(ring))
        return cls(lower, control)

    def differences(self, luma: np.ndarray, clip: Clip, index: int) -> tuple[float, float] | None:
        """Mean absolute luma difference (lower face, control ring) between a received picture and
        the one sent as frame ``index``; None without a face or at another size."""
        picture = clip.picture_of(index)
        lower, ring = self.lower[picture], self.control[picture]
        sent = clip.yuv[picture]
        if lower is None or not len(lower) or luma.shape != (sent.shape[0] * 2 // 3, sent.shape[1]):
            return None
        received = luma.reshape(-1)
        sent = sent.reshape(-1)

        def mean_abs(idx: np.ndarray) -> float:
            return float(np.abs(received[idx].astype(np.int16) - sent[idx]).mean()) if len(idx) else 0.0
        return mean_abs(lower), mean_abs(ring)


def is_generated(lower: float, control: float) -> bool:
    """The rule: the lower face differs well beyond the codec noise measured around the face."""
    return lower > GENERATED_RATIO * control + GENERATED_MARGIN


class SendClock:
    """The one clock both sending tracks pace on; it starts at the first picture or packet asked for."""

    def __init__(self) -> None:
        self.origin: float | None = None

    def due(self, seconds: float) -> float:
        if self.origin is None:
            self.origin = time.monotonic()
        return self.origin + seconds


class StampedCamera(MediaStreamTrack):
    """Frame k of the clip (looped forward-backward), stamped with k, sent at origin + k / 25 s."""

    kind = "video"

    def __init__(self, clip: Clip, clock: SendClock) -> None:
        super().__init__()
        self.clip, self.clock = clip, clock
        self.sent: list[float] = []  # time.monotonic() at which frame k left recv()
        self.send_delay = SendDelay()  # the microphone waits as long, so that both leave together

    async def recv(self) -> av.VideoFrame:
        self.send_delay.asked()
        index = len(self.sent)
        due = self.clock.due(index / FPS)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        self.send_delay.taken(due)
        yuv = self.clip.yuv[self.clip.picture_of(index)].copy()
        draw_stamp(yuv, index)
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts, frame.time_base = index * VIDEO_CLOCK // FPS, Fraction(1, VIDEO_CLOCK)
        self.sent.append(time.monotonic())
        return frame


class MarkedMicrophone(MediaStreamTrack):
    """The speech with its markers, in 20 ms packets at origin + n * 20 ms; silence after its end."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, markers: list[int], clock: SendClock,
                 video_delay: SendDelay) -> None:
        super().__init__()
        self._video_delay = video_delay
        self._samples = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        self._marker_packets = {frame * SAMPLES_PER_FRAME // PACKET: frame for frame in markers}
        self.clock = clock
        self.packets = 0
        self.marker_sent: dict[int, float] = {}  # marker frame -> time.monotonic() its packet left recv()

    async def recv(self) -> av.AudioFrame:
        n = self.packets
        due = self.clock.due(n * PACKET / AUDIO_RATE) + self._video_delay.seconds
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        chunk = self._samples[n * PACKET : (n + 1) * PACKET]
        chunk = np.pad(chunk, (0, PACKET - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts, frame.time_base = n * PACKET, Fraction(1, AUDIO_RATE)
        if n in self._marker_packets:
            self.marker_sent[self._marker_packets[n]] = time.monotonic()
        self.packets += 1
        return frame


# -- what comes back --------------------------------------------------------------------------


class PacketArrivals:
    """When the last packet of each RTP timestamp reached this peer, before aiortc's receive buffer,
    and the sender's reports (RTCP SR) of this track.

    Wraps this receiver's (aiortc-internal) packet handlers. aiortc numbers a received frame's pts
    from the first timestamp it decodes (its timestamp mapper's origin, read from it): not always
    the first packet's, over a lossy link or when its buffer held the first packets back.
    """

    def __init__(self, receiver) -> None:
        self.at: dict[int, float] = {}
        self._first: int | None = None  # the first packet's timestamp, if the mapper cannot be read
        self._mapper = getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None)
        self._origin: int | None = None
        self.reports: list[tuple[float, SenderReport]] = []  # (arrival, report)
        handle, reported = receiver._handle_rtp_packet, receiver._handle_rtcp_packet

        async def timed(packet, arrival_time_ms: int) -> None:
            if self._first is None:
                self._first = packet.timestamp
            self.at[packet.timestamp] = time.monotonic()
            await handle(packet, arrival_time_ms=arrival_time_ms)

        async def report(packet) -> None:
            sender = SenderReport.of(packet)
            if sender is not None:
                self.reports.append((time.monotonic(), sender))
            await reported(packet)

        receiver._handle_rtp_packet = timed
        receiver._handle_rtcp_packet = report

    @property
    def origin(self) -> int | None:
        """The RTP timestamp that received frames' pts count from (as first set: the mapper lowers it
        by 2^32 at each wrap, and the pts go on counting)."""
        if self._origin is None:
            self._origin = getattr(self._mapper, "_origin", None)
        return self._first if self._origin is None else self._origin

    def of(self, pts: int | None) -> float | None:
        rtp = self.rtp(pts)
        return None if rtp is None else self.at.get(rtp % (1 << 32))

    def rtp(self, pts: int | None) -> int | None:
        """The RTP timestamp of a received frame's ``pts``, unwrapped (it may pass 2^32)."""
        origin = self.origin
        return None if origin is None or pts is None else origin + pts


def presented(reports: list[tuple[float, SenderReport]], rtp: int | None, at: float, rate: int) -> float | None:
    """The sender's wall time of RTP time ``rtp`` (received ``at``): what a receiver's lip-sync lines
    audio and video up by.

    aiortc's reports map an RTP time to when its packet was sent, which a slow encode (a keyframe)
    makes tens of ms late; of the reports received within REPORT_SPAN of ``at`` (else the nearest),
    the one that maps earliest is the least delayed (transport/sender_clock.py does the same).
    """
    if rtp is None or not reports:
        return None
    near = [r for r in reports if abs(r[0] - at) <= REPORT_SPAN] or [min(reports, key=lambda r: abs(r[0] - at))]
    return earliest_wall([report for _, report in near], rtp, rate)


@dataclass
class ReceivedFrame:
    stamp: int | None  # None: the stamp could not be read (unclear block or wrong check bits)
    received: float  # time.monotonic() when aiortc's recv() returned it
    arrived: float | None  # when its last packet arrived
    rtp: int | None  # its RTP timestamp
    differences: tuple[float, float] | None  # (lower face, control ring) mean |luma difference|


@dataclass
class Recording:
    """Everything the probe saw; ``summarise`` turns it into figures."""

    measured: int  # frames in the measured span (0 .. measured - 1)
    clip_size: tuple[int, int]
    sent: list[float] = field(default_factory=list)
    marker_sent: dict[int, float] = field(default_factory=dict)
    frames: list[ReceivedFrame] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)  # mono float32 per received packet
    audio_received: list[float] = field(default_factory=list)
    audio_arrived: list[float | None] = field(default_factory=list)
    audio_rtp: list[int | None] = field(default_factory=list)
    reports: dict[str, list] = field(default_factory=dict)  # kind -> PacketArrivals.reports
    session: str = ""
    codecs: dict[str, str] = field(default_factory=dict)
    stats: dict | None = None
    server_view: dict | None = None
    audio_prefetch: int | None = None  # packets aiortc's audio jitter buffer holds


async def _read_video(track, arrivals: PacketArrivals, clip: Clip, regions: FaceRegions,
                      recording: Recording) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            received = time.monotonic()
            luma = frame.to_ndarray(format="yuv420p")[: frame.height]
            stamp = read_stamp(luma)
            differences = None if stamp is None else regions.differences(luma, clip, stamp)
            recording.frames.append(ReceivedFrame(stamp, received, arrivals.of(frame.pts), arrivals.rtp(frame.pts),
                                                  differences))


async def _read_audio(track, arrivals: PacketArrivals, recording: Recording) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            received = time.monotonic()
            channels = len(frame.layout.channels)
            samples = frame.to_ndarray().reshape(-1, channels).mean(axis=1) / 32768
            recording.audio.append(samples.astype(np.float32))
            recording.audio_received.append(received)
            recording.audio_arrived.append(arrivals.of(frame.pts))
            recording.audio_rtp.append(arrivals.rtp(frame.pts))


def _jitter_prefetch(receiver) -> int | None:
    """aiortc's audio jitter buffer prefetch (packets held before the first is released), if readable."""
    buffer = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
    return getattr(buffer, "_prefetch", None)


# -- the server -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``run_stream.py serve`` in a subprocess on 127.0.0.1, loopback ICE only, one session."""

    def __init__(self, config: str, extra: list[str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [sys.executable, str(REPO / "run_stream.py"), "serve", "--config", config,
                         "--host", "127.0.0.1", "--port", str(self.port), "--ice-host", "127.0.0.1",
                         "--max-sessions", "1", *(extra or [])]
        self._log = tempfile.NamedTemporaryFile("w+", prefix="lipstream-serve-", suffix=".log")
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(self._command, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO)

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = SERVER_START_TIMEOUT) -> float:
        """Seconds until it answered GET /sessions; ProbeError if it exits or stays silent."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self._process.poll() is not None:
                raise ProbeError(f"the server exited with status {self._process.returncode}: {self.last_line()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(self.url + "/sessions", timeout=aiohttp.ClientTimeout(total=2)) as reply:
                    if reply.status == 200:
                        return time.monotonic() - started
            await asyncio.sleep(0.25)
        raise ProbeError(f"the server did not answer on {self.url} within {timeout:.0f} s: {self.last_line()}")

    def last_line(self) -> str:
        self._log.flush()
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    def stop(self) -> None:
        """SIGINT (aiohttp closes every peer), then SIGTERM, then SIGKILL."""
        process = self._process
        if process is not None and process.poll() is None:
            for send, wait in ((lambda: process.send_signal(signal.SIGINT), 15),
                               (process.terminate, 5), (process.kill, 5)):
                send()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(wait)
                    break
        self._log.close()


# -- the probe --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    video: str | None = None
    audio: str | None = None
    config: str = "tiny"
    seconds: float = 60.0
    size: tuple[int, int] = DEFAULT_SIZE
    url: str | None = None
    options: dict = field(default_factory=dict)  # the session options sent with the offer
    server_args: tuple[str, ...] = ()  # more `serve` arguments when the server is started here


async def _offer(http: aiohttp.ClientSession, url: str, pc: RTCPeerConnection, options: dict) -> dict:
    body = {"sdp": pc.localDescription.sdp, "type": "offer", "mode": "camera", "options": options}
    try:
        async with http.post(url + "/offer", json=body, timeout=aiohttp.ClientTimeout(total=30)) as reply:
            status, text = reply.status, await reply.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise ProbeError(f"no answer to POST {url}/offer: {exc or type(exc).__name__}") from None
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if status != 200 or not isinstance(answer, dict) or "sdp" not in answer:
        detail = answer.get("error", answer) if isinstance(answer, dict) else " ".join(text.split())[:200]
        raise ProbeError(f"the server refused the offer ({status}): {detail}")
    return answer


async def _sessions(http: aiohttp.ClientSession, url: str) -> dict | None:
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        async with http.get(url + "/sessions", timeout=aiohttp.ClientTimeout(total=5)) as reply:
            return await reply.json()
    return None


async def _until(condition, timeout: float, failed=lambda: None) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        failed()
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def probe(url: str, clip: Clip, regions: FaceRegions, speech: np.ndarray, seconds: float,
                options: dict, http: aiohttp.ClientSession, recording: Recording | None = None) -> Recording:
    """Connect to the server at ``url`` as a camera peer, send ``seconds`` of media, record what comes back.

    ``recording``: an empty one to fill (``Recording(round(seconds * FPS), clip.size)``), for a caller
    that reads it while the probe runs (bench/soak.py); default: a new one.
    """
    measured = round(seconds * FPS)
    if recording is None:
        recording = Recording(measured, clip.size)
    markers = marker_frames(measured)
    speech = speech.copy()
    insert_markers(speech, markers)
    clock = SendClock()
    camera = StampedCamera(clip, clock)
    microphone = MarkedMicrophone(speech, markers, clock, camera.send_delay)
    camera.sent, microphone.marker_sent = recording.sent, recording.marker_sent  # readable while it runs
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    readers: list[asyncio.Task] = []
    try:
        pc.addTrack(microphone)
        pc.addTrack(camera)
        channel = pc.createDataChannel(STATS_CHANNEL)
        channel.on("message", lambda message: setattr(recording, "stats", json.loads(message)))
        arrivals = {t.kind: PacketArrivals(t.receiver) for t in pc.getTransceivers()}
        recording.reports = {kind: a.reports for kind, a in arrivals.items()}
        prefetch = _jitter_prefetch(next(t.receiver for t in pc.getTransceivers() if t.kind == "audio"))
        recording.audio_prefetch = prefetch

        def on_track(track) -> None:
            reader = (_read_video(track, arrivals["video"], clip, regions, recording) if track.kind == "video"
                      else _read_audio(track, arrivals["audio"], recording))
            readers.append(asyncio.ensure_future(reader))
        pc.on("track", on_track)

        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate first
        answer = await _offer(http, url, pc, options)
        recording.session = answer.get("session", "")
        for media in sdp.SessionDescription.parse(answer["sdp"]).media:
            if media.rtp.codecs:
                recording.codecs[media.kind] = media.rtp.codecs[0].mimeType
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

        def broken() -> None:
            if pc.connectionState in ("failed", "closed"):
                raise ProbeError(f"the connection {pc.connectionState} after "
                                 f"{len(camera.sent) / FPS:.1f} s of media sent")
            if recording.frames and time.monotonic() - recording.frames[-1].received > STALL_TIMEOUT:
                raise ProbeError(f"no video came back for {STALL_TIMEOUT:.0f} s, after "
                                 f"{len(recording.frames)} frames")
        if not await _until(lambda: pc.connectionState == "connected", CONNECT_TIMEOUT, broken):
            raise ProbeError(f"no connection to the server within {CONNECT_TIMEOUT:.0f} s "
                             f"(state {pc.connectionState}; ICE restricted to loopback?)")
        if not await _until(lambda: recording.frames, FIRST_FRAME_TIMEOUT, broken):
            raise ProbeError(f"no video came back within {FIRST_FRAME_TIMEOUT:.0f} s of connecting "
                             f"({len(camera.sent)} frames sent)")
        await _until(lambda: len(camera.sent) >= measured, seconds + 30, broken)
        last_sent = len(camera.sent)
        await _until(lambda: any(f.stamp is not None and measured - 1 <= f.stamp <= last_sent
                                 for f in recording.frames[-10:]), DRAIN_TIMEOUT, broken)
        recording.server_view = await _sessions(http, url)
    finally:
        camera.stop()
        microphone.stop()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await pc.close()
    recording.sent = camera.sent
    recording.marker_sent = microphone.marker_sent
    recording.audio_prefetch = prefetch
    return recording


def _install_loopback_ice(url: str):
    """Offer only 127.0.0.1 candidates when the server is on this machine (aioice skips loopback)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "localhost"):
        return lambda: None
    return IceSettings(hosts=("127.0.0.1",)).install(asyncio.get_running_loop())


async def _measure(settings: Settings, clip: Clip, speech: np.ndarray) -> tuple[Recording, float | None]:
    server = None if settings.url else ServerProcess(settings.config, list(settings.server_args))
    url = (settings.url or server.url).rstrip("/")
    uninstall = _install_loopback_ice(url)
    try:
        async with aiohttp.ClientSession() as http:
            startup = None
            if server is not None:
                server.start()
                # The face regions are found while the server builds its models.
                regions_task = asyncio.ensure_future(asyncio.to_thread(FaceRegions.of, clip))
                try:
                    startup = await server.wait_ready(http)
                finally:
                    regions = await regions_task
            else:
                if await _sessions(http, url) is None:
                    raise ProbeError(f"no lipstream server answering GET {url}/sessions")
                regions = await asyncio.to_thread(FaceRegions.of, clip)
            try:
                recording = await probe(url, clip, regions, speech, settings.seconds, settings.options, http)
            except ProbeError as exc:
                if server is None:
                    raise
                raise ProbeError(f"{exc} (server log: {server.last_line()})") from None
            return recording, startup
    finally:
        uninstall()
        if server is not None:
            server.stop()  # blocking, so that an interrupted run still ends it


def _machine() -> dict:
    """What the figures were measured on: this machine's CPU, and how busy it was (1-minute load)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "load_1min": os.getloadavg()[0], "python": platform.python_version()}


def measure(settings: Settings) -> dict:
    """Run the bench: start (or reach) the server, probe it, and summarise. Raises ProbeError."""
    import aiortc

    longest = (1 << INDEX_BITS) // FPS - DRAIN_TIMEOUT - 2
    if not 2 <= settings.seconds <= longest:
        raise ProbeError(f"--seconds: from 2 to {longest:.0f} (the stamp numbers 65536 frames)")
    machine = _machine()
    video = Path(settings.video) if settings.video else default_clip(settings.size)
    audio = Path(settings.audio) if settings.audio else MEDIA / "speech_16k.wav"
    for path in (video, audio):
        if not path.exists():
            raise ProbeError(f"{path}: no such file")
    total = settings.seconds + DRAIN_TIMEOUT + 2
    clip = Clip.load(video, round(total * FPS))
    speech = speech_track(audio, total)
    recording, startup = asyncio.run(_measure(settings, clip, speech))
    result = summarise(recording)
    result.update({
        "config": settings.config if settings.url is None else None,
        "url": settings.url,
        "size": list(clip.size), "video": str(video), "audio": str(audio),
        "seconds": settings.seconds, "options": settings.options,
        "server_startup_s": None if startup is None else round(startup, 1),
        "machine": {**machine, "load_1min_after": os.getloadavg()[0], "aiortc": aiortc.__version__,
                    "server": "this machine, a subprocess" if settings.url is None else settings.url},
    })
    return result


# -- figures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeardMarker:
    """A chirp found in the received audio."""

    arrived: float  # when its first sample arrived: its packet's arrival + its offset into the packet
    received: float | None  # the same from aiortc's recv(), less the jitter buffer's prefetch
    score: float
    presented: float | None  # the sender's wall time of its first sample, by the audio's reports


def offset_presented_ms(video_reports: list[tuple[float, SenderReport]], shown: tuple[float, float, int | None],
                        heard: HeardMarker) -> float | None:
    """A marker's A/V offset as a receiver's lip-sync presents it (ms, audio late > 0): the chirp's
    and its picture's (``shown``: first_showings' entry) sender times, by the sender's reports."""
    wall = presented(video_reports, shown[2], shown[0], VIDEO_CLOCK)
    return None if heard.presented is None or wall is None else 1000 * (heard.presented - wall)


def markers_heard(recording: Recording) -> list[HeardMarker]:
    """Every chirp in the received audio whose every sample came back, in order. A packet is
    played from its arrival.

    The packets are laid out by their RTP times: over a lossy link a chirp that lost a packet,
    spliced to what came after it, would be found tens of ms early. Such a chirp is left out.
    """
    count = min(len(recording.audio), len(recording.audio_rtp))  # a recording read while it is made
    packets = [k for k in range(count) if recording.audio_rtp[k] is not None]
    if not packets:
        return []
    base = recording.audio_rtp[packets[0]]
    offsets = {k: (recording.audio_rtp[k] - base) % (1 << 32) for k in packets}  # wrapped or not
    end = max(offsets[k] + len(recording.audio[k]) for k in packets)
    audio = np.zeros(end, np.float32)
    received = np.zeros(end, bool)
    for k in packets:
        audio[offsets[k] : offsets[k] + len(recording.audio[k])] = recording.audio[k]
        received[offsets[k] : offsets[k] + len(recording.audio[k])] = True
    starts = np.array([offsets[k] for k in packets])
    sizes = [len(recording.audio[k]) for k in packets]
    prefetch = recording.audio_prefetch
    held = prefetch * float(np.median(sizes)) / AUDIO_RATE if prefetch else None
    length = round(CHIRP_SECONDS * AUDIO_RATE)
    heard = []
    for start, score in find_markers(audio):
        if not received[start : start + length].all():
            continue
        packet = packets[int(np.searchsorted(starts, start, side="right") - 1)]
        into = (start - offsets[packet]) / AUDIO_RATE
        at = recording.audio_received[packet]
        arrived = recording.audio_arrived[packet]
        if arrived is None:
            arrived = at - (held or 0.0)
        wall = presented(recording.reports.get("audio", []), base + start, arrived, AUDIO_RATE)
        heard.append(HeardMarker(arrived + into, None if held is None else at - held + into, score, wall))
    return heard


def match_markers(markers: list[int], heard: list[HeardMarker],
                  video: dict[int, tuple[float, float, int | None]]) -> dict[int, HeardMarker]:
    """Marker frame -> the chirp heard nearest to the first arrival of a frame with that stamp.

    ``video``: stamp -> (arrival, recv() time, RTP time) of the first frame back with it. A chirp farther than
    half the marker spacing belongs to another marker; a marker whose frame never came back (the
    server skipped that picture) is left out.
    """
    matched = {}
    for frame in markers:
        if frame in video and heard:
            nearest = min(heard, key=lambda h: abs(h.arrived - video[frame][0]))
            if abs(nearest.arrived - video[frame][0]) <= 0.5:
                matched[frame] = nearest
    return matched


def first_showings(frames: list[ReceivedFrame], arrived: list[float]) -> dict[int, tuple[float, float, int | None]]:
    """Stamp -> (arrival, recv() time, RTP time) of the frame that first showed that picture.

    Only where that frame is known to have come back: the frame before it (by RTP time, at most
    1.5 frame intervals earlier) came back too and shows another picture. Over a lossy link the
    first showing may be lost and a repeat of the picture come back frames later, which would time
    the picture late. Without RTP times (a recording made without them) the first arrival is taken.
    """
    timed = sorted((f.rtp, f.stamp, at, f.received) for f, at in zip(frames, arrived) if f.rtp is not None)
    if not timed:
        video: dict[int, tuple[float, float, int | None]] = {}
        for f, at in zip(frames, arrived):
            video.setdefault(f.stamp, (at, f.received, f.rtp))
        return video
    first: dict[int, tuple[float, float, int | None]] = {}
    seen: set[int] = set()
    gap = 1.5 * VIDEO_CLOCK / FPS
    for (rtp, stamp, at, received), before in zip(timed, [None] + timed[:-1]):
        if stamp in seen:
            continue
        seen.add(stamp)
        if before is not None and rtp - before[0] <= gap and before[1] != stamp:
            first[stamp] = (at, received, rtp)
    return first


def _percentiles(values_ms: list[float]) -> dict[str, float | None]:
    if not values_ms:
        return {"p50": None, "p95": None, "max": None}
    values = np.asarray(values_ms)
    return {"p50": round(float(np.percentile(values, 50)), 1),
            "p95": round(float(np.percentile(values, 95)), 1), "max": round(float(values.max()), 1)}


def _offset(values_ms: list[float]) -> dict[str, float | None]:
    if not values_ms:
        return {"p50": None, "max_abs": None}
    return {"p50": round(float(np.median(values_ms)), 1),
            "max_abs": round(float(np.max(np.abs(values_ms))), 1)}


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 1) if values else None


def summarise(recording: Recording) -> dict:
    """The figures, from one recording (see the module docstring for what each one means)."""
    sent = recording.sent
    measured = min(recording.measured, len(sent))
    frames = [f for f in recording.frames if f.stamp is not None and f.stamp < measured]
    rejected = sum(f.stamp is None for f in recording.frames)
    if not frames:
        raise ProbeError(f"no readable frame came back ({len(recording.frames)} received, {rejected} "
                         f"with an unreadable stamp)")
    arrived = [f.arrived if f.arrived is not None else f.received for f in frames]
    video_hold = [1000 * (f.received - f.arrived) for f in frames if f.arrived is not None]
    audio_hold = [1000 * (r - a) for r, a in zip(recording.audio_received, recording.audio_arrived)
                  if a is not None]
    judged = [f.differences for f in frames if f.differences is not None]
    generated = sum(is_generated(*d) for d in judged)

    video = first_showings(frames, arrived)
    markers = marker_frames(measured)
    heard = markers_heard(recording)
    matched = match_markers(markers, heard, video)
    offsets = [1000 * (h.arrived - video[m][0]) for m, h in matched.items()]
    offsets_recv = [1000 * (h.received - video[m][1]) for m, h in matched.items() if h.received is not None]
    offsets_presented = {m: o for m, h in matched.items()
                         if (o := offset_presented_ms(recording.reports.get("video", []), video[m], h)) is not None}
    audio_latency = [1000 * (h.arrived - recording.marker_sent[m]) for m, h in matched.items()
                     if m in recording.marker_sent]

    steps = np.diff([f.stamp for f in frames])
    return {
        "latency_ms": _percentiles([1000 * (at - sent[f.stamp]) for f, at in zip(frames, arrived)]),
        "ttff_ms": round(1000 * (min(arrived) - sent[0]), 1),
        "av_offset_ms": _offset(offsets),
        "av_offsets_ms": {str(m): round(o, 1) for m, o in zip(matched, offsets)},  # per marker's frame
        "model_fraction": round(generated / len(judged), 3) if judged else None,
        "frames_sent": measured,
        "frames_received": len(frames),
        "frames_distinct": len({f.stamp for f in frames}),
        "frames_judged": len(judged),
        "stamps_rejected": rejected,
        "stamp_steps": {"repeat": int(np.sum(steps == 0)), "next": int(np.sum(steps == 1)),
                        "skip": int(np.sum(steps > 1)), "backwards": int(np.sum(steps < 0))},
        "markers": {"sent": len(markers), "heard": len(heard), "matched": len(matched),
                    "score_min": round(min(h.score for h in matched.values()), 3) if matched else None},
        "audio_latency_ms": _percentiles(audio_latency),
        "latency_at_recv_ms": _percentiles([1000 * (f.received - sent[f.stamp]) for f in frames]),
        "av_offset_at_recv_ms": _offset(offsets_recv),
        "av_offset_presented_ms": _offset(list(offsets_presented.values())),
        "av_offsets_presented_ms": {str(m): round(o, 1) for m, o in offsets_presented.items()},
        "receiver_hold_ms": {"video_p50": _median(video_hold), "audio_p50": _median(audio_hold),
                             "audio_prefetch_packets": recording.audio_prefetch},
        "timing": "at packet arrival on the probe: aiortc's receiver holds (receiver_hold_ms) taken out; "
                  "*_at_recv_ms: at aiortc's recv(), audio less prefetch x 20 ms, video hold left in",
        "generated_rule": f"lower-face mean |dY| > {GENERATED_RATIO:g} x control ring + {GENERATED_MARGIN:g}",
        "codecs": recording.codecs,
        "session": recording.session,
        "server": _server_figures(recording),
    }


def _server_figures(recording: Recording) -> dict:
    """The server's own view of the session: its last stats message and its /sessions entry."""
    view = recording.server_view or {}
    entry = (view.get("sessions") or {}).get(recording.session)
    if entry is None:
        entry = next((s for s in view.get("recent", []) if s.get("session") == recording.session), None)
    stats = recording.stats or {}
    source = entry or stats
    keys = ("latency_ms", "ttff_ms", "fps", "frames_out", "frames_generated", "dropped_frames",
            "dropped_ticks", "late_frames", "clock_slips", "silent_frames", "av_offset_ms",
            "stage_done_ms_p50", "stages_ms_per_frame")
    figures = {key: source[key] for key in keys if key in source}
    figures["from"] = "GET /sessions" if entry is not None else ("stats channel" if stats else None)
    figures["stats_channel_latency_ms"] = stats.get("latency_ms")
    if figures.get("frames_out"):
        figures["model_fraction"] = round(figures.get("frames_generated", 0) / figures["frames_out"], 3)
    return figures


def print_table(result: dict) -> None:
    server, machine = result["server"], result["machine"]
    print(f"glass to glass: {result['config'] or result['url']}, {result['size'][0]}x{result['size'][1]}, "
          f"{result['seconds']:g} s, {' + '.join(result['codecs'].values())}, "
          f"{machine['cpu']} ({machine['cores']} cores)")
    print(f"  frames sent {result['frames_sent']}, received {result['frames_received']} "
          f"({result['frames_distinct']} distinct, {result['stamps_rejected']} unreadable stamps)")
    rows = [("frame latency ms", result["latency_ms"]),
            ("  at recv()", result["latency_at_recv_ms"]),
            ("audio latency ms", result["audio_latency_ms"]),
            ("server's latency ms", server.get("latency_ms") or {})]
    print(f"  {'':<22}{'p50':>8}{'p95':>8}{'max':>8}")
    for name, row in rows:
        cells = "".join(f"{'-' if row.get(k) is None else row[k]:>8}" for k in ("p50", "p95", "max"))
        print(f"  {name:<22}{cells}")
    offset, at_recv, markers = result["av_offset_ms"], result["av_offset_at_recv_ms"], result["markers"]
    print(f"  time to first frame {result['ttff_ms']} ms (server's: {server.get('ttff_ms')} ms)")
    print(f"  A/V offset ms (audio late > 0) p50 {offset['p50']}, max |.| {offset['max_abs']}; at recv() "
          f"p50 {at_recv['p50']}, max |.| {at_recv['max_abs']} ({markers['matched']}/{markers['sent']} "
          f"markers matched, {markers['heard']} heard)")
    shown = result["av_offset_presented_ms"]
    print(f"  A/V offset ms as presented by the sender's reports (a browser's lip-sync) p50 {shown['p50']}, "
          f"max |.| {shown['max_abs']}")
    print(f"  model ran on {_percent(result['model_fraction'])} of frames "
          f"(server's count: {_percent(server.get('model_fraction'))}); rule: {result['generated_rule']}")
    hold = result["receiver_hold_ms"]
    print(f"  timed at packet arrival: aiortc's receiver holds video {hold['video_p50']} ms and audio "
          f"{hold['audio_p50']} ms (prefetch {hold['audio_prefetch_packets']} packets) more")


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f} %"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.glass_to_glass ARGS`` = ``python run_stream.py bench --webrtc ARGS``."""
    import run_stream

    return run_stream.main(["bench", "--webrtc", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
