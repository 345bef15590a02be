"""An avatar driven by a program's audio (no network): bursty PCM in, speech events, idle between
utterances, interrupt, options and avatar changes in-band, bad input answered without harm."""

from __future__ import annotations

import asyncio
import time

import cv2
import numpy as np
import pytest

from conftest import MEDIA
from stream.program_audio import AudioRejected, BufferFull, ProgramAudio
from stream.session_options import AudioFormat, OptionError, SessionOptions
from stream.sessions import SessionError, SessionLimit, SessionManager
from stream.runner import run_async
from media_helpers import tiny_lipsync

FPS = 25


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    bgr = cv2.imread(str(MEDIA / "portrait.png"))
    return cv2.cvtColor(cv2.resize(bgr, (320, 320), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def mouth_change(image: np.ndarray, original: np.ndarray) -> float:
    """Mean absolute difference in the lower middle of a 320 px portrait (where the mouth is)."""
    region = (slice(150, 260), slice(100, 220))
    return float(np.abs(image[region].astype(np.int16) - original[region].astype(np.int16)).mean())


async def send_bursts(session, pcm: bytes, rate: int, speed: float = 2.0, chunk_ms=(20, 100)) -> float:
    """Write ``pcm`` in chunks of 20-100 ms, ``speed`` times faster than real time; returns seconds sent."""
    rng = np.random.default_rng(7)
    sent = 0
    started = time.monotonic()
    while sent < len(pcm):
        size = int(rng.integers(*chunk_ms) * rate / 1000) * 2
        session.write_audio(pcm[sent : sent + size])
        sent += size
        await asyncio.sleep(max(0.0, started + sent / 2 / rate / speed - time.monotonic()))
    return len(pcm) / 2 / rate


def test_a_program_drives_an_avatar_with_bursts_of_speech(portrait, speech_24k):
    pcm = speech_24k[: 2 * 24_000 * 3]  # 3 s of speech

    async def run():
        manager = SessionManager(tiny_lipsync(), max_sessions=2)
        session = manager.create("program", name="agent", avatar=portrait,
                                 audio_format=AudioFormat(24_000, 1),
                                 # no window may pass through late: this test is about what the model shows
                                 options=SessionOptions(stride=4, late_after=None))
        events, frames = [], []
        session.listen(events.append)
        session.broadcast.subscribe(Collect(frames))
        await session.start()
        await asyncio.sleep(0.5)  # idle first
        duration = await send_bursts(session, pcm, 24_000)
        while not any(e["event"] == "speech_ended" for e in events):
            await asyncio.sleep(0.05)
            assert time.monotonic() - frames[0][0] < 30
        await asyncio.sleep(1.0)  # idle after
        stats = session.stats()
        await manager.close("agent")
        return duration, events, frames, stats, manager

    duration, events, frames, stats, manager = run_async(run())
    names = [e["event"] for e in events]
    assert names[:2] == ["speech_started", "speech_ended"] and names[-1] == "closed", names
    started, ended = events[0], events[1]
    assert ended["session"] == "agent"
    assert abs(ended["position"] - duration) <= 1 / FPS
    assert abs((ended["media_time"] - started["media_time"]) - duration) <= 1 / FPS
    assert stats["frames_generated"] > 0 and stats["late_frames"] == 0
    # The mouth moves while the speech plays and is the portrait's own before and after it.
    speaking = [mouth_change(out.frame.image, portrait) for _, out in frames
                if started["media_time"] + 0.3 <= out.frame.pts <= ended["media_time"] - 0.3]
    idle = [mouth_change(out.frame.image, portrait) for _, out in frames
            if out.frame.pts < started["media_time"] - 0.2 or out.frame.pts > ended["media_time"] + 0.3]
    assert speaking and idle
    assert np.median(speaking) > 5 * max(np.median(idle), 0.2), (np.median(speaking), np.median(idle))
    assert max(idle) < 1.0
    # Audio leaves with the frames: silence before the speech, the speech while it plays.
    loud = [np.abs(out.audio).mean() for _, out in frames if started["media_time"] + 0.2 <= out.frame.pts
            <= ended["media_time"] - 0.2]
    quiet = [np.abs(out.audio).mean() for _, out in frames if out.frame.pts < started["media_time"] - 0.1]
    assert np.mean(loud) > 0.01 and max(quiet) == 0.0
    assert manager.sessions == {} and manager.recent[-1]["session"] == "agent"


class Collect:
    """A broadcast sink that keeps (time, output) pairs."""

    def __init__(self, into: list):
        self.into = into
        self.ended = False

    def offer(self, at, output) -> None:
        self.into.append((time.monotonic(), output))

    def end(self) -> None:
        self.ended = True


def test_interrupt_turns_the_mouth_idle_within_200_ms(portrait, speech_24k):
    pcm = speech_24k[: 2 * 24_000 * 6]

    async def run():
        manager = SessionManager(tiny_lipsync())
        session = manager.create("program", name="bargein", avatar=portrait, audio_format=AudioFormat(24_000, 1),
                                 options=SessionOptions(late_after=None))
        events, frames = [], []
        session.listen(events.append)
        session.broadcast.subscribe(Collect(frames))
        await session.start()
        session.write_audio(pcm)  # all of it at once, as a fast TTS does
        while not any(e["event"] == "speech_started" for e in events):
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)
        commanded = time.monotonic()
        reply = session.interrupt()
        await asyncio.sleep(1.5)
        await session.close()
        return commanded, reply, events, frames

    commanded, reply, events, frames = run_async(run())
    assert reply["event"] == "interrupted" and 1.0 <= reply["position"] <= 2.5, reply
    assert reply["dropped_seconds"] > 3
    assert not any(e["event"] == "speech_ended" for e in events)
    before = [mouth_change(out.frame.image, portrait) for at, out in frames if commanded - 0.5 <= at < commanded]
    after = [(at - commanded, mouth_change(out.frame.image, portrait), np.abs(out.audio).max())
             for at, out in frames if at >= commanded]
    assert np.median(before) > 2.0  # it was speaking
    idle_from = next(t for t, change, _ in after if change < 0.5)
    assert idle_from <= 0.2, idle_from
    assert all(change < 0.5 and loudness == 0 for t, change, loudness in after if t >= 0.2), [(round(t, 2), round(c, 2), l) for t, c, l in after if t >= 0.2 and (c >= 0.5 or l != 0)]


def test_program_audio_rejects_what_it_cannot_take():
    audio = ProgramAudio(AudioFormat(16_000, 2), buffer_seconds=1.0)
    with pytest.raises(AudioRejected, match="not a whole number"):
        audio.write(b"\x01\x02\x03")  # half a stereo sample
    with pytest.raises(AudioRejected, match="empty"):
        audio.write(b"")
    tone = (np.sin(np.arange(16_000) / 5) * 10_000).astype("<i2")
    stereo = np.stack([tone, tone], axis=1).tobytes()
    assert audio.write(stereo[: 4 * 8000]) == pytest.approx(0.5)
    with pytest.raises(BufferFull):
        audio.write(stereo)  # 1 s more would exceed the 1 s bound: nothing of it is taken
    assert audio.buffered == 8000
    taken = audio.take(10_000)
    assert taken.shape == (2, 10_000) and np.abs(taken[:, :8000]).max() > 0.2 and not taken[:, 8000:].any()
    assert audio.utterances[0].start == 0 and audio.utterances[0].end is None  # more may still come
    audio.write(stereo[: 4 * 1600])  # 0.1 s, late: a pause within the utterance, not a new one
    audio.take(3_000)
    assert len(audio.utterances) == 1 and audio.utterances[0].end is None
    audio.take(4_000)  # over 0.25 s dry now: it has ended, where its speech did
    assert len(audio.utterances) == 1 and audio.utterances[0].end == pytest.approx((10_000 + 1600) / 16_000)


def test_options_and_formats_are_checked_once_for_every_transport():
    with pytest.raises(OptionError, match="rate 7999"):
        AudioFormat.from_json({"rate": 7999})
    with pytest.raises(OptionError, match="channels 3"):
        AudioFormat.from_json({"rate": 16000, "channels": 3})
    with pytest.raises(OptionError, match="unknown option 'strides'"):
        SessionOptions.from_json({"strides": 4})
    with pytest.raises(OptionError, match="'vad': 1 is not a bool"):
        SessionOptions.from_json({"vad": 1})
    with pytest.raises(OptionError, match="'stride': True"):
        SessionOptions.from_json({"stride": True})
    with pytest.raises(OptionError, match="stride"):
        SessionOptions.from_json({"stride": 17})
    assert SessionOptions.from_json({"late_after": None, "context_seconds": 3}).context_seconds == 3
    assert SessionOptions().updated({"stride": 8}).stride == 8


def test_look_ahead_option_is_checked_and_moves_lateness_with_it():
    assert SessionOptions().look_ahead == pytest.approx(0.1225, abs=1e-12)  # the chunk's own reach
    assert SessionOptions.from_json({"look_ahead": 0.1225}).look_ahead == pytest.approx(0.1225, abs=1e-9)
    for bad in (0.1, 1.5):
        with pytest.raises(OptionError, match="'look_ahead'"):
            SessionOptions.from_json({"look_ahead": bad})
    with pytest.raises(OptionError, match="'look_ahead': '0.5' is not a int or float"):
        SessionOptions.from_json({"look_ahead": "0.5"})
    # waiting for look-ahead is not lateness: the model stage's bound grows by the extra wait
    options = SessionOptions.from_json({"look_ahead": 0.6225, "late_after": 0.4})
    assert options.window_late_after == pytest.approx(0.9, abs=1e-9)
    assert SessionOptions(late_after=None, look_ahead=0.5).window_late_after is None


def test_the_manager_counts_every_session_once(portrait):
    manager = SessionManager(tiny_lipsync(), max_sessions=2)
    manager.create("camera")
    manager.create("program", name="one", avatar=portrait, audio_format=AudioFormat())
    with pytest.raises(SessionLimit):
        manager.create("program", name="two", avatar=portrait, audio_format=AudioFormat())
    with pytest.raises(SessionError, match="exists"):
        manager.create("camera", name="one")
    with pytest.raises(SessionError, match="letters"):
        manager.create("camera", name="a/b")
    with pytest.raises(SessionError, match="no session"):
        manager.get("nobody")
    run_async(manager.close_all())
    assert manager.sessions == {}


def test_two_program_sessions_do_not_hear_each_other(portrait, speech_24k):
    """One speaks, the other is fed silence: the silent one's mouth never moves."""
    pcm = speech_24k[: 2 * 24_000 * 3]

    async def run():
        manager = SessionManager(tiny_lipsync())
        talking = manager.create("program", name="talking", avatar=portrait, audio_format=AudioFormat(24_000, 1))
        quiet = manager.create("program", name="quiet", avatar=portrait, audio_format=AudioFormat(24_000, 1))
        talked, kept = [], []
        talking.broadcast.subscribe(Collect(talked))
        quiet.broadcast.subscribe(Collect(kept))
        await talking.start()
        await quiet.start()
        talking.write_audio(pcm)
        await asyncio.sleep(4.0)
        await manager.close_all()
        return talked, kept

    talked, kept = run_async(run())
    assert max(mouth_change(out.frame.image, portrait) for _, out in talked) > 5
    assert max(mouth_change(out.frame.image, portrait) for _, out in kept) < 0.5
    assert max(np.abs(out.audio).max() for _, out in kept) == 0
