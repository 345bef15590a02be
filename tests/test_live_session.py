"""What a live session promises about its numbers and its neighbours: every emitted frame is
accounted for in the latency record, audio is placed on the clock by one thread, closing one
session does not stall another, and the shared sampler is read-only."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import cv2
import numpy as np
import pytest
import torch

from conftest import MEDIA
from models.lipsync import BypassModel
from stream.config import load_config
from stream.input_audio import PLACEMENT_BLOCKS, RETIME_BLOCKS, InputAudio
from media_helpers import run_session
from stream.live import LiveSession
from stream.session_options import SessionOptions
from stream.pipeline import LipSync
from stream.runner import run_async
from transport.files import read_audio, read_video
from transport.paced_file import play_live

FPS = 25
BLOCK = 960  # 20 ms at 48 kHz, what a microphone delivers


@pytest.fixture(scope="module")
def lipsync() -> LipSync:
    return LipSync.from_config(load_config("tiny"))


@pytest.fixture(scope="module")
def speech_48k() -> np.ndarray:
    return read_audio(MEDIA / "speech_16k.wav")[1]


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    bgr = cv2.imread(str(MEDIA / "portrait.png"))
    return cv2.cvtColor(cv2.resize(bgr, (320, 320), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


async def feed_audio(session: LiveSession, audio: np.ndarray, seconds: float) -> None:
    """Push microphone-sized blocks at real-time pace, then end the session."""
    start = time.monotonic()
    for i, at in enumerate(range(0, int(seconds * 48000), BLOCK)):
        await asyncio.sleep(max(0.0, start + i * BLOCK / 48000 - time.monotonic()))
        session.push_audio(audio[:, at : at + BLOCK], 48000)
    session.end()


def test_every_emitted_frame_is_in_the_latency_record(lipsync, speech_48k):
    """Generated and passed-through frames alike: speech (the model runs), then silence (it does not)."""
    audio = speech_48k[:, : 4 * 48000].copy()
    audio[:, int(2.0 * 48000) :] = 0

    session = LiveSession(lipsync, options=SessionOptions(stride=4))
    frames = itertools.takewhile(lambda f: f.index < 4 * FPS, read_video(MEDIA / "speaker_wide.mp4", FPS))
    stats, outputs = run_async(run_session(session, play_live(session, frames, audio, 48000, FPS)))
    generated = [out for out in outputs if out.frame.trace.generated]
    passed = [out for out in outputs if not out.frame.trace.generated]
    assert generated and passed, (len(generated), len(passed))
    assert session.latency.frames == stats["frames_out"] == len(outputs)
    assert session.latency.untraced == 0
    assert stats["frames_traced"] == len(outputs)
    assert session.latency.frames_generated == len(generated)
    # What the model made left, bar frames skipped to bring the playout delay down (counted).
    assert len(generated) <= session.generation.frames_generated <= len(generated) + stats["eased_frames"]
    for out in outputs:
        trace = out.frame.trace
        assert trace.captured_at is not None and trace.due_at is not None
        assert {"face", "audio", "windows", "model", "paste"} <= trace.marks.keys(), trace.marks
    # A generated frame waited for its window and the model: it cannot be faster than the stride.
    assert stats["latency_generated_ms"]["p50"] >= 1000 * 3 / FPS
    assert stats["latency_passed_ms"]["p50"] > 0


def test_latency_counts_from_when_the_picture_arrived(lipsync, speech_48k):
    """A camera picture that arrived 0.5 s ago is 0.5 s old when it leaves, whatever tick carried it."""
    image = next(iter(read_video(MEDIA / "speaker_wide.mp4", FPS))).image

    session = LiveSession(lipsync, options=SessionOptions(vad=False))
    arrived = time.monotonic() - 0.5

    async def camera_then_microphone():
        session.push_video(image, captured_at=arrived)
        await feed_audio(session, speech_48k, 1.0)

    stats, outputs = run_async(run_session(session, camera_then_microphone()))
    assert len(outputs) >= 20
    # The very value pushed, carried through every stage (no arithmetic: exact).
    assert all(out.frame.trace.captured_at == arrived for out in outputs)
    assert stats["latency_ms"]["p50"] >= 500


def test_pushes_before_the_audio_stage_drains_pad_the_late_start_once(lipsync, speech_48k):
    """The microphone starts 0.2 s after the clock; its first blocks all land before any drain."""
    session = LiveSession(lipsync, options=SessionOptions(vad=False))
    session._clock()  # the clock starts (a camera picture, or an avatar session starting)
    time.sleep(0.2)
    blocks = PLACEMENT_BLOCKS + 1
    for n in range(blocks):
        session.push_audio(speech_48k[:, n * BLOCK : (n + 1) * BLOCK], 48000)
    features = session._audio_stage.features
    assert features.received_seconds == 0  # nothing drained yet: the worker thread has not run
    session._audio_stage._drain()
    # Leading silence, pushed once, up to where the blocks began: they all arrived at >= 0.2 s, so
    # the earliest the first five can have begun is 0.2 - 5 x 20 ms; then the blocks, less what
    # the resampler still holds.
    start = 0.2 - PLACEMENT_BLOCKS * 0.02
    heard = blocks * BLOCK / 48000
    assert start + heard - 0.01 <= features.received_seconds <= start + heard + 0.02, features.received_seconds
    audio, _ = session._input_audio.playback.read(0.0, start - 0.01)
    assert not audio.any()  # the late start is silence on the playback clock too


def test_audio_is_placed_by_its_earliest_block_not_a_late_first_one(lipsync, speech_48k):
    """A first block that arrives 30 ms late does not shift the whole stream's audio 30 ms."""
    session = LiveSession(lipsync, options=SessionOptions(vad=False))
    session._clock()
    time.sleep(0.05)  # the first block arrives late: it began at 0.03 s, on time it began at 0
    session.push_audio(speech_48k[:, :BLOCK], 48000)
    for n in range(1, PLACEMENT_BLOCKS + 1):  # the rest on time: block n ends at (n + 1) x 20 ms
        time.sleep(max(0.0, session._t0 + (n + 1) * 0.02 - time.monotonic()))
        session.push_audio(speech_48k[:, n * BLOCK : (n + 1) * BLOCK], 48000)
    audio, _ = session._input_audio.playback.read(0.0, 0.1)
    expected = speech_48k[:, : audio.shape[1]]
    shift = int(np.argmax(np.abs(audio[0]) > 1e-4)) - int(np.argmax(np.abs(expected[0]) > 1e-4))
    assert abs(shift) <= 48 * 21, f"the audio starts {shift / 48:.1f} ms late"  # within a block's jitter


class StalledModel(BypassModel):
    """A model whose every denoise call waits ``delay`` seconds (a busy GPU, say) and uses no CPU:
    what is measured is the event loop, not two sessions sharing two cores."""

    def __init__(self, resolution: int, delay: float):
        super().__init__(resolution)
        self.delay = delay
        self.denoising = threading.Event()

    def denoise(self, condition, audio, known=None):
        self.denoising.set()
        time.sleep(self.delay)
        return condition


def test_closing_one_session_does_not_stall_another(lipsync, speech_48k, portrait):
    """Close a session whose model call has 1 s left: the other session's frames keep their spacing."""
    slow_model = StalledModel(lipsync.generator.resolution, delay=1.0)
    slow = LipSync(lipsync.config, slow_model, lipsync.audio_encoder, lipsync.device)
    steady = LipSync(lipsync.config, BypassModel(lipsync.generator.resolution), lipsync.audio_encoder,
                     lipsync.device)

    async def run():
        closing = LiveSession(slow, avatar=portrait, options=SessionOptions(vad=False, late_after=None))
        watched = LiveSession(steady, avatar=portrait, options=SessionOptions(vad=False))
        await closing.start()
        await watched.start()
        feeders = [asyncio.create_task(feed_audio(s, speech_48k, 6.0)) for s in (closing, watched)]
        emitted = []

        async def watch():
            while await watched.output() is not None:
                emitted.append(time.monotonic())

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(1.5)  # let the watched session settle into its pace
        assert await asyncio.to_thread(slow_model.denoising.wait, 5.0)
        await asyncio.sleep(0.1)  # well inside the 1 s call
        close_started = time.monotonic()
        await closing.close()
        close_ended = time.monotonic()
        await asyncio.sleep(1.5)
        await watched.close()
        for task in feeders + [watcher]:
            task.cancel()
        return emitted, close_started, close_ended

    emitted, close_started, close_ended = run_async(run())
    around = [t for t in emitted if close_started - 0.2 <= t <= close_ended + 1.0]
    assert len(around) >= 20
    gaps = np.diff(around)
    worst = int(np.argmax(gaps))
    assert gaps.max() <= 2 / FPS + 0.005, (  # 5 ms of timer slack
        f"the other session's output stalled {1000 * gaps.max():.0f} ms, "
                                   f"{1000 * (around[worst] - close_started):.0f} ms after the close began "
                                   f"(close took {1000 * (close_ended - close_started):.0f} ms)")


def test_sessions_sharing_a_model_worker_generate_and_one_closing_leaves_the_other_going(
        lipsync, speech_48k, portrait):
    """Two avatar sessions on one worker (the model batched across them): both have frames
    generated; one closes after 2 s, the other goes on generating to its end."""
    shared = LipSync(lipsync.config, lipsync.generator, lipsync.audio_encoder, lipsync.device)
    worker = shared.share_model(max_batch=2)

    async def run():
        sessions = [LiveSession(shared, avatar=portrait, options=SessionOptions(vad=False, late_after=None))
                    for _ in range(2)]
        for session in sessions:
            await session.start()
        feeders = [asyncio.create_task(feed_audio(s, speech_48k, seconds)) for s, seconds in zip(sessions, (6, 2))]
        counts = [0, 0]

        async def watch(i):
            while await sessions[i].output() is not None:
                counts[i] += 1

        watchers = [asyncio.create_task(watch(i)) for i in range(2)]
        await asyncio.sleep(2.5)
        generated_at_close = sessions[0].generation.frames_generated
        await sessions[1].close()
        await asyncio.wait_for(watchers[0], 20)
        generated = [s.generation.frames_generated for s in sessions]
        await sessions[0].close()
        for task in feeders + watchers:
            task.cancel()
        return generated, generated_at_close, counts

    try:
        generated, generated_at_close, counts = run_async(run())
    finally:
        shared.close()
    assert generated[1] > 0 and counts[1] > 0
    # It went on: at least another second generated, four of its six seconds out (on a loaded
    # 2-core machine a busy model stage drops ticks).
    assert generated[0] > generated_at_close + FPS, (generated, generated_at_close)
    assert counts[0] >= 4 * FPS, counts
    assert sum(worker.batch_sizes.values()) > 0
    assert worker.queued() == 0


def test_the_shared_sampler_is_read_only(lipsync):
    """Timesteps are fixed when the sampler is built; windows denoised from several threads at once
    give what they give one after another, and leave the scheduler as it was."""
    model = lipsync.generator
    sampler = model.sampler
    timesteps = sampler.timesteps.clone()
    calls = []
    original = sampler.scheduler.set_timesteps
    sampler.scheduler.set_timesteps = lambda *a, **k: calls.append(a)
    try:
        generator = torch.Generator().manual_seed(5)
        latent = model.resolution // 8
        windows = []
        for _ in range(4):
            condition = torch.randn((8, 9, latent, latent), generator=generator)
            audio = torch.randn((8, 50, 384), generator=generator)
            known = torch.randn((4, 4, latent, latent), generator=generator)
            windows.append((condition, audio, known))
        serial = [model.denoise(*window) for window in windows]
        together: list = [None] * len(windows)

        def work(i):
            together[i] = model.denoise(*windows[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(windows))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sampler.scheduler.set_timesteps = original
    assert calls == []
    assert torch.equal(sampler.timesteps, timesteps)  # integer timesteps
    for one, other in zip(serial, together):
        # Same inputs, same machine, same process: only thread scheduling differs.
        torch.testing.assert_close(one, other, rtol=1e-5, atol=1e-5)
        assert one.abs().mean() > 0.1


def test_audio_placed_off_by_a_start_up_burst_is_retimed_within_a_second(speech_48k):
    """Ten blocks delivered at once at start-up (queued during a handshake) put the audio 100 ms
    late; the next second of blocks arriving on time moves it back, by skipping 100 ms of audio."""
    received = []
    audio = InputAudio(received.append)
    for n in range(10):  # all ten arrive by 0.2 s: each says it began at 0.18 s
        audio.push(speech_48k[:, n * BLOCK : (n + 1) * BLOCK], 48000, 0.18)
    for n in range(10, 10 + RETIME_BLOCKS + 5):  # then on time, with a little jitter
        jitter = 0.004 * ((n * 7) % 3)
        audio.push(speech_48k[:, n * BLOCK : (n + 1) * BLOCK], 48000, n * 0.02 + jitter)
    assert len(audio.retimed_seconds) == 1 and abs(audio.retimed_seconds[0] + 0.1) < 0.01, audio.retimed_seconds
    # From then on a block goes where it began: block n at n x 20 ms, within the jitter.
    # (less what is still to be skipped: the next block's first samples)
    assert abs(audio._placed - audio._skip - (10 + RETIME_BLOCKS + 5) * 0.02) < 0.01
    played, _ = audio.playback.read(0.5, 0.5)
    source = speech_48k[0, 24000:48000]
    lag = int(np.argmax(np.correlate(played[0], source[:12000], "valid")))
    # Placed by the blocks' median arrival: 4 ms of their jitter late, and well inside a frame.
    assert lag <= 48 * 12, f"the audio sits {lag / 48:.1f} ms late after the correction"
