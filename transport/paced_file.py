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
    """Push ``frames`` and (channels, n) ``audio`` into ``session`` in real time, then end it.

    Each picture goes in at its time; each 20 ms audio block once its last sample has been heard,
    as a camera and a microphone deliver them.
    """
    block = int(rate * AUDIO_BLOCK_SECONDS)
    pictures = iter(frames)
    first = await asyncio.to_thread(next, pictures, None)  # decode off the loop
    start = time.monotonic()  # the clock starts with the first picture, not before the decoder has opened

    async def microphone() -> None:
        for n, at in enumerate(range(0, audio.shape[1], block)):
            await asyncio.sleep(max(0.0, start + (n + 1) * AUDIO_BLOCK_SECONDS - time.monotonic()))
            session.push_audio(audio[:, at : at + block], rate)

    heard = asyncio.create_task(microphone())
    frame = first
    try:
        while frame is not None:
            due = start + (frame.index - first.index) / fps
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            session.push_video(frame.image, captured_at=due)  # taken at its time, however late it went in
            frame = await asyncio.to_thread(next, pictures, None)
        heard.cancel()  # audio longer than the pictures stops with them
    finally:
        heard.cancel()
    session.end()
