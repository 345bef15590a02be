"""Regenerate examples/ (the README's quick start) from ../shared/media.

    python bench/make_example.py [OUT_DIR]

The first 4 s of speaker_wide.mp4, cropped to the speaker's head and shoulders and scaled to
360x480, and the first 4 s of speech_16k.wav. examples/README.md gives their source and licence.
"""

from __future__ import annotations

import argparse
import wave
from pathlib import Path

from make_clip import SHARED, make_clip

SECONDS = 4
# x, y, width, height in speaker_wide.mp4 (1080x1920): 3:4 around the head, which moves within it
# over the clip. Her eyes are ~100 px apart there, ~67 px at 360x480: FaceMesh finds every frame.
HEAD = (320, 400, 540, 720)
CRF = 23  # about 130 KB for the 4 s


def make_example(media: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    video = make_clip(media / "speaker_wide.mp4", out_dir / "talking_head.mp4", 360, 480,
                      box=HEAD, frames=SECONDS * 25, crf=CRF)
    speech = out_dir / "speech.wav"
    with wave.open(str(media / "speech_16k.wav")) as source, wave.open(str(speech), "wb") as clip:
        clip.setparams(source.getparams())  # 16 kHz mono 16-bit
        clip.writeframes(source.readframes(SECONDS * source.getframerate()))
    return [video, speech]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "examples")
    for path in make_example(SHARED / "media", parser.parse_args().out_dir):
        print(path, path.stat().st_size, "bytes")
