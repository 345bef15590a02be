"""A file played as if it were live: pictures and 20 ms audio blocks pushed at wall-clock pace."""

from __future__ import annotations

import asyncio
import time
from typing import Iterable

import numpy as np

from stream.frames import VideoFrame
from stream.live import LiveSession

AUDIO_BLOCK_SECONDS = 0.02


async def play_live(session: LiveSession, frames: Iterable[VideoFrame], audio: np.ndarray, rate: int,
                    fps: int) -> None:
    """Push ``frames`` and (channels, n) ``audio`` into ``session`` in real time, then end it."""
    block = int(rate * AUDIO_BLOCK_SECONDS)
    pushed = 0
    start = None  # the clock starts with the first picture, not before the decoder has opened
    pictures = iter(frames)
    while (frame := await asyncio.to_thread(next, pictures, None)) is not None:  # decode off the loop
        start = start if start is not None else time.monotonic() - frame.index / fps
        delay = start + frame.index / fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        session.push_video(frame.image)
        # Audio up to the end of this frame's span, in microphone-sized blocks.
        until = min(audio.shape[1], round((frame.index + 1) / fps * rate))
        while pushed < until:
            session.push_audio(audio[:, pushed : pushed + block], rate)
            pushed += block
        await asyncio.sleep(0)
    session.end()
