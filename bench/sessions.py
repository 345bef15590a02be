"""Many sessions on one model: N live avatar sessions fed in real time, unbatched vs batched.

    python run_stream.py bench --sessions 1,2,4 [--config tiny] [--seconds 20] [--max-batch 8] [--json F]

Each session is an avatar (a looping clip, or the portrait) driven by speech pushed in 20 ms
microphone blocks at real-time pace, as a voice agent's TTS or a browser's microphone would: every
session differs in its clip and its audio. Avatars are prepared (faces tracked, conditions
encoded) before the clock starts, so what is shared and measured is the model.

For each N, the same sessions run twice, back to back: ``unbatched`` (each session's model stage
calls the model on its own thread, one window at a time: lipstream before the model worker) and
``batched`` (one model worker, stream/model_worker.py). Reported per run: aggregate generated fps
(frames the model drew that went out, all sessions, per second of stream), per-session latency p50/p95 over every
frame out (generated or passed through: a window too late for its budget passes through, which is
how an overloaded model shows), the model fraction (generated / out) and the worker's batch sizes.
"""

from __future__ import annotations

import asyncio
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
EXAMPLES = REPO / "examples"
BLOCK_SECONDS = 0.02
AVATAR_SECONDS = 2.0
AVATAR_SIDE = 480  # the longer side of an avatar's pictures: compositing at 1080p x N would be the bench


@dataclass
class Voice:
    name: str
    audio_48k: np.ndarray  # (channels, n)


def _shrink(image: np.ndarray) -> np.ndarray:
    scale = AVATAR_SIDE / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (round(image.shape[1] * scale) // 2 * 2, round(image.shape[0] * scale) // 2 * 2)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def avatar_frames(fps: int) -> list[tuple[str, list[np.ndarray]]]:
    """The avatars sessions take in turn: talking-head clips (their first seconds) and the portrait."""
    from transport.files import read_video

    avatars = []
    for path in (EXAMPLES / "talking_head.mp4", MEDIA / "speaker_wide.mp4", MEDIA / "anime_speaker.mp4"):
        if path.exists():
            frames = []
            for frame in read_video(path, fps):
                frames.append(_shrink(frame.image))
                if len(frames) >= AVATAR_SECONDS * fps:
                    break
            avatars.append((path.name, frames))
    portrait = MEDIA / "portrait.png"
    if portrait.exists():
        avatars.append((portrait.name, [_shrink(cv2.cvtColor(cv2.imread(str(portrait)), cv2.COLOR_BGR2RGB))]))
    return avatars


def voices() -> list[Voice]:
    from transport.files import read_audio

    paths = [EXAMPLES / "speech.wav", MEDIA / "speech_16k.wav", MEDIA / "speech_24k.wav",
             MEDIA / "anime_speaker.wav", MEDIA / "speaker_wide.mp4"]
    return [Voice(path.name, read_audio(path)[1]) for path in paths if path.exists()]


def _speech(voice: Voice, offset: float, seconds: float) -> np.ndarray:
    """``seconds`` of the voice from ``offset`` on, looped: sessions sharing a voice say different things."""
    samples = voice.audio_48k
    n = round(seconds * 48000)
    start = round(offset * 48000) % samples.shape[1]
    reps = (start + n) // samples.shape[1] + 1
    return np.tile(samples, (1, reps))[:, start : start + n]


async def _feed(session, audio: np.ndarray) -> None:
    block = round(BLOCK_SECONDS * 48000)
    start = time.monotonic()
    for i, at in enumerate(range(0, audio.shape[1], block)):
        await asyncio.sleep(max(0.0, start + (i + 1) * BLOCK_SECONDS - time.monotonic()))
        session.push_audio(audio[:, at : at + block], 48000)
    session.end()


async def _run_sessions(lipsync, prepared: list, speech: list[np.ndarray], options) -> list[dict]:
    from stream.live import LiveSession

    sessions = [LiveSession(lipsync, avatar=avatar, options=options) for avatar in prepared]
    for session in sessions:
        await session.start()

    async def drain(session) -> None:
        while await session.output() is not None:
            pass

    await asyncio.gather(*(_feed(s, audio) for s, audio in zip(sessions, speech)),
                         *(drain(s) for s in sessions))
    # Generated frames that went out (a frame skipped to ease the playout delay was generated for nothing).
    stats = [{**session.stats(), "generated_out": session.latency.frames_generated} for session in sessions]
    for session in sessions:
        await session.close()
    return stats


def _summary(mode: str, stats: list[dict], seconds: float, worker) -> dict:
    generated = sum(s["generated_out"] for s in stats)
    out = sum(s["frames_out"] for s in stats)
    p95 = [s["latency_ms"]["p95"] for s in stats]
    return {"mode": mode, "sessions": len(stats),
            "generated_fps": round(generated / seconds, 2),
            "frames_out": out, "frames_generated": generated,
            "model_fraction": round(generated / max(out, 1), 3),
            "latency_p50_ms": [s["latency_ms"]["p50"] for s in stats],
            "latency_p95_ms": p95,
            "latency_p95_worst_ms": max(p95),
            "late_frames": sum(s["late_frames"] for s in stats),
            "dropped_frames": sum(s["dropped_frames"] for s in stats),
            **({"worker": worker.stats()} if worker is not None else {})}


def measure(lipsync, counts: list[int], seconds: float, max_batch: int, stride: int) -> dict:
    """Both modes for each N in ``counts``; returns the figures (runs in the calling thread)."""
    from stream.avatar_prep import prepare_avatar
    from stream.runner import run_async
    from stream.session_options import SessionOptions

    fps = int(lipsync.config["fps"])
    avatars = avatar_frames(fps)
    prepared = [prepare_avatar(frames, lipsync, key=name) for name, frames in avatars]
    spoken = voices()
    if not prepared or not spoken:
        raise RuntimeError("no avatar clips or speech found (examples/ and ../shared/media)")
    # VAD off: every frame is the model's to draw, so what limits the generated fps is the model.
    options = SessionOptions(stride=stride, vad=False)
    runs = []
    for n in counts:
        picks = [prepared[i % len(prepared)] for i in range(n)]
        speech = [_speech(spoken[i % len(spoken)], 1.7 * i, seconds) for i in range(n)]
        for mode in ("unbatched", "batched"):
            worker = lipsync.share_model(max_batch) if mode == "batched" else None
            try:
                stats = run_async(_run_sessions(lipsync, picks, speech, options))
            finally:
                lipsync.close()
            runs.append(_summary(mode, stats, seconds, worker))
    return {"config": lipsync.config["name"], "device": str(lipsync.device),
            "machine": platform.processor() or platform.machine(), "seconds": seconds, "stride": stride,
            "steps": lipsync.config["sampler"]["steps"], "max_batch": max_batch,
            "avatars": [name for name, _ in avatars], "voices": [v.name for v in spoken], "runs": runs}


def print_table(result: dict) -> None:
    print(f"{result['config']} on {result['device']}, stride {result['stride']}, {result['steps']} steps, "
          f"{result['seconds']:g} s per run, max batch {result['max_batch']}")
    print(f"  {'N':>2} {'mode':<10}{'gen fps':>9}{'model':>7}{'p95 worst':>11}  p50 / p95 per session (ms)")
    for run in result["runs"]:
        per = "  ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(run["latency_p50_ms"], run["latency_p95_ms"]))
        print(f"  {run['sessions']:>2} {run['mode']:<10}{run['generated_fps']:>9.1f}{run['model_fraction']:>7.2f}"
              f"{run['latency_p95_worst_ms']:>11.0f}  {per}")
        if "worker" in run:
            print(f"     batch sizes (windows per U-Net call): {run['worker']['denoise_batch_sizes']}")
