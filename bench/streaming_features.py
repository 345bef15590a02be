"""How close streamed Whisper chunks come to offline ones, per layer, context and look-ahead.

    python -m bench.streaming_features [--audio FILE ...] [--contexts 1,2,4,8] [--look-aheads 0,0.25,0.5]
                                      [--stride 4] [--every 1] [--seeded] [--device cpu]
                                      [--json out.json]

(from the repository root: it imports bench.real_whisper).

Pushes each clip in 20 ms blocks, asks for a stride of frames whenever they are ready (as the live
pipeline does), and compares each frame's (50, C) chunk with LatentSync's offline chunk (global mel
floor, 30 s segments) by cosine similarity, per encoder layer (the chunk's 10 rows of that layer)
and over the whole chunk. Look-aheads are seconds past the chunk's own 122.5 ms: each adds that
much latency. The clips default to ../shared/media/speech_16k.wav (19.8 s) and a 73 s clip joined
from the shared speech (``long_clip``), which crosses the 30 s marks twice; "marks" is the mean over
the frames within the context (+1 s) after each mark, where a live window sees less than elsewhere.

Weights: OpenAI's trained Whisper base (bench/real_whisper.py) when the test extra is installed,
else the seeded Whisper-tiny of configs/tiny.yaml; the header says which ran.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench import real_whisper
from models.whisper_encoder import WhisperDims, WhisperEncoder, seeded_encoder
from stream.audio_features import SAMPLE_RATE, feature_chunks, log_mel
from stream.audio_stream import RIGHT_CONTEXT_SECONDS, SEGMENT_ROWS, StreamingFeatures
from stream.config import load_config
from transport.files import read_audio

SHARED = Path(__file__).resolve().parents[2] / "shared"
MEDIA = SHARED / "media"
FPS = 25
# Joined in this order: four speakers, two of them twice, 73.4 s in all.
JOINED = "joined"  # --audio's name for long_clip()
LONG_CLIP_PARTS = ("speech_16k.wav", "speech_24k.wav", "speaker_wide.mp4", "anime_speaker.wav", "speech_16k.wav")


def long_clip() -> np.ndarray:
    """The shared speech joined into one 16 kHz clip longer than 60 s (73.4 s)."""
    return np.concatenate([read_audio(MEDIA / name)[0] for name in LONG_CLIP_PARTS])


def bench_encoder(seeded: bool = False) -> tuple[WhisperEncoder, str]:
    """The trained base encoder where installed (unless ``seeded``), else the seeded tiny one."""
    if not seeded and real_whisper.available():
        return real_whisper.encoder(), real_whisper.NAME
    return seeded_encoder(WhisperDims(**load_config("tiny")["whisper"])), "whisper-tiny dims, seeded random weights"


def offline_chunks(encoder: WhisperEncoder, audio: np.ndarray) -> np.ndarray:
    """Upstream's chunks for every whole frame of ``audio``: (n_frames, 10 · layers, C)."""
    features = encoder.encode_features(log_mel(audio)).float().cpu().numpy()
    return feature_chunks(features, int(len(audio) / SAMPLE_RATE * FPS))


def streamed_chunks(features: StreamingFeatures, audio: np.ndarray, stride: int, n_frames: int,
                    wanted: Callable[[int], bool] = lambda first_frame: True):
    """(frame indices, their chunks (n, 10 · layers, C), mean seconds per ``chunks`` call), with the
    audio fed as live audio is and the chunks asked for a stride at a time.

    ``wanted(first frame of a stride)``: whether to ask for that stride (all audio is still pushed),
    to sample a long clip on a slow machine. Skipping strides leaves the running mel floor as live
    has it only while the windows asked for still cover all the audio up to the loudest frame.
    """
    frames, chunks, done, seconds = [], [], 0, []

    def take(until: int) -> None:
        nonlocal done
        while done < until:
            batch = list(range(done, min(done + stride, until)))
            if wanted(batch[0]):
                began = time.perf_counter()
                chunks.append(features.chunks(batch))
                seconds.append(time.perf_counter() - began)
                frames.extend(batch)
            done += len(batch)

    block = 320
    for start in range(0, len(audio), block):
        features.push(audio[start : start + block])
        ready = min(features.ready_until(), n_frames)
        take(ready - (ready - done) % stride)
    take(n_frames)  # end of stream: the last frames use the audio there is
    return np.asarray(frames), np.concatenate(chunks), float(np.mean(seconds))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, ...) arrays, flattened per row."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def per_layer_cosine(streamed: np.ndarray, offline: np.ndarray, layers: int) -> np.ndarray:
    """(layers, n_frames): cosine of each layer's 10 rows (chunks are time-major: token k is row
    k // layers, layer k % layers)."""
    n, _, dim = streamed.shape
    split = lambda chunks: chunks.reshape(n, 10, layers, dim)  # noqa: E731
    return np.stack([cosine(split(streamed)[:, :, layer], split(offline)[:, :, layer]) for layer in range(layers)])


def after_marks(frames: np.ndarray, context: float) -> np.ndarray:
    """Which ``frames`` lie from a 30 s mark to the context (+1 s) after it: where windows see least."""
    times = frames / FPS
    since_mark = times % (SEGMENT_ROWS / 50)
    return (times >= SEGMENT_ROWS / 50) & (since_mark < context + 1)


def window_gflop(encoder: WhisperEncoder, features: StreamingFeatures) -> float:
    """GFLOP of one encoder call on a full window (context + extra look-ahead): the cost, whatever
    else the machine runs (ms/call on a shared machine moves by several times between calls)."""
    from torch.utils.flop_counter import FlopCounterMode

    frames = int(round(features.context_seconds * 100)) + round((features.look_ahead - RIGHT_CONTEXT_SECONDS) * 100)
    parameter = next(encoder.parameters())
    mel = torch.ones(1, encoder.dims.n_mels, frames, dtype=parameter.dtype, device=parameter.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(mel)
    return counter.get_total_flops() / 1e9


def compare(encoder: WhisperEncoder, audio: np.ndarray, contexts: list[float], look_aheads: list[float],
            stride: int, every: int = 1) -> list[dict]:
    """One row per (context, look-ahead): per-layer and whole-chunk cosine mean and p10, cost."""
    if every * stride / FPS > min(contexts):
        raise ValueError(f"every {every} x stride {stride} frames outspan the {min(contexts)} s context: "
                         "the windows would not cover all audio, and the mel floor would not be live's")
    offline = offline_chunks(encoder, audio)
    layers = encoder.dims.n_audio_layer + 1
    results = []
    for context in contexts:
        for extra in look_aheads:
            live = StreamingFeatures(encoder, FPS, context, RIGHT_CONTEXT_SECONDS + extra)
            frames, streamed, seconds = streamed_chunks(live, audio, stride, len(offline),
                                                        lambda first: first // stride % every == 0)
            by_layer = per_layer_cosine(streamed, offline[frames], layers)
            whole = cosine(streamed, offline[frames])
            marks = after_marks(frames, context)
            results.append({
                "context_s": context, "look_ahead_s": live.look_ahead,
                "added_latency_ms": 1000 * (live.look_ahead - RIGHT_CONTEXT_SECONDS),
                "layer_mean": by_layer.mean(1).tolist(), "layer_p10": np.percentile(by_layer, 10, axis=1).tolist(),
                "mean": float(whole.mean()), "p10": float(np.percentile(whole, 10)),
                "marks_mean": float(whole[marks].mean()) if marks.any() else None,
                "frames": len(frames), "gflop_per_call": window_gflop(encoder, live), "ms_per_call": 1000 * seconds})
    return results


def table(clip: str, rows: list[dict]) -> str:
    """A markdown table: cosine mean / p10 per layer and over the chunk."""
    layers = len(rows[0]["layer_mean"])
    head = (["clip", "context s", "look-ahead s (+latency ms)"] + [f"L{i}" for i in range(layers)]
            + ["chunk mean / p10", "after 30 s marks", "GFLOP/call", "ms/call"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [clip, f"{row['context_s']:g}", f"{row['look_ahead_s']:.4g} (+{row['added_latency_ms']:.0f})"]
        cells += [f"{m:.3f} / {p:.3f}" for m, p in zip(row["layer_mean"], row["layer_p10"])]
        cells += [f"**{row['mean']:.3f}** / {row['p10']:.3f}",
                  "-" if row["marks_mean"] is None else f"{row['marks_mean']:.3f}",
                  f"{row['gflop_per_call']:.1f}", f"{row['ms_per_call']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", action="append",
                        help=f"a clip, or {JOINED!r} for the 73 s clip of the shared speech (repeatable); "
                             "default: speech_16k.wav and that")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--contexts", default="1,2,4,8")
    parser.add_argument("--look-aheads", default="0,0.25,0.5", help="seconds past the chunk's own 122.5 ms")
    parser.add_argument("--every", type=int, default=1,
                        help="sample every N-th stride (N x stride frames must span less than each context)")
    parser.add_argument("--seeded", action="store_true", help="the seeded tiny encoder even if base is installed")
    parser.add_argument("--device", default="cpu", help="where the encoder runs (ms/call is that device's)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    encoder, weights = bench_encoder(args.seeded)
    encoder = encoder.to(args.device)
    paths = args.audio or [str(MEDIA / "speech_16k.wav"), JOINED]
    clips = {Path(path).name: long_clip() if path == JOINED else read_audio(path)[0] for path in paths}
    contexts = [float(c) for c in args.contexts.split(",")]
    look_aheads = [float(s) for s in args.look_aheads.split(",")]
    sampled = f", every {args.every}th stride sampled" if args.every > 1 else ""
    print(f"weights: {weights} on {args.device}; stride {args.stride}{sampled}; "
          "cosine mean / p10 against offline (30 s segments)\n")
    report = {"weights": weights, "device": args.device, "stride": args.stride, "every": args.every, "clips": {}}
    for name, audio in clips.items():
        rows = compare(encoder, audio, contexts, look_aheads, args.stride, args.every)
        report["clips"][name] = {"seconds": len(audio) / SAMPLE_RATE, "rows": rows}
        print(table(f"{name} ({len(audio) / SAMPLE_RATE:.1f} s)", rows) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
