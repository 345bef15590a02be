"""A live lip-sync stream: media pushed in as it arrives, frames pulled out on one media clock.

The session's media clock starts at the first pushed sample or picture (``t0``). Video enters the
pipeline as ticks of that clock at the config's fps, each carrying the newest camera picture (or
the avatar's next frame) and its capture time. Audio is kept twice: 16 kHz mono for the features
and 48 kHz stereo for playback. Output frame i leaves at ``anchor + i / fps`` together with the
playback audio of exactly that frame's time span, so the audio is delayed by precisely the
video's latency and A/V stay in sync whatever the model costs.

Policies, each counted in ``stats()``:
- a tick that finds the pipeline's first queue full is dropped (``dropped_ticks``);
- a window that is already late passes its frames through unchanged (``late_frames``);
- a frame that is ready after its due time goes out at once and the clock re-anchors
  (``clock_slips``); the playout delay then eases back down to what recent frames needed, a
  skipped frame at a time (``eased_frames``): stream/playout.py;
- output nobody reads is bounded (``dropped_outputs``).

Control travels in-band: ``interrupt()``, ``switch_avatar()`` and ``update_options()`` queue a
``Control`` that enters the pipeline between two ticks and reaches each stage in order with the
frames, on the stage's own thread (no stage is touched from outside). What must be immediate
happens on the event loop, which owns the clock and the output: an interrupt drops the program's
queued audio at once, and every frame already in flight leaves as the idle avatar with silence.

An avatar is prepared once (stream/avatar_prep.py) when the session has an avatar cache or is
given a ``PreparedAvatar``: its face stage then looks each tick's face and condition latents up, and
no face detection or VAE encode runs per frame. Without either, its frames are tracked like a camera's.

A ``program`` session is an avatar driven by audio that a program writes (``write_audio``, PCM
s16le in the format declared at creation): it waits in a bounded buffer and is played on the
media clock, silence between utterances. Events (speech_started, speech_ended, interrupted,
buffer_full, error, closed) go to every listener as JSON-ready dicts stamped with the media time.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import numpy as np

from stream.audio_stream import StreamingAudio
from stream.avatar_prep import AvatarCache, AvatarFaces, PreparedAvatar, loop_frames, prepare_avatar
from stream.face_tracking import FaceTracking
from stream.broadcast import Broadcast
from stream.frames import Control, Trace, VideoFrame
from stream.generation import Generation
from stream.input_audio import InputAudio
from stream.latency import LatencyLog
from stream.pipeline import LipSync
from stream.playout import Playout
from stream.program_audio import BufferFull, ProgramAudio
from stream.runner import Pipeline
from stream.session_options import AudioFormat, OptionError, SessionOptions

log = logging.getLogger(__name__)

# Program audio is pushed this far ahead of the clock: it is all there already, and a frame whose
# audio (with its right context) is in when its tick comes waits for nothing.
PROGRAM_LEAD = 0.2
PROGRAM_PERIOD = 0.02
READY = "ready"  # the trace mark of a frame's arrival in the output queue
EARLY_AUDIO = 2.0  # seconds of a camera session's audio kept from before its first picture


@dataclass
class LiveOutput:
    frame: VideoFrame
    audio: np.ndarray  # (2, n) float32 planar at 48 kHz: exactly this frame's 1/fps
    # time.monotonic() at which the frame is due on the output clock. Consecutive frames are due
    # 1/fps apart, also across a frame skipped to ease the delay back down (its audio is skipped
    # with it); a slip puts the gap it leaves in both picture and sound. Transports time both from it.
    due: float


class _OutputSink:
    """The pipeline's last stage in live mode: hands frames to the event loop's output queue."""

    name = "output"

    def __init__(self, loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, limit: int):
        self._loop, self._outputs, self._limit = loop, outputs, limit
        self._ended = False
        self.dropped = 0

    def _put(self, frame: VideoFrame) -> None:
        frame.trace.marks[READY] = time.monotonic()  # when it could have left: what the playout needs
        if self._outputs.qsize() >= self._limit:
            self._outputs.get_nowait()
            self.dropped += 1
        self._outputs.put_nowait(frame)

    def end(self) -> None:
        """On the event loop: no frame follows; readers find None at the end of the queue."""
        self._ended = True
        self._outputs.put_nowait(None)

    def frames_waiting(self) -> int:
        """Frames in the queue, the end marker not counted (on the event loop)."""
        return self._outputs.qsize() - self._ended

    def process(self, frame: VideoFrame) -> list:
        self._loop.call_soon_threadsafe(self._put, frame)
        return []

    def control(self, command: Control) -> None:
        pass  # the loop acted on it when it was given

    def flush(self) -> list:
        self._loop.call_soon_threadsafe(self.end)
        return []


class LiveSession:
    def __init__(self, lipsync: LipSync, *, name: str = "", kind: str = "camera",
                 avatar: np.ndarray | list[np.ndarray] | PreparedAvatar | None = None,
                 options: SessionOptions | None = None, audio_format: AudioFormat | None = None,
                 queue_size: int = 8, record: bool = False, avatar_cache: AvatarCache | None = None):
        self.lipsync = lipsync
        self.name = name
        self.kind = kind
        self.fps = int(lipsync.config["fps"])
        self.options = options or SessionOptions()
        self._avatar = avatar if avatar is None or isinstance(avatar, PreparedAvatar) else loop_frames(avatar)
        self._avatar_cache = avatar_cache
        self._prepares = avatar_cache is not None or isinstance(avatar, PreparedAvatar)
        self._to_prepare = avatar if self._prepares and not isinstance(avatar, PreparedAvatar) else None
        self._switching: asyncio.Future | None = None
        self._audio_stage = StreamingAudio(lipsync.audio_encoder, self.fps, self.options.context_seconds,
                                           self.options.vad, self.options.fade_frames, batch=self.options.stride,
                                           look_ahead=self.options.look_ahead)
        self._record = record
        self._queue_size = queue_size
        # A program's audio is placed exactly where the pacer says; what arrives is placed by arrival.
        self._input_audio = (InputAudio(self._audio_stage.push, placement_blocks=1, retime=False) if audio_format
                             else InputAudio(self._audio_stage.push))
        self._program = (ProgramAudio(audio_format, self.options.buffer_seconds)
                         if audio_format is not None else None)
        self._latest: tuple[np.ndarray, float] | None = None  # the newest picture and when it arrived
        self._early_audio: list[tuple[np.ndarray, int, float, bool]] = []  # a camera's, before its first picture
        self._controls: collections.deque[Control] = collections.deque()
        self._t0: float | None = None
        self._ending = False
        self._closed = False
        self._first_output_at: float | None = None
        self._last_output_at: float | None = None
        self._shown_until = 0.0  # media time up to which frames have been emitted
        self._mute_until = 0.0  # frames before this media time leave idle and silent (an interrupt)
        self.opened = time.monotonic()
        self._last_activity = self.opened
        self.frames_out = 0
        self.frames_interrupted = 0
        self.dropped_ticks = 0
        self.latency = LatencyLog()
        self._av_offsets: collections.deque[float] = collections.deque(maxlen=1000)
        self._playout = Playout(self.fps)
        self.stages: list = []
        self.generation: Generation | None = None
        self.faces: FaceTracking | AvatarFaces | None = None
        self.broadcast = Broadcast(self)
        self._task: asyncio.Task | None = None
        self._program_task: asyncio.Task | None = None
        self._listeners: list[Callable[[dict], None]] = []
        self._closed_callbacks: list[Callable[[], None]] = []
        self.error: BaseException | None = None

    # -- input -----------------------------------------------------------------------------

    def _clock(self, now: float | None = None) -> float:
        """Seconds on the media clock at ``now`` (default: now); the first call starts the clock."""
        now = time.monotonic() if now is None else now
        if self._t0 is None:
            self._t0 = now
        return now - self._t0

    def clock(self) -> float:
        """Seconds on the media clock now; the first call (or push) starts it."""
        return self._clock()

    def push_video(self, image: np.ndarray, captured_at: float | None = None) -> None:
        """A camera picture; ``captured_at`` (``time.monotonic()``) is when it arrived, default now.

        A camera session's clock starts with its first picture, so that pictures arrive on the
        frame grid and each tick, half a frame later, takes the one picture of its frame (not,
        as jitter has it, sometimes the one before and then two at once).
        """
        arrived = time.monotonic() if captured_at is None else captured_at
        self._latest = (image, arrived)
        if self._t0 is None:
            self._clock(arrived)
            early, self._early_audio = self._early_audio, []
            for samples, rate, began, timed in early:
                self._push_audio_at(samples, rate, began, timed)

    def push_audio(self, samples: np.ndarray, rate: int, began: float | None = None) -> None:
        """(channels, n) samples at ``rate``, as they arrive: the last of them was heard just now.

        ``began``: the ``time.monotonic()`` its first sample belongs at, for a transport that knows
        better than arrival (a stream's timestamps); placed and retimed the same way.
        """
        timed = began is not None
        if began is None:
            began = time.monotonic() - np.atleast_2d(samples).shape[1] / rate
        if self._t0 is None and self._avatar is None and self._program is None:
            # Before a camera's first picture: kept until the clock starts (the last EARLY_AUDIO s).
            self._early_audio.append((samples, rate, began, timed))
            while self._early_audio and began - self._early_audio[0][2] > EARLY_AUDIO:
                self._early_audio.pop(0)
            return
        self._push_audio_at(samples, rate, began, timed)

    def _push_audio_at(self, samples: np.ndarray, rate: int, began: float, timed: bool) -> None:
        at = self._clock(began)
        if at < 0:  # heard before the clock started: only what comes after it
            samples = np.atleast_2d(samples)[:, round(-at * rate):]
            at = 0.0
        if samples.shape[-1]:
            self._input_audio.push(samples, rate, at, timed)

    def write_audio(self, pcm: bytes) -> float:
        """Queue a program's PCM s16le (whole samples, the declared format); returns its seconds.

        Raises ValueError (stream.program_audio.AudioRejected) for a chunk that cannot be taken;
        a full buffer also sends ``buffer_full``. Nothing of a rejected chunk is kept.
        """
        if self._program is None:
            raise ValueError(f"session {self.name!r} is a {self.kind} session: only program sessions take audio")
        try:
            seconds = self._program.write(pcm)
        except BufferFull:
            self._emit("buffer_full", buffered_seconds=round(self._program.buffered_seconds, 3),
                       capacity_seconds=self.options.buffer_seconds)
            raise
        self._last_activity = time.monotonic()
        return seconds

    def end(self) -> None:
        """No more input: the pipeline drains and ``output()`` then returns None."""
        self._ending = True

    # -- control -----------------------------------------------------------------------------

    def interrupt(self) -> dict:
        """Barge-in: drop the queued speech, and show the idle avatar from the next frame out.

        Returns the ``interrupted`` event: the position reached in the utterance being played.
        """
        if self._program is None:
            raise ValueError(f"session {self.name!r} is a {self.kind} session: only program sessions "
                             "can be interrupted")
        dropped = self._program.clear()
        pushed = self._program.taken / self._program.format.rate
        # Everything pushed but not shown yet is speech nobody should hear now.
        self._mute_until = max(self._mute_until, pushed)
        utterances = self._program.utterances
        current = utterances[0] if utterances else None
        position = max(0.0, self._shown_until - current.start) if current and current.started else 0.0
        utterances.clear()
        self._controls.append(Control("interrupt", self._mute_until))
        return self._emit("interrupted", position=round(position, 3),
                          dropped_seconds=round(dropped + max(0.0, pushed - self._shown_until), 3))

    def switch_avatar(self, avatar: np.ndarray | list[np.ndarray] | PreparedAvatar, avatar_id: str = "") -> dict:
        """Show another avatar from the next tick on (avatar and program sessions).

        A session that shows prepared avatars prepares a plain one first, off the event loop, and
        shows the old one meanwhile; the latest switch wins.
        """
        if self._avatar is None:
            raise ValueError(f"session {self.name!r} is a camera session: it has no avatar to switch")
        if self._switching is not None:
            self._switching.cancel()
        if isinstance(avatar, PreparedAvatar) or not self._prepares:
            self._controls.append(Control("avatar", avatar if isinstance(avatar, PreparedAvatar)
                                          else loop_frames(avatar)))
        else:
            self._switching = asyncio.ensure_future(self._switch_when_prepared(avatar, avatar_id))
        return self._emit("avatar_switched", avatar=avatar_id)

    async def _switch_when_prepared(self, avatar: np.ndarray | list[np.ndarray], avatar_id: str) -> None:
        try:
            prepared = await asyncio.to_thread(self._prepare, avatar)
        except Exception as exc:  # noqa: BLE001 - told to the listeners; the old avatar stays
            log.exception("preparing avatar %s failed", avatar_id)
            self._emit("error", message=f"avatar {avatar_id!r} could not be prepared: {exc}")
            return
        self._controls.append(Control("avatar", prepared))

    def _prepare(self, avatar: np.ndarray | list[np.ndarray]) -> PreparedAvatar:
        if self._avatar_cache is not None:
            return self._avatar_cache.prepare(avatar, self.lipsync)
        return prepare_avatar(avatar, self.lipsync)

    def update_options(self, changes: dict) -> dict:
        """Change options mid-stream (checked like at creation; raises OptionError)."""
        updated = self.options.updated(changes)
        if updated.vad != self.options.vad:
            raise OptionError("option 'vad' is fixed when the session is created")
        self.options = updated
        if self._program is not None:
            self._program.capacity = int(self.options.buffer_seconds * self._program.format.rate)
        self._controls.append(Control("options", self.options))
        return self._emit("options_changed", options=self.options.as_json())

    # -- events ------------------------------------------------------------------------------

    def listen(self, listener: Callable[[dict], None]) -> Callable[[], None]:
        """Call ``listener(event)`` on the event loop for every event; returns the way to stop."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def report_error(self, message: str) -> dict:
        """A transport's error about this session (a bad message, say), told to every listener."""
        return self._emit("error", message=message)

    def report(self, event: str, **fields) -> dict:
        """A transport's event about this session (an input lost, an output reconnected...), told to every listener."""
        return self._emit(event, **fields)

    def _emit(self, event: str, media_time: float | None = None, **fields) -> dict:
        body = {"event": event, "session": self.name,
                "media_time": round(self._shown_until if media_time is None else media_time, 3), **fields}
        for listener in list(self._listeners):
            try:
                listener(body)
            except Exception:
                log.exception("event listener failed")
        return body

    def on_closed(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` once the session has closed; returns the way to stop."""
        self._closed_callbacks.append(callback)
        return lambda: self._closed_callbacks.remove(callback) if callback in self._closed_callbacks else None

    # -- pipeline --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._to_prepare is not None:  # once per avatar: with the cache, later sessions find it made
            self._avatar = await asyncio.to_thread(self._prepare, self._to_prepare)
            self._to_prepare = None
        loop = asyncio.get_running_loop()
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._sink = _OutputSink(loop, self._outputs, limit=4 * self.fps)
        face = AvatarFaces(self._avatar) if isinstance(self._avatar, PreparedAvatar) else None
        self.stages = self.lipsync.stages(self._audio_stage, self._sink, stride=self.options.stride,
                                          late_after=self.options.window_late_after, record=self._record, face=face)
        self.generation: Generation = LipSync.find(self.stages, Generation)
        self.faces = LipSync.find(self.stages, (FaceTracking, AvatarFaces))
        self._pipeline = Pipeline(self.stages, self._queue_size)
        self._task = asyncio.create_task(self._pipeline.run(self._ticks()))
        self._task.add_done_callback(self._pipeline_ended)
        if self._program is not None:
            self._clock()
            self._program_task = asyncio.create_task(self._play_program())
            self.broadcast.start()  # its clock and events run whether or not anyone watches

    async def _play_program(self) -> None:
        """Move the program's audio onto the clock at real-time pace: speech, else silence."""
        rate = self._program.format.rate
        pushed = 0
        while not self._closed:
            due = round((time.monotonic() - self._t0 + PROGRAM_LEAD) * rate)
            if due > pushed:
                self._input_audio.push(self._program.take(due - pushed), rate, pushed / rate)
                pushed = due
            await asyncio.sleep(PROGRAM_PERIOD)

    def _pipeline_ended(self, task: asyncio.Task) -> None:
        """A pipeline that fails ends the output too, instead of leaving readers waiting forever."""
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()
            self._sink.end()

    async def _ticks(self) -> AsyncIterator[VideoFrame | Control]:
        """The video source: one frame per tick of the media clock, never blocking on the pipeline."""
        if self._avatar is not None:
            self._clock()
        while self._t0 is None or (self._latest is None and self._avatar is None):
            if self._ending or self._closed:
                return
            await asyncio.sleep(0.01)
        first_queue = None
        # A camera's frames start with its first picture: ticks before it (audio came first) had nothing to show.
        index = 0 if self._avatar is not None else int((time.monotonic() - self._t0) * self.fps)
        # An avatar's frame is made at its tick; a camera's picture arrives on the grid (its first
        # one started the clock) and is taken half a frame later, out of reach of arrival jitter.
        tick_phase = 0.0 if self._avatar is not None else 0.5
        while not self._closed and not (self._ending and self._avatar is not None):
            due = self._t0 + (index + tick_phase) / self.fps
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._ending and self._avatar is None and index / self.fps > self._latest[1] - self._t0 + 0.5 / self.fps:
                return  # the camera has ended and its last picture has had its tick
            while self._controls:
                command = self._controls.popleft()
                if command.kind == "avatar":
                    self._avatar = command.value
                yield command
            # An avatar's picture is there all along: what its frame shows is the audio at its pts,
            # which arrives at the tick. A camera frame is as old as the picture it carries.
            image, captured_at = ((self._avatar[index % len(self._avatar)], due) if self._avatar is not None
                                  else self._latest)
            frame = VideoFrame(index, index / self.fps, image, Trace(captured_at=captured_at, due_at=due))
            index += 1
            first_queue = first_queue or self._pipeline.first_queue
            if first_queue is not None and first_queue.full():
                self.dropped_ticks += 1
                continue
            yield frame

    # -- output ----------------------------------------------------------------------------

    async def output(self) -> LiveOutput | None:
        """The next frame, at its time on the output clock; None once the stream has ended."""
        while True:
            frame = await self._outputs.get()
            if frame is None:
                self._outputs.put_nowait(None)  # every later call sees the end too
                if self.error is not None:
                    raise RuntimeError(f"live pipeline failed: {self.error!r}") from self.error
                return None
            now = time.monotonic()
            if not self._playout.skips(frame.pts, frame.trace.marks[READY], now, self._sink.frames_waiting() > 0):
                break
        due = self._playout.due(frame.pts, now)
        if due > now:
            await asyncio.sleep(due - now)
        emitted = time.monotonic()
        self._first_output_at = self._first_output_at or emitted
        self._last_output_at = emitted
        self.frames_out += 1
        self.latency.record(frame.trace, emitted)
        audio, audio_start = self._input_audio.playback.read(frame.pts, 1.0 / self.fps)
        self._av_offsets.append(audio_start - frame.pts)
        if frame.pts < self._mute_until:  # in flight when an interrupt came: idle and silent
            if self._avatar is not None:  # a camera with program audio keeps its picture
                frame = VideoFrame(frame.index, frame.pts, self._avatar[frame.index % len(self._avatar)], frame.trace)
            audio = np.zeros_like(audio)
            self.frames_interrupted += 1
        self._shown_until = frame.pts + 1.0 / self.fps
        if self._program is not None:
            self._report_speech()
        return LiveOutput(frame, audio, due)

    def _report_speech(self) -> None:
        """speech_started / speech_ended as the output shows an utterance's first and last frame."""
        utterances = self._program.utterances
        while utterances:
            utterance = utterances[0]
            if not utterance.started and utterance.start < self._shown_until:
                utterance.started = True
                self._emit("speech_started", media_time=utterance.start)
            if utterance.end is None or utterance.end > self._shown_until:
                return
            utterances.popleft()
            self._emit("speech_ended", media_time=utterance.end,
                       position=round(utterance.end - utterance.start, 3))

    def stats(self) -> dict:
        generation = self.generation
        times = self._pipeline.times if self.stages else None
        frames = max(self.frames_out, 1)
        return {
            "config": self.lipsync.config["name"],
            "device": str(self.lipsync.device),
            "frames_out": self.frames_out,
            "frames_generated": generation.frames_generated if generation else 0,
            # Output rate once frames flow: start-up is time to first frame, reported on its own.
            "fps": round((self.frames_out - 1) / (self._last_output_at - self._first_output_at), 2)
            if self.frames_out > 1 and self._last_output_at > self._first_output_at else 0.0,
            **self.latency.summary(),
            "ttff_ms": round(1000 * (self._first_output_at - self._t0), 1)
            if self._first_output_at and self._t0 else None,
            # The worst gap between a frame's timestamp and that of the audio sent with it.
            "av_offset_ms": round(1000 * max(self._av_offsets, key=abs), 2) if self._av_offsets else None,
            "dropped_frames": self.dropped_ticks + (generation.frames_late if generation else 0)
            + self._sink.dropped + self._playout.eased if self.stages else 0,
            "dropped_ticks": self.dropped_ticks,
            "late_frames": generation.frames_late if generation else 0,
            "clock_slips": self._playout.slips,
            "eased_frames": self._playout.eased,
            "silent_frames": self._audio_stage.frames_silent,
            "audio_retimed_ms": [round(1000 * s, 1) for s in self._input_audio.retimed_seconds[-8:]],
            "frames_without_face": self.faces.frames_without_face if self.faces else 0,
            "interrupted_frames": self.frames_interrupted,
            "viewers": self.broadcast.sinks,
            **({"buffered_seconds": round(self._program.buffered_seconds, 3)} if self._program else {}),
            "queue_depths": self._pipeline.queue_depths() if self.stages else {},
            "stages_ms_per_frame": {k: round(1000 * v / frames, 2) for k, v in times.seconds.items()}
            if times else {},
        }

    def describe(self) -> dict:
        return {"session": self.name, "kind": self.kind, "seconds": round(time.monotonic() - self.opened, 2),
                "options": self.options.as_json(), **self.stats()}

    def idle_for(self) -> float:
        """Seconds since a program last wrote audio; 0 while someone watches."""
        if self.broadcast.sinks:
            self._last_activity = time.monotonic()
        return time.monotonic() - self._last_activity

    async def close(self, reason: str | None = None) -> dict:
        """Stop and free everything; safe to call more than once. Returns the ``closed`` event."""
        if self._closed:
            return {"event": "closed", "session": self.name, "media_time": round(self._shown_until, 3)}
        self._closed = True
        self._ending = True
        if self.generation is not None:
            self.generation.release()
        for task in (self._program_task, self._switching):
            if task is not None:
                task.cancel()
        # A cancelled task keeps its CancelledError, whose traceback holds the coroutine's frame and so
        # this session: let go of them, or the session lives on until a full pass of the cycle collector.
        self._program_task = self._switching = None
        await self.broadcast.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        closers = [stage.close for stage in self.stages if hasattr(stage, "close")]
        if closers:  # freeing a face tracker's graph takes a while: not on the loop other sessions use
            await asyncio.to_thread(lambda: [close() for close in closers])
        closed = self._emit("closed", **({"reason": reason} if reason else {}))
        self._listeners.clear()
        for callback in self._closed_callbacks:
            callback()
        return closed

    async def wait_closed(self) -> None:
        """Until the pipeline has drained after ``end()``."""
        if self._task is not None:
            await self._task
