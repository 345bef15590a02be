"""The WebRTC side of a live session: aiortc in, a ``LiveSession`` in the middle, aiortc out.

    browser mic/camera -> Peer._feed -> SessionFeed (transport/session_feed.py) -> session.push_video / push_audio
    session.output() -> session.broadcast -> ViewerTracks (one per viewer) -> OutputVideoTrack
                                                                         + OutputAudioTrack (20 ms)
    session.describe() -> the "stats" data channel, every 0.5 s

What comes in goes to the session as the sender timed it, not as it arrived: pictures on a schedule
made from their RTP timestamps, and audio where the pictures of the same moment were shown, the two
tracks related by the sender's reports (transport/sender_clock.py), as RTMP input is.

Both outgoing tracks are fed by ONE pull of ``session.output()`` per frame, so a frame and its
audio leave together, stamped with the same moment: when the frame was due on the session's output
clock. The RTP timestamps therefore follow the wall clock: when the session stalls and re-anchors
its clock, the receiver sees a gap in the timestamps of both tracks at the same frame, not packets
arriving late, which would make its jitter buffers (audio first) grow and stay large; a frame the
session skips to ease its delay back down takes its audio with it and leaves no gap. Audio packets
wait as long as a picture takes to be encoded (``SendDelay``), so that both reach the browser
together and aiortc's sender reports, by which the browser lines them up, map both to the same
moment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import json
import logging
import random
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import aioice.ice
import av
import numpy as np
from aiortc import (RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection,
                    RTCSessionDescription, sdp)
from aiortc.codecs.opus import OpusEncoder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from transport.prompt_jitter import make_prompt
from transport.sender_clock import SenderClock
from transport.session_feed import Audio, Picture, SessionFeed

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK)
AUDIO_RATE = 48_000
AUDIO_TIME_BASE = Fraction(1, AUDIO_RATE)
AUDIO_CHUNK = AUDIO_RATE // 50  # 20 ms, what Opus packetises
# Audio stays sample-continuous unless a frame is due more than this past where the audio so far
# runs to: the session's clock slipped, and the gap goes into the audio's timestamps as it does into
# the pictures'. Anything less is the rounding of the frames' times.
AUDIO_GAP = AUDIO_CHUNK // 2
STATS_PERIOD = 0.5
# A peer that has not connected by then is gone (it closed before ICE completed, or cannot reach us).
CONNECT_TIMEOUT = 20.0
# A peer whose media stopped this long ago is gone (crashed, or cut off without a goodbye): ICE
# consent checks would take 30 s to say so. Browsers send audio all along, silence included. Longer
# than a short outage (a Wi-Fi handover; tests/test_network_faults.py cuts the link for 3 s), which
# the session rides out: at 3 s a 3 s outage ended it.
INPUT_TIMEOUT = 4.0
# A peer that drives its session and has sent no media this long after its offer was answered is
# let go, connected or not: a client that connects and never sends would otherwise hold a session
# place forever. Long enough for ICE, DTLS and a browser's first packets on a slow link.
FIRST_MEDIA_TIMEOUT = 10.0
# What each driving role must send (the offer's directions say so before anything is started).
SENDS = {"camera": ("audio", "video"), "microphone": ("audio",)}
PEER = "peer"  # the one source of a peer's session feed
# Output kept for a sender that is slower than the session: a video frame is worth showing only
# while it is fresh; audio is never dropped short of a second, a gap is audible.
VIDEO_BACKLOG = 2
AUDIO_BACKLOG = 25
# A video frame's time on its way out (below) is the median of this many frames', up to SEND_DELAY_MAX.
SEND_DELAY_FRAMES = 25
SEND_DELAY_MAX = 0.2
# libopus's encoder looks 6.5 ms ahead at 48 kHz: the sound decoded from a packet is that much behind
# its timestamp, on the way in (the sender's encoder) and on the way out (ours). Both are taken out.
OPUS_LOOKAHEAD = 0.0065


@dataclass(frozen=True)
class IceSettings:
    """Where ICE may gather candidates, and through which servers.

    ``hosts``: the local IP addresses to offer as host candidates (empty: every address aioice
    finds, which excludes loopback). ``stun``/``turn``: server URLs; aiortc uses the first STUN
    and the first TURN URL only. ``udp_ports``: an inclusive range for the host candidates' UDP
    sockets (aioice has no such option, so the event loop's datagram binding is wrapped).
    Unlike aiortc's default, no public STUN server is used unless one is given.
    """

    hosts: tuple[str, ...] = ()
    stun: tuple[str, ...] = ()
    turn: tuple[str, ...] = ()
    turn_username: str | None = None
    turn_password: str | None = None
    udp_ports: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for host in self.hosts:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"ICE host {host!r} is not an IP address") from None
            if address.is_unspecified:
                raise ValueError(f"ICE host {host!r}: name a concrete interface address")
        if self.udp_ports is not None:
            low, high = self.udp_ports
            if not 1024 <= low <= high <= 65535:
                raise ValueError(f"UDP port range {low}-{high}: want 1024 <= A <= B <= 65535")
        for url in self.stun:
            if not url.startswith(("stun:", "stuns:")):
                raise ValueError(f"STUN server {url!r}: expected stun:HOST[:PORT]")
        for url in self.turn:
            if not url.startswith(("turn:", "turns:")):
                raise ValueError(f"TURN server {url!r}: expected turn:HOST[:PORT][?transport=udp|tcp]")

    def configuration(self) -> RTCConfiguration:
        # An explicit list, even empty: with None aiortc falls back to Google's public STUN server.
        servers = [RTCIceServer(urls=url) for url in self.stun]
        servers += [RTCIceServer(urls=url, username=self.turn_username, credential=self.turn_password)
                    for url in self.turn]
        return RTCConfiguration(iceServers=servers)

    def install(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Apply ``hosts`` and ``udp_ports`` to this process's aioice and to ``loop``; returns the undo.

        aioice reads its host addresses from a module-level function, so this setting is per
        process: one server per process.
        """
        undo: list[Callable[[], None]] = []
        if self.hosts:
            original_hosts = aioice.ice.get_host_addresses
            aioice.ice.get_host_addresses = _fixed_host_addresses(self.hosts)
            undo.append(lambda: setattr(aioice.ice, "get_host_addresses", original_hosts))
        if self.udp_ports is not None:
            original_bind = loop.create_datagram_endpoint
            loop.create_datagram_endpoint = _bind_in_range(original_bind, self.udp_ports)
            undo.append(lambda: delattr(loop, "create_datagram_endpoint"))

        def uninstall() -> None:
            for step in reversed(undo):
                step()
        return uninstall


def parse_port_range(text: str) -> tuple[int, int]:
    """"50000-50199" -> (50000, 50199)."""
    low, dash, high = text.partition("-")
    if not (dash and low.strip().isdigit() and high.strip().isdigit()):
        raise ValueError(f"UDP port range {text!r}: expected A-B, e.g. 50000-50199")
    return int(low), int(high)


def _fixed_host_addresses(hosts: tuple[str, ...]):
    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [h for h in hosts if (use_ipv4 if ipaddress.ip_address(h).version == 4 else use_ipv6)]
    return get_host_addresses


def _bind_in_range(create_datagram_endpoint, ports: tuple[int, int]):
    """Bind what asked for an ephemeral port (aioice's host candidates) inside ``ports`` instead."""
    low, high = ports

    async def bind(protocol_factory, local_addr=None, **kwargs):
        if local_addr is None or local_addr[1] != 0:
            return await create_datagram_endpoint(protocol_factory, local_addr=local_addr, **kwargs)
        # A random start spreads concurrent sessions instead of racing for the same first port.
        start = random.randint(low, high)
        for port in (*range(start, high + 1), *range(low, start)):
            try:
                return await create_datagram_endpoint(protocol_factory, local_addr=(local_addr[0], port),
                                                      **kwargs)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, f"no free UDP port in {low}-{high} on {local_addr[0]}")

    return bind


class SendDelay:
    """How long after its due time a video frame is on the wire: its encode, and any wait for one.

    aiortc's sender takes a frame from ``recv()``, encodes it, sends its packets and only then
    asks for the next one, so a frame is out by the next call. Audio is encoded in a fraction of a
    millisecond: sent on its due time, it would reach the other side that much ahead of its
    picture (10-30 ms for VP8 on a loaded CPU), and aiortc's sender reports, which map RTP time
    to the moment a packet was sent, would tell a browser's lip-sync the same. Holding each audio
    packet back by this delay makes both leave together.
    """

    def __init__(self, frames: int = SEND_DELAY_FRAMES) -> None:
        self._delays: collections.deque[float] = collections.deque(maxlen=frames)
        self._due: float | None = None

    def taken(self, due: float) -> None:
        """``recv()`` is handing over the frame due at ``due`` (``time.monotonic()``)."""
        self._due = due

    def asked(self) -> None:
        """``recv()`` was called again: the frame taken before is sent."""
        if self._due is not None:
            self._delays.append(min(max(time.monotonic() - self._due, 0.0), SEND_DELAY_MAX))
            self._due = None

    @property
    def seconds(self) -> float:
        return float(np.median(self._delays)) if self._delays else 0.0


class ViewerTracks:
    """One viewer's two outgoing tracks, fed by the session's one output pump (``Broadcast``).

    The pump starts on the first ``recv()`` of either track, so the first frames are not spent
    before the viewer can take them. ``on_end`` runs once the session's output has ended.
    """

    def __init__(self, session, on_end: Callable[[], None]) -> None:
        self._broadcast = session.broadcast
        self._on_end = on_end
        self.video = OutputVideoTrack(self)
        self.audio = OutputAudioTrack(self)
        self._subscribed = False

    @property
    def origin(self) -> float | None:
        return self._broadcast.origin

    def start(self) -> None:
        if not self._subscribed:
            self._subscribed = True
            self._broadcast.subscribe(self)
            self._broadcast.start()

    def offer(self, at: float, out) -> None:
        self.video.offer(at, out.frame.image)
        self.audio.offer(at, out.audio)

    def end(self) -> None:
        self.video.stop()
        self.audio.stop()
        self._on_end()

    async def close(self) -> None:
        self._broadcast.unsubscribe(self)
        self.video.stop()
        self.audio.stop()


class _QueueTrack(MediaStreamTrack):
    """An outgoing track whose ``recv()`` waits for what ``ViewerTracks`` offers it."""

    backlog = 1

    def __init__(self, output: ViewerTracks) -> None:
        super().__init__()
        self._output = output
        self._queue: asyncio.Queue = asyncio.Queue()

    def offer(self, at: float, payload: np.ndarray) -> None:
        """``payload`` is due ``at`` seconds after the session's first frame was (stream/broadcast.py)."""
        if self.readyState != "live":
            return
        while self._queue.qsize() >= self.backlog:
            self._queue.get_nowait()
        self._queue.put_nowait((at, payload))

    async def _next(self) -> tuple[float, np.ndarray]:
        if self.readyState != "live":
            raise MediaStreamError
        self._output.start()
        item = await self._queue.get()
        if item is None:
            raise MediaStreamError
        return item

    def stop(self) -> None:
        if self.readyState == "live":
            self._queue.put_nowait(None)  # wake a pending recv()
        super().stop()


class OutputVideoTrack(_QueueTrack):
    kind = "video"
    backlog = VIDEO_BACKLOG

    def __init__(self, output: ViewerTracks) -> None:
        super().__init__(output)
        self._pts = -1
        self.send_delay = SendDelay()

    async def recv(self) -> av.VideoFrame:
        self.send_delay.asked()
        at, image = await self._next()
        self.send_delay.taken(self._output.origin + at)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        self._pts = max(round(at * VIDEO_CLOCK), self._pts + 1)  # the encoder wants them increasing
        frame.pts = self._pts
        frame.time_base = VIDEO_TIME_BASE
        return frame


class OutputAudioTrack(_QueueTrack):
    """Re-chunks each frame's 1/fps of 48 kHz audio into the 20 ms frames Opus sends, on the same
    timeline as the pictures: the frames' times on the session's output clock."""

    kind = "audio"
    backlog = AUDIO_BACKLOG

    def __init__(self, output: ViewerTracks) -> None:
        super().__init__(output)
        self._pending = np.zeros((2, 0), np.float32)  # cut into chunks from self._pts on
        self._pts: int | None = None
        self._waiting: tuple[int, np.ndarray] | None = None  # a frame's (start, audio) behind a gap
        self.codec_delay = 0.0  # seconds its codec delays the sound (OPUS_LOOKAHEAD): sent that much early
        # Set once Opus is settled on: packets are then encoded here (below), not by aiortc's sender.
        self.encoder: OpusEncoder | None = None
        self._encoded: collections.deque[av.Packet] = collections.deque()

    async def recv(self) -> av.AudioFrame | av.Packet:
        """The next 20 ms: Opus packets encoded here, inline, where Opus was settled on.

        aiortc's sender encodes each frame on the loop's default executor. That is a round trip of
        about 20 ms per 20 ms packet on a busy machine: the soak's server (two sessions on two
        cores) sent its audio a second behind its own timeline, and dropped some, while the
        pictures kept up. Encoding a packet takes a fraction of a millisecond; packets already
        encoded go through the sender without the executor.
        """
        if self.encoder is None:
            return await self.next_frame()
        while not self._encoded:
            payloads, timestamp = self.encoder.encode(await self.next_frame())
            for k, payload in enumerate(payloads):  # none while the encoder fills its look-ahead
                packet = av.Packet(payload)
                packet.pts, packet.time_base = timestamp + k * AUDIO_CHUNK, AUDIO_TIME_BASE
                self._encoded.append(packet)
        return self._encoded.popleft()

    async def next_frame(self) -> av.AudioFrame:
        """The next 20 ms frame, stamped on the pictures' timeline, due as late as they leave."""
        while self._pending.shape[1] < AUDIO_CHUNK:
            if self._waiting is None:
                at, samples = await self._next()
                self._waiting = (round(at * AUDIO_RATE), samples)
            start, samples = self._waiting
            if self._pts is None:
                self._pts = start
            gap = start - (self._pts + self._pending.shape[1])
            if gap > AUDIO_GAP and self._pending.shape[1]:
                # Silence to the end of the chunk under way (as much of it as the gap is); the rest
                # of the gap is left in the timestamps once that chunk is out.
                silence = min(gap, AUDIO_CHUNK - self._pending.shape[1])
                self._pending = np.concatenate([self._pending, np.zeros((2, silence), np.float32)], axis=1)
                continue
            if gap > AUDIO_GAP:
                self._pts += gap
            self._pending = np.concatenate([self._pending, samples], axis=1)
            self._waiting = None
        # A frame brings two chunks at once: send the second on its own time, not in a burst, and
        # as late as the pictures of that time go out (SendDelay).
        due = (self._output.origin + self._pts / AUDIO_RATE + self._output.video.send_delay.seconds
               - self.codec_delay)
        await asyncio.sleep(due - time.monotonic())
        chunk, self._pending = self._pending[:, :AUDIO_CHUNK], self._pending[:, AUDIO_CHUNK:]
        # aiortc's Opus encoder takes interleaved 16-bit stereo only.
        interleaved = (np.clip(chunk.T, -1.0, 1.0) * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout="stereo")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._pts
        frame.time_base = AUDIO_TIME_BASE
        self._pts += AUDIO_CHUNK
        return frame


class Peer:
    """One remote peer bound to one live session, torn down as soon as either side goes away.

    Roles: ``camera`` (its camera and microphone drive the session), ``microphone`` (its
    microphone drives an avatar), both owning their session (it closes with the peer); ``viewer``
    (it only watches a session that others drive, which outlives it).

    The peer is gone when the connection fails or closes (a closed tab sends a DTLS close), when
    one of its tracks ends, when its "stats" data channel closes, when it has not connected
    within CONNECT_TIMEOUT, or when the session's output ends. A peer that drives its session must
    offer to send what its role needs (SENDS) and is also gone when no media has come
    FIRST_MEDIA_TIMEOUT after the answer, or none for INPUT_TIMEOUT since the last: a session
    place is never held by a peer that does not feed it. A viewer holds no place; it lives with
    its connection.
    """

    ROLES = ("camera", "microphone", "viewer")

    def __init__(self, session, ice: IceSettings, *, role: str,
                 on_closed: Callable[["Peer"], None] | None = None) -> None:
        if role not in self.ROLES:
            raise ValueError(f"unknown peer role {role!r}")
        self.session = session
        self.role = role
        self.pc = RTCPeerConnection(ice.configuration())
        self.output = ViewerTracks(session, on_end=self.close_soon)
        # What a driving peer sends goes in on its timestamps, lined up by its reports (SenderClock).
        self._times = SenderClock()
        self._input = SessionFeed(session, audio_from=PEER, fps=session.fps) if role != "viewer" else None
        self._on_closed = on_closed
        self._tasks: set[asyncio.Task] = set()
        self._closing: asyncio.Task | None = None
        self._last_input: float | None = None
        self._answered_at: float | None = None
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Accept the offer; raises ValueError (for a 400) when it cannot be answered."""
        try:
            sections = sdp.SessionDescription.parse(offer.sdp).media
            for media in sections:
                # aiortc would accept this and fail the handshake later, leaving the peer waiting.
                if media.dtls is None or not media.dtls.fingerprints:
                    raise ValueError(f"the {media.kind} section has no DTLS fingerprint or setup role")
            await self.pc.setRemoteDescription(offer)
        except Exception as exc:  # aiortc raises ValueError, InvalidAccessError, InvalidStateError...
            raise ValueError(f"cannot use this offer: {exc}") from None
        for transceiver in self.pc.getTransceivers():
            make_prompt(transceiver.receiver)  # what comes in goes on at once (transport/prompt_jitter.py)
            self._times.watch(transceiver.receiver, transceiver.kind)
        kinds = {t.kind for t in self.pc.getTransceivers()}
        if "video" not in kinds:
            raise ValueError("the offer has no video section: add a video transceiver to receive the face")
        sent = {media.kind for media in sections if media.direction in ("sendrecv", "sendonly")}
        missing = [kind for kind in SENDS.get(self.role, ()) if kind not in sent]
        if missing:
            raise ValueError(f"a {self.role} peer must send {' and '.join(missing)}: this offer only receives "
                             "it (recvonly or inactive); use mode viewer to watch a session")
        self.pc.addTrack(self.output.video)
        if "audio" in kinds:
            self.pc.addTrack(self.output.audio)
        if self.role != "viewer":
            await self.session.start()
            self.session.broadcast.subscribe(self._input)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        if _audio_codec(self.pc.localDescription.sdp) == "audio/opus":
            self._times.codec_delay = self.output.audio.codec_delay = OPUS_LOOKAHEAD
            self.output.audio.encoder = OpusEncoder()
        self._spawn(self._expire_unless_connected())
        if self.role != "viewer":
            self._answered_at = time.monotonic()
            self._spawn(self._expire_without_media())
        return self.pc.localDescription

    async def _expire_unless_connected(self) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT)
        if self.pc.connectionState != "connected":
            log.info("peer did not connect within %.0f s", CONNECT_TIMEOUT)
            self.close_soon()

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.close_soon()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if self.role == "viewer":  # a viewer that sends anyway: drained, never used
            self._spawn(_drain(track))
            return
        self._spawn(self._feed(track, use_video=track.kind == "video" and self.role == "camera"))

    async def _expire_without_media(self) -> None:
        while True:
            if self._last_input is None:
                left = self._answered_at + FIRST_MEDIA_TIMEOUT - time.monotonic()
            else:
                left = self._last_input + INPUT_TIMEOUT - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(0.25, left))
        if self._last_input is None:
            log.info("no media from the peer %.0f s after its answer", FIRST_MEDIA_TIMEOUT)
        else:
            log.info("no media from the peer for %.0f s", INPUT_TIMEOUT)
        self.close_soon()

    async def _feed(self, track: MediaStreamTrack, use_video: bool) -> None:
        """Hand an incoming track to the session feed until it ends.

        A track nobody reads queues every decoded frame inside aiortc forever, so an unused one (the
        camera in avatar mode) is still drained.
        """
        resampler = (av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_RATE)
                     if track.kind == "audio" else None)
        try:
            while True:
                frame = await track.recv()  # MediaStreamError once the track ends
                arrived = time.monotonic()
                self._last_input = arrived
                if resampler is not None:
                    ts = self._times.audio_ts(frame, arrived)
                    parts = [planar.to_ndarray() for planar in resampler.resample(frame)]
                    if parts:
                        self._input.take(PEER, Audio(np.concatenate(parts, axis=1), ts, arrived))
                elif use_video:
                    ts = self._times.video_ts(frame, arrived)
                    self._input.take(PEER, Picture(frame.to_ndarray(format="rgb24"), ts, arrived))
        except MediaStreamError:
            log.info("incoming %s track ended", track.kind)
        except Exception:
            log.exception("incoming %s track failed", track.kind)
        self.close_soon()

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label == "stats":
            channel.on("close", self.close_soon)
            self._spawn(self._send_stats(channel))

    async def _send_stats(self, channel: RTCDataChannel) -> None:
        while True:
            if channel.readyState == "open":
                channel.send(json.dumps(self.session.describe()))
            await asyncio.sleep(STATS_PERIOD)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._teardown())

    async def close(self) -> None:
        """Stop the tracks, the peer connection and the session; idempotent."""
        self.close_soon()
        await asyncio.shield(self._closing)

    async def _teardown(self) -> None:
        try:
            for task in list(self._tasks):
                task.cancel()
            if self._input is not None:
                self.session.broadcast.unsubscribe(self._input)
                self._input.close()
            await self.output.close()
            await self.pc.close()
        finally:
            try:
                if self.role != "viewer":
                    await self.session.close()
            finally:
                if self._on_closed is not None:
                    self._on_closed(self)


def _audio_codec(description: str) -> str | None:
    """The audio codec an answer settled on (its audio section's first), lower case."""
    for media in sdp.SessionDescription.parse(description).media:
        if media.kind == "audio" and media.rtp.codecs:
            return media.rtp.codecs[0].mimeType.lower()
    return None


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()
