"""Timestamped media from any live input, put into a session so that its pictures and sound stay
as the source had them, whatever the delays on the way.

    a reader (RTMP, SRT, HLS, a file: transport/ingest.py; a WebRTC peer: transport/webrtc.py)
        -> Picture / Audio / Status, on the event loop -> SessionFeed -> session.push_video / push_audio

The source's timestamps say which picture and which sound belong together; their arrival only says
how late they came. ``SessionFeed`` schedules pictures from their timestamps and places the audio
where the pictures of the same moment were shown.
"""

from __future__ import annotations

import asyncio
import cmath
import collections
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

AUDIO_RATE = 48_000
# No audio for this long: the input has none, or has gone. Silence is pushed in its place, so the
# session's audio stage never waits on it and the output carries on. Just under the stage's own
# patience (0.5 s, stream/audio_stream.py): a shorter stall of our own must not cost audio.
AUDIO_SILENT_AFTER = 0.45
FILL_PERIOD = 0.02
# Pictures are pushed this long after the fastest path would bring them, so that one a little late
# is still shown in its turn. The frame waits longer than that for its audio anyway (the features
# reach 122.5 ms past it, stream/audio_stream.py).
JITTER_ALLOWANCE = 0.06
# On a worse link the allowance grows to cover most pictures (ALLOWANCE_PERCENTILE of the last
# LATENESS_KEPT): a picture that waited for a resent packet (a round trip and more) would otherwise
# be shown after its sound. It moves a frame at a time (one picture shown twice, or skipped, and the
# audio with it), up at once, down after ALLOWANCE_HOLD seconds without a rise, and never past
# MAX_ALLOWANCE: latency is the price of each step.
ALLOWANCE_PERCENTILE = 95
LATENESS_KEPT = 50
ALLOWANCE_HOLD = 2.0
MAX_ALLOWANCE = 0.3
# The first pictures' lateness says nothing of the link: they come in a burst after the handshake, and
# the fastest path is not known yet. The allowance follows from this many pictures on (a second).
LATENESS_FROM = 25
# The packet delays the clock map keeps the smallest of: long enough to see the fastest packets
# through any jitter, short enough to follow a sender's clock that drifts from ours.
CLOCK_WINDOW = 10.0
SHOWN_KEPT = 25  # frames over which where pictures were shown is taken (a second at 25 fps)
MIN_SHOWN = 5  # frames shown before that is trusted
UNSEEN_KEPT = 256  # pictures waiting to be shown that are remembered (most are shown within a second)


@dataclass(frozen=True)
class Picture:
    image: np.ndarray  # RGB (H, W, 3) uint8
    ts: float  # seconds, the source's timestamp
    arrived: float  # time.monotonic()


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # (2, n) float32 planar at AUDIO_RATE
    ts: float | None  # None: not on the pictures' timeline (yet), placed by its arrival
    arrived: float


@dataclass(frozen=True)
class Status:
    """``connected`` (with ``detail``: what the input holds), ``lost`` or ``failed`` (``detail``: why), ``ended``."""

    kind: str
    detail: dict



class ClockMap:
    """A source's timestamps on our clock: ts + the smallest delay (arrival - timestamp) of its
    packets over the last CLOCK_WINDOW seconds.

    The least delayed packets show where the source's clock is; the others only add jitter. Over
    a sliding window, so that a sender's clock that drifts from ours is followed.
    """

    def __init__(self, window: float = CLOCK_WINDOW):
        self.window = window
        self._delays: collections.deque[tuple[float, float]] = collections.deque()  # (arrived, delay), increasing

    def observe(self, ts: float, arrived: float) -> None:
        delay = arrived - ts
        while self._delays and self._delays[-1][1] >= delay:
            self._delays.pop()
        self._delays.append((arrived, delay))
        while self._delays[0][0] < arrived - self.window:
            self._delays.popleft()

    @property
    def started(self) -> bool:
        return bool(self._delays)

    def at(self, ts: float) -> float:
        """``time.monotonic()`` at which ``ts`` was live."""
        return ts + self._delays[0][1]

    def ts_at(self, monotonic: float) -> float:
        """The timestamp that was live at ``monotonic`` (``at``'s inverse)."""
        return monotonic - self._delays[0][1]



class SessionFeed:
    """Feeds one session from its readers, on the event loop; turns their status into events.

    Pictures go in on a schedule made from their timestamps (``_picture``; their arrival is their
    ``captured_at``): the session's clock starts with the first, and each tick takes the newest.
    Audio is placed where the ticks showed the pictures of the same timestamp (``shown``, given
    every frame the session releases: the feed is a sink of the session's output); until a few have
    been shown, where those pictures were pushed; for audio from another source, where it arrived.
    So the output's A/V offset is the source's, whatever the delays on the way; the session puts
    timestamped audio block by block where it says (stream/input_audio.py). While no audio comes (an
    input that dropped, or one without audio), silence is pushed in its place, so the session's
    audio stage never waits on it and the output carries on with the last picture.

    ``audio_from``: which reader's audio drives the session (None: the session takes none of
    theirs, e.g. program audio). ``on_status(reader_name, Status)`` hears every status change.
    Events, told to the session's listeners: ``input_connected``, ``input_lost``,
    ``input_restored``, ``input_ended``, ``input_failed``, each with ``input`` (the reader's name).
    """

    def __init__(self, session, *, audio_from: str | None, fps: int,
                 on_status: Callable[[str, Status], None] | None = None):
        self.session = session
        self.audio_from = audio_from
        self.fps = fps
        self._on_status = on_status
        self._lost_at: dict[str, float] = {}
        self._maps: dict[str, ClockMap] = {}
        self._phases: collections.deque[complex] = collections.deque(maxlen=SHOWN_KEPT)
        self._to_grid = 0.0  # from when a picture is due to mid-way between two ticks
        self.allowance = JITTER_ALLOWANCE  # seconds pictures are held past the fastest path (above)
        self._lateness: collections.deque[float] = collections.deque(maxlen=LATENESS_KEPT)
        self._allowance_moved = 0.0  # time.monotonic() of its last step
        self._tick_offset = 0.5 / self.fps  # where the session's ticks fall after a frame's time
        self._pushed = 0  # the number of the newest picture pushed
        # Pictures pushed and not shown yet, by arrival (their trace's captured_at): (reader, ts).
        # (reader, ts, the allowance it was pushed with).
        self._unseen: collections.OrderedDict[float, tuple[str, float, float]] = collections.OrderedDict()
        # Per reader, lately: seconds from a picture's timestamp to where the session first showed it,
        # less the allowance it was held by (added back as it is now: a step moves the audio at once).
        self._shown_after: dict[str, collections.deque[float]] = {}
        self._pushed_after: dict[str, collections.deque[float]] = {}  # the same for when they were pushed
        self._audio_until: float | None = None  # time.monotonic() where the audio pushed so far ends
        self._filler: asyncio.Task | None = None
        self.pictures = 0
        self.filled = 0.0  # seconds of silence pushed while no audio came

    def deliverer(self, name: str, loop: asyncio.AbstractEventLoop) -> Callable[[object], None]:
        """The thread-safe ``deliver`` for reader ``name``."""
        def deliver(item: object) -> None:
            try:
                loop.call_soon_threadsafe(self._take, name, item)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass
        return deliver

    def take(self, name: str, item: Picture | Audio | Status) -> None:
        """What reader ``name`` has, handed over on the event loop."""
        self._take(name, item)

    def _take(self, name: str, item: object) -> None:
        if isinstance(item, Status):
            self._status(name, item)
            return
        clock = self._maps.setdefault(name, ClockMap())
        if item.ts is not None:
            clock.observe(item.ts, item.arrived)
        if isinstance(item, Picture):
            self._picture(name, item, clock)
        elif name == self.audio_from:
            shown = self._shown_after.get(name)
            pushed = self._pushed_after.get(name)
            if item.ts is None:
                began = None
            elif shown is not None and len(shown) >= MIN_SHOWN:
                began = item.ts + float(np.median(shown)) + self.allowance
            elif pushed:  # until frames come out (a second or so): where pictures of that moment went in
                began = item.ts + float(np.median(pushed)) + self.allowance
            else:  # no picture of this source pushed yet, or audio from another source: where it arrived
                began = None
            self.session.push_audio(item.samples, AUDIO_RATE, began)
            seconds = item.samples.shape[1] / AUDIO_RATE
            self._audio_until = began + seconds if began is not None else time.monotonic()

    def _picture(self, name: str, item: Picture, clock: ClockMap) -> None:
        """Push a picture ``allowance`` after the fastest path would bring it, held to mid-way
        between two of the session's ticks.

        The ticks take the newest picture: pictures pushed close to a tick are shown twice or
        skipped at the least jitter, and one that comes late is shown a tick late. Pushed on a
        schedule made from their timestamps, mid-way between ticks, jitter up to the allowance
        changes nothing. The hold follows the source's phase as it drifts (the session's grid is
        fixed by its first picture); a picture later than its schedule goes at once.
        """
        now = time.monotonic()
        if item.ts is not None and self.pictures >= LATENESS_FROM:
            self._follow_lateness(item.arrived - clock.at(item.ts), now)
        allowance = self.allowance
        due = clock.at(item.ts) + allowance if item.ts is not None else item.arrived
        if self.pictures:  # the session's clock runs (its first picture started it)
            grid = now - self.session.clock()
            self._phases.append(cmath.exp(2j * math.pi * (due - grid - self._tick_offset) * self.fps))
            phase = cmath.phase(sum(self._phases)) / (2 * math.pi)  # of the schedule, against the ticks
            self._to_grid = ((0.5 - phase) % 1.0) / self.fps
        self.pictures += 1
        number = self.pictures
        if item.ts is not None:
            self._unseen[item.arrived] = (name, item.ts, self.allowance)
            while len(self._unseen) > UNSEEN_KEPT:
                self._unseen.popitem(last=False)

        def push() -> None:
            if number <= self._pushed:  # a later picture, held less, went first: this one is stale
                return
            self._pushed = number
            self.session.push_video(item.image, captured_at=item.arrived)
            if item.ts is not None:
                self._pushed_after.setdefault(name, collections.deque(maxlen=SHOWN_KEPT)).append(
                    time.monotonic() - item.ts - allowance)
            if self._filler is None and self.audio_from is not None:  # the clock runs from here
                self._audio_until = self._audio_until or time.monotonic()
                self._filler = asyncio.ensure_future(self._fill())
        asyncio.get_running_loop().call_later(max(0.0, due + self._to_grid - now), push)

    def _follow_lateness(self, lateness: float, now: float) -> None:
        """Step the allowance towards what recent pictures' lateness needs (see ALLOWANCE_PERCENTILE)."""
        self._lateness.append(lateness)
        step = 1.0 / self.fps
        needed = float(np.percentile(self._lateness, ALLOWANCE_PERCENTILE))
        wanted = JITTER_ALLOWANCE + step * max(0, math.ceil((needed - JITTER_ALLOWANCE) / step))
        wanted = min(wanted, JITTER_ALLOWANCE + step * math.floor((MAX_ALLOWANCE - JITTER_ALLOWANCE) / step))
        if wanted > self.allowance + 1e-9:
            self.allowance += step
        elif wanted < self.allowance - 1e-9 and now - self._allowance_moved >= ALLOWANCE_HOLD:
            self.allowance -= step
        else:
            return
        self._allowance_moved = now

    def shown(self, out) -> None:
        """A frame the session released (``LiveOutput``): where its picture was shown, the first time,
        and where the session's ticks fall between frames."""
        grid = time.monotonic() - self.session.clock()
        trace = out.frame.trace
        if trace.due_at is not None:
            self._tick_offset = trace.due_at - grid - out.frame.pts
        first = self._unseen.pop(trace.captured_at, None)
        if first is not None:  # else a picture shown again (the source is slower, or gone)
            name, ts, allowance = first
            self._shown_after.setdefault(name, collections.deque(maxlen=SHOWN_KEPT)).append(
                grid + out.frame.pts - ts - allowance)

    # As a sink of the session's output (stream/broadcast.py): it learns where the pictures were shown.
    def offer(self, at: float, out) -> None:
        self.shown(out)

    def end(self) -> None:
        pass

    async def _fill(self) -> None:
        while True:
            await asyncio.sleep(FILL_PERIOD)
            silent = time.monotonic() - self._audio_until
            if silent >= AUDIO_SILENT_AFTER:
                self.session.push_audio(np.zeros((2, round(silent * AUDIO_RATE)), np.float32), AUDIO_RATE,
                                        self._audio_until)
                self._audio_until += silent
                self.filled += silent

    def _status(self, name: str, status: Status) -> None:
        if status.kind == "connected":  # a new connection: new timestamps
            self._maps.pop(name, None)
            self._shown_after.pop(name, None)
            self._pushed_after.pop(name, None)
            for arrived in [a for a, (reader, *_) in self._unseen.items() if reader == name]:
                del self._unseen[arrived]
            if name in self._lost_at:
                gap = time.monotonic() - self._lost_at.pop(name)
                self._report("input_restored", input=name, lost_seconds=round(gap, 2), **status.detail)
            else:
                self._report("input_connected", input=name, **status.detail)
        elif status.kind == "lost":
            self._lost_at[name] = time.monotonic()
            self._report("input_lost", input=name, **status.detail)
        elif status.kind == "ended":
            self._report("input_ended", input=name)
        elif status.kind == "failed":
            self._report("input_failed", input=name, **status.detail)
        if self._on_status is not None:
            self._on_status(name, status)

    def _report(self, event: str, **fields) -> None:
        self.session.report(event, **fields)

    def close(self) -> None:
        if self._filler is not None:
            self._filler.cancel()
