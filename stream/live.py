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
  (``clock_slips``), so later frames keep their spacing instead of bunching up; the playout
  delay then eases back down to what recent frames needed;
- output nobody reads is bounded (``dropped_outputs``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from stream.audio_stream import StreamingAudio
from stream.face_tracking import FaceTracking
from stream.frames import Trace, VideoFrame
from stream.generation import Generation
from stream.input_audio import InputAudio
from stream.latency import LatencyLog
from stream.pipeline import LipSync
from stream.runner import Pipeline



@dataclass
class LiveOutput:
    frame: VideoFrame
    audio: np.ndarray  # (2, n) float32 planar at 48 kHz: exactly this frame's 1/fps


class _OutputSink:
    """The pipeline's last stage in live mode: hands frames to the event loop's output queue."""

    name = "output"

    def __init__(self, loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, limit: int):
        self._loop, self._outputs, self._limit = loop, outputs, limit
        self.dropped = 0

    def _put(self, item: VideoFrame | None) -> None:
        if item is not None and self._outputs.qsize() >= self._limit:
            self._outputs.get_nowait()
            self.dropped += 1
        self._outputs.put_nowait(item)

    def process(self, frame: VideoFrame) -> list:
        self._loop.call_soon_threadsafe(self._put, frame)
        return []

    def flush(self) -> list:
        self._loop.call_soon_threadsafe(self._put, None)
        return []


class LiveSession:
    def __init__(self, lipsync: LipSync, *, avatar: np.ndarray | list[np.ndarray] | None = None,
                 stride: int = 4, late_after: float | None = 0.4, context_seconds: float = 2.0,
                 vad: bool = True, fade_frames: int = 3, queue_size: int = 8, record: bool = False):
        self.lipsync = lipsync
        self.fps = int(lipsync.config["fps"])
        self._avatar = ([avatar] if isinstance(avatar, np.ndarray) else avatar) if avatar is not None else None
        if self._avatar is not None:
            self._avatar = self._avatar + self._avatar[-2:0:-1]  # loop a clip forward-backward
        self._audio_stage = StreamingAudio(lipsync.audio_encoder, self.fps, context_seconds, vad,
                                           fade_frames, batch=stride)
        self._options = dict(stride=stride, late_after=late_after, record=record)
        self._queue_size = queue_size
        self._input_audio = InputAudio(self._audio_stage.push)
        self._latest: tuple[np.ndarray, float] | None = None  # the newest picture and when it arrived
        self._t0: float | None = None
        self._ending = False
        self._closed = False
        self._anchor: float | None = None
        self._first_output_at: float | None = None
        self._last_output_at: float | None = None
        self.frames_out = 0
        self.clock_slips = 0
        self.dropped_ticks = 0
        self.latency = LatencyLog()
        self._av_offsets: collections.deque[float] = collections.deque(maxlen=1000)
        self._needed_delay: collections.deque[float] = collections.deque(maxlen=50)
        self.stages: list = []
        self.generation: Generation | None = None
        self.face_tracking: FaceTracking | None = None
        self._task: asyncio.Task | None = None
        self.error: BaseException | None = None

    # -- input -----------------------------------------------------------------------------

    def _clock(self) -> float:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        return now - self._t0

    def push_video(self, image: np.ndarray, captured_at: float | None = None) -> None:
        """A camera picture; ``captured_at`` (``time.monotonic()``) is when it arrived, default now."""
        self._clock()
        self._latest = (image, time.monotonic() if captured_at is None else captured_at)

    def push_audio(self, samples: np.ndarray, rate: int) -> None:
        """(channels, n) samples at ``rate``, as they arrive; their place on the clock is now."""
        self._input_audio.push(samples, rate, self._clock())

    def end(self) -> None:
        """No more input: the pipeline drains and ``output()`` then returns None."""
        self._ending = True

    # -- pipeline --------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._sink = _OutputSink(loop, self._outputs, limit=4 * self.fps)
        self.stages = self.lipsync.stages(self._audio_stage, self._sink, **self._options)
        self.generation: Generation = LipSync.find(self.stages, Generation)
        self.face_tracking: FaceTracking = LipSync.find(self.stages, FaceTracking)
        self._pipeline = Pipeline(self.stages, self._queue_size)
        self._task = asyncio.create_task(self._pipeline.run(self._ticks()))
        self._task.add_done_callback(self._pipeline_ended)

    def _pipeline_ended(self, task: asyncio.Task) -> None:
        """A pipeline that fails ends the output too, instead of leaving readers waiting forever."""
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()
            self._outputs.put_nowait(None)

    async def _ticks(self) -> AsyncIterator[VideoFrame]:
        """The video source: one frame per tick of the media clock, never blocking on the pipeline."""
        if self._avatar is not None:
            self._clock()
        while self._t0 is None or (self._latest is None and self._avatar is None):
            if self._ending or self._closed:
                return
            await asyncio.sleep(0.01)
        first_queue = None
        index = 0
        while not self._closed and not (self._ending and self._avatar is not None):
            due = self._t0 + index / self.fps
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._ending and self._avatar is None:
                return
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
        frame = await self._outputs.get()
        if frame is None:
            self._outputs.put_nowait(None)  # every later call sees the end too
            if self.error is not None:
                raise RuntimeError(f"live pipeline failed: {self.error!r}") from self.error
            return None
        now = time.monotonic()
        self._needed_delay.append(now - frame.pts)
        if self._anchor is None:
            self._anchor = now - frame.pts
        # The playout delay follows what recent frames needed (their 90th percentile), so one slow
        # window costs a slip, not a permanently higher latency.
        target = float(np.percentile(self._needed_delay, 90))
        if self._anchor > target + 1.0 / self.fps:
            self._anchor -= 0.2 * (self._anchor - target)
        due = self._anchor + frame.pts
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 1.0 / self.fps:
            self._anchor = now - frame.pts
            self.clock_slips += 1
        emitted = time.monotonic()
        self._first_output_at = self._first_output_at or emitted
        self._last_output_at = emitted
        self.frames_out += 1
        self.latency.record(frame.trace, emitted)
        audio, audio_start = self._input_audio.playback.read(frame.pts, 1.0 / self.fps)
        self._av_offsets.append(audio_start - frame.pts)
        return LiveOutput(frame, audio)

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
            + self._sink.dropped if self.stages else 0,
            "dropped_ticks": self.dropped_ticks,
            "late_frames": generation.frames_late if generation else 0,
            "clock_slips": self.clock_slips,
            "silent_frames": self._audio_stage.frames_silent,
            "stages_ms_per_frame": {k: round(1000 * v / frames, 2) for k, v in times.seconds.items()}
            if times else {},
        }

    async def close(self) -> None:
        """Stop and free everything; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._ending = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        for stage in self.stages:
            closer = getattr(stage, "close", None)
            if closer is not None:
                closer()

    async def wait_closed(self) -> None:
        """Until the pipeline has drained after ``end()``."""
        if self._task is not None:
            await self._task
