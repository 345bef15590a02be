"""How close streamed Whisper chunks come to offline ones, per context length.

    python bench/streaming_features.py [--audio ../shared/media/speech_16k.wav] [--stride 4]

Pushes the clip in 20 ms blocks, asks for a stride of frames whenever they are ready (as the live
pipeline does), and compares each frame's (50, 384) chunk with LatentSync's offline chunk by cosine
similarity. Uses the seeded Whisper-tiny encoder of configs/tiny.yaml.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from models.whisper_encoder import WhisperDims, seeded_encoder
from stream.audio_features import feature_chunks, log_mel
from stream.audio_stream import StreamingFeatures
from stream.config import load_config
from transport.files import read_audio

SHARED = Path(__file__).resolve().parents[2] / "shared"


def streamed_chunks(features: StreamingFeatures, audio: np.ndarray, stride: int, n_frames: int):
    chunks, done, seconds = [], 0, []

    def take(until: int) -> None:
        nonlocal done
        while done < until:
            batch = list(range(done, min(done + stride, until)))
            began = time.perf_counter()
            chunks.append(features.chunks(batch))
            seconds.append(time.perf_counter() - began)
            done += len(batch)

    block = 320
    for start in range(0, len(audio), block):
        features.push(audio[start : start + block])
        ready = min(features.ready_until(), n_frames)
        take(ready - (ready - done) % stride)
    take(n_frames)  # end of stream: the last frames use the audio there is
    return np.concatenate(chunks), float(np.mean(seconds))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def compare(audio: np.ndarray, contexts: list[float], stride: int) -> list[dict]:
    torch.set_num_threads(2)
    encoder = seeded_encoder(WhisperDims(**load_config("tiny")["whisper"]))
    n_frames = int(len(audio) / 16000 * 25)
    offline = feature_chunks(encoder.encode_features(log_mel(audio)).numpy(), n_frames)
    results = []
    for context in contexts:
        for aligned in (True, False):
            streamed, seconds = streamed_chunks(StreamingFeatures(encoder, 25, context, aligned), audio,
                                                stride, n_frames)
            similarity = cosine(streamed, offline)
            results.append({"context_s": context, "aligned_positions": aligned,
                            "cosine_mean": float(similarity.mean()), "cosine_p5": float(np.percentile(similarity, 5)),
                            "cosine_min": float(similarity.min()), "ms_per_call": 1000 * seconds})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", default=str(SHARED / "media" / "speech_16k.wav"))
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--contexts", default="1,2,4,8")
    args = parser.parse_args()
    audio, _ = read_audio(args.audio)
    print(f"{'context s':>9} {'positions':>9} {'cos mean':>9} {'cos p5':>8} {'cos min':>8} {'ms/call':>8}")
    for row in compare(audio, [float(c) for c in args.contexts.split(",")], args.stride):
        print(f"{row['context_s']:>9.1f} {('offline' if row['aligned_positions'] else 'zero'):>9} "
              f"{row['cosine_mean']:>9.4f} {row['cosine_p5']:>8.4f} {row['cosine_min']:>8.4f} "
              f"{row['ms_per_call']:>8.1f}")


if __name__ == "__main__":
    main()
