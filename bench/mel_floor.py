"""How much the causal ("running") mel floor changes LatentSync's audio chunks.

Whisper floors the log-mel at (loudest value of the whole clip − 8); a live stream cannot know
that maximum in advance, so stream/ can use a running maximum instead. This runs a clip through
both floors and the seeded tiny encoder (the fixtures' weights; real tiny.pt weights may react
differently) and compares the per-frame (50, 384) chunks.

    python bench/mel_floor.py [path/to/16k_mono.wav]

It also repeats the run with 0.5 s of digital silence in front, the causal floor's worst case.
"""

from __future__ import annotations

import sys
import wave
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from models.whisper_encoder import WhisperDims, seeded_encoder  # noqa: E402
from stream.audio_features import SAMPLE_RATE, feature_chunks, frame_count, log_mel  # noqa: E402

DEFAULT_CLIP = ROOT.parent / "shared" / "media" / "speech_16k.wav"
TINY = WhisperDims(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4)


def read_wav_16k_mono(path: Path) -> np.ndarray:
    with wave.open(str(path)) as wav:
        if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (SAMPLE_RATE, 1, 2):
            raise SystemExit(f"{path}: need 16 kHz mono 16-bit PCM")
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def chunks(encoder, waveform: np.ndarray, floor: str) -> np.ndarray:
    features = encoder.encode_features(torch.from_numpy(log_mel(waveform, floor))).numpy()
    return feature_chunks(features, frame_count(len(features)))


def cosine_per_frame(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def compare(encoder, waveform: np.ndarray, label: str) -> None:
    global_mel, running_mel = log_mel(waveform, "global"), log_mel(waveform, "running")
    loudest = int(global_mel.max(axis=0).argmax())
    differing = int((global_mel != running_mel).any(axis=0).sum())
    global_chunks, running_chunks = chunks(encoder, waveform, "global"), chunks(encoder, waveform, "running")
    gap = 1 - cosine_per_frame(global_chunks, running_chunks)
    abs_diff = np.abs(global_chunks - running_chunks).reshape(len(gap), -1).max(1)
    # chunk i starts at row 2i - 4, which reads mel frames from 4i - 10 on (conv1, then conv2 stride 2)
    settled = -(-(loudest + 10) // 4)

    print(f"{label}: {len(waveform) / SAMPLE_RATE:.2f} s, {global_mel.shape[1]} mel frames, "
          f"{len(gap)} chunks; "
          f"loudest mel frame {loudest} ({loudest / 100:.2f} s); {differing} mel frames differ, "
          f"max |Δmel| {np.abs(global_mel - running_mel).max():.4f}")
    print(f"  all chunks:          1-cosine mean {gap.mean():.2e} max {gap.max():.2e}; "
          f"max |Δ| {abs_diff.max():.4f} (chunk absmax {np.abs(global_chunks).max():.3f})")
    if settled < len(gap):
        print(f"  chunks >= {settled:4d} (same mel, differences only through attention): "
              f"1-cosine max {gap[settled:].max():.2e}; max |Δ| {abs_diff[settled:].max():.4f}")
    worst = np.argsort(gap)[::-1][:3]
    listed = ", ".join(f"{i}: {gap[i]:.2e}, {abs_diff[i]:.3f}" for i in worst)
    print(f"  worst chunks (index: 1-cosine, max |Δ|): {listed}")


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CLIP
    waveform = read_wav_16k_mono(path)
    encoder = seeded_encoder(TINY, seed=0)
    compare(encoder, waveform, path.name)
    # A stream that opens on digital silence (muted mic, padded TTS) is the running floor's worst case.
    silence = np.zeros(SAMPLE_RATE // 2, np.float32)
    compare(encoder, np.concatenate([silence, waveform]), f"0.5 s of zeros + {path.name}")


if __name__ == "__main__":
    main()
