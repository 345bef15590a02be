"""Make the 576x768 talking-head clip the live benchmarks use, from ../shared/media/speaker_wide.mp4.

    python bench/make_clip.py [OUT] [--size 576x768]

Crops the 3:4 region around the speaker and scales it; the shared media stay untouched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from transport.files import Mp4Writer, read_video

SHARED = Path(__file__).resolve().parents[2] / "shared"


def make_clip(source: Path, out: Path, width: int, height: int, top: float = 0.16, *,
              box: tuple[int, int, int, int] | None = None, frames: int | None = None, crf: int = 18) -> Path:
    """Crop, scale to width x height and write H.264 without audio at 25 fps.

    The crop is ``box`` (x, y, width, height in source pixels) or, by default, the full width from
    ``top`` (a fraction of the height) down, at the output's aspect. ``frames`` stops early.
    """
    writer = None
    for frame in read_video(source, 25):
        if frames is not None and frame.index >= frames:
            break
        h, w = frame.image.shape[:2]
        crop_h = min(h, round(w * height / width))
        x0, y0, crop_w, crop_h = box or (0, min(round(top * h), h - crop_h), w, crop_h)
        image = cv2.resize(frame.image[y0 : y0 + crop_h, x0 : x0 + crop_w], (width, height),
                           interpolation=cv2.INTER_AREA)
        writer = writer or Mp4Writer(out, width, height, 25, audio_rate=None, crf=crf)
        writer.write_frame(frame.__class__(frame.index, frame.pts, image))
    writer.close()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="talking_576x768.mp4")
    parser.add_argument("--size", default="576x768")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    print(make_clip(SHARED / "media" / "speaker_wide.mp4", Path(args.out), width, height))
