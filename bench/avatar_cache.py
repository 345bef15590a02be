"""What preparing avatars once saves: program sessions with and without the avatar cache, in one run.

    python bench/avatar_cache.py [--config tiny] [--seconds 4] [--json avatar_cache.json]

For a portrait (../shared/media/portrait.png) and a 2 s clip (cut from speaker_wide.mp4), both loaded
as the server loads an upload (640 px on the long side), it runs program sessions fed
speech_16k.wav as s16le, one after another, each for ``--seconds``, ``--repeat`` times each way
(interleaved; the figures are medians, every run is in the JSON):

- ``none``: no cache, every frame's face tracked and VAE-encoded (the second of two such sessions);
- ``cold``: the first session on an empty cache: it prepares the avatar before its first frame;
- ``warm``: a second session on the same cache (found in memory);
- ``disk``: a session on a new cache over the same directory, as after a restart (read from disk).

``first_frame_ms`` is what a client waits, from ``create`` to the first frame out (preparation
included); ``ttff_ms`` and ``stages_ms_per_frame`` are the session's own ``stats()`` (its clock starts
once it is started). ``face`` is the face stage, ``model`` includes the VAE encode when there is one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stream.avatar_prep import AvatarCache
from stream.config import load_config
from stream.pipeline import LipSync
from stream.runner import run_async
from stream.session_options import AudioFormat
from stream.sessions import SessionManager
from transport.avatar_files import load_avatar_file
from transport.files import read_audio

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
CLIP_SECONDS = 2.0


class _FirstFrame:
    """A broadcast sink that notes when the first frame leaves."""

    def __init__(self) -> None:
        self.at: float | None = None

    def offer(self, at, output) -> None:
        self.at = self.at or time.monotonic()

    def end(self) -> None:
        pass


async def run_session(manager: SessionManager, frames: list[np.ndarray], pcm: bytes, seconds: float) -> dict:
    created = time.monotonic()
    session = manager.create("program", avatar=frames, audio_format=AudioFormat(16_000, 1))
    first = _FirstFrame()
    session.broadcast.subscribe(first)
    await session.start()
    session.write_audio(pcm[: int(seconds * 16_000) * 2])  # all at once, as a fast TTS sends it
    await asyncio.sleep(seconds)
    stats = session.stats()
    await session.close()
    stages = stats["stages_ms_per_frame"]
    return {"first_frame_ms": round(1000 * (first.at - created), 1) if first.at else None,
            "ttff_ms": stats["ttff_ms"], "fps": stats["fps"], "frames_out": stats["frames_out"],
            "frames_generated": stats["frames_generated"], "dropped_frames": stats["dropped_frames"],
            "frames_without_face": stats["frames_without_face"],
            "face_plus_model_ms": round(stages.get("face", 0) + stages.get("model", 0), 2),
            "stages_ms_per_frame": stages}


def measure(lipsync: LipSync, avatars: dict[str, list[np.ndarray]], pcm: bytes, seconds: float,
            directory: Path, repeat: int) -> list[dict]:
    """Each way ``repeat`` times, interleaved (a shared machine's load drifts); the median of each figure."""
    async def run() -> list[dict]:
        rows = []
        for name, frames in avatars.items():
            plain = SessionManager(lipsync)
            await run_session(plain, frames, pcm, seconds)  # the first session only warms up
            runs: dict[str, list[dict]] = {"none": [], "cold": [], "warm": [], "disk": []}
            for attempt in range(repeat):
                folder = directory / name / str(attempt)  # empty: the first cached session is cold
                cached = SessionManager(lipsync, avatar_cache=AvatarCache(folder))
                restarted = SessionManager(lipsync, avatar_cache=AvatarCache(folder))
                for cache, manager in (("none", plain), ("cold", cached), ("warm", cached), ("disk", restarted)):
                    result = await run_session(manager, frames, pcm, seconds)
                    if manager.avatar_cache is not None:
                        counts = manager.avatar_cache
                        result["cache_counts"] = {"prepared": counts.prepared, "loaded": counts.loaded,
                                                  "reused": counts.reused}
                    runs[cache].append(result)
            for cache, results in runs.items():
                row = {"avatar": name, "frames": len(frames), "cache": cache, **_median(results), "runs": results}
                rows.append(row)
                print(_row_line(row), flush=True)
        return rows

    return run_async(run())


def _median(results: list[dict]) -> dict:
    numbers = [key for key, value in results[0].items() if isinstance(value, (int, float))]
    stages = results[0]["stages_ms_per_frame"]
    return {**{key: round(float(np.median([r[key] for r in results])), 2) for key in numbers},
            "stages_ms_per_frame": {stage: round(float(np.median([r["stages_ms_per_frame"].get(stage, 0)
                                                                 for r in results])), 2) for stage in stages}}


def _row_line(row: dict) -> str:
    return (f"{row['avatar']:<9}{row['cache']:<6}{row['first_frame_ms']:>10.0f}{row['ttff_ms']:>9.0f}"
            f"{row['stages_ms_per_frame'].get('face', 0):>8.2f}{row['stages_ms_per_frame'].get('model', 0):>8.2f}"
            f"{row['face_plus_model_ms']:>8.2f}{row['fps']:>7.2f}{row['frames_generated']:>6.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--seconds", type=float, default=4.0, help="each session's length (default: 4)")
    parser.add_argument("--repeat", type=int, default=3, help="sessions of each kind; medians (default: 3)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 2))
    lipsync = LipSync.from_config(load_config(args.config))
    fps = int(lipsync.config["fps"])
    avatars = {"portrait": load_avatar_file(MEDIA / "portrait.png", fps).frames,
               "clip": load_avatar_file(MEDIA / "speaker_wide.mp4", fps, seconds=CLIP_SECONDS).frames}
    speech, _ = read_audio(MEDIA / "speech_16k.wav")
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
    directory = Path(tempfile.mkdtemp(prefix="lipstream-avatar-cache-"))
    machine = _machine()  # the load average before this run adds its own
    print(f"{'avatar':<9}{'cache':<6}{'first ms':>10}{'ttff ms':>9}{'face':>8}{'model':>8}{'f+m':>8}"
          f"{'fps':>7}{'gen':>6}   (medians of {args.repeat}; face, model: ms per frame out)")
    try:
        rows = measure(lipsync, avatars, pcm, args.seconds, directory, args.repeat)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    result = {"command": "python bench/avatar_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": lipsync.config["name"], "device": str(lipsync.device), "machine": machine,
              "seconds_per_session": args.seconds,
              "repeat": args.repeat, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores {model}, torch threads {torch.get_num_threads()}, load average {load}"


if __name__ == "__main__":
    sys.exit(main())
