"""Avatar files a user uploads or names: decoded into RGB frames and checked for a face.

A portrait (png/jpeg/webp) or a clip (mp4/webm/mov, re-timed to the session's fps). Both are
opened by transport/media_probe.py only: the declared type picks the decoder, never FFmpeg's
probing, and the pixel count is checked before anything is decoded. Frames are scaled to at most
AVATAR_LONG_SIDE pixels as they are decoded and clips cut to CLIP_SECONDS, which bounds what one
avatar costs in memory (640x640x3 x 200 frames = 245 MB at worst).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from stream.avatars import Avatar
from stream.face_landmarks import FaceLandmarker
from transport.media_probe import UnsafeMedia, clip_frames, decode_image

IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
CLIP_TYPES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov"}
AVATAR_LONG_SIDE = 640
CLIP_SECONDS = 8


class BadInput(ValueError):
    """Something the client sent that cannot be used: answered with 400 and this message."""


def load_avatar(data: bytes, suffix: str, name: str, fps: int, seconds: float = CLIP_SECONDS) -> Avatar:
    """Decode a portrait or a clip (re-timed to ``fps``, its first ``seconds``) into RGB frames; it must
    show a face (blocking)."""
    kind = "image" if suffix in IMAGE_TYPES.values() else "clip"
    try:
        if kind == "image":
            frames = iter([_fit(decode_image(data))])
        else:
            frames = clip_frames(data, suffix, fps, round(seconds * fps), AVATAR_LONG_SIDE)
        first = next(frames)
        _check_face(first, name)  # before the rest of a clip is decoded
        return Avatar(name, [first, *frames])
    except UnsafeMedia as exc:
        raise BadInput(f"{name}: not a readable {kind} ({exc})") from None


def _check_face(frame: np.ndarray, name: str) -> None:
    with FaceLandmarker(static_image=True) as landmarker:
        if landmarker.alignment_points(frame) is None:
            raise BadInput(f"{name}: no face found in it (the first frame must show one face)")


def load_avatar_file(path: str | Path, fps: int, seconds: float = CLIP_SECONDS) -> Avatar:
    path = Path(path)
    try:
        suffix = upload_suffix(None, path.name)
        data = path.read_bytes()
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror}") from None
    return load_avatar(data, suffix, path.name, fps, seconds)


def _fit(image: np.ndarray) -> np.ndarray:
    """At most AVATAR_LONG_SIDE pixels on the long side, even sides (what the video encoder wants)."""
    height, width = image.shape[:2]
    scale = min(1.0, AVATAR_LONG_SIDE / max(height, width))
    size = (max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2))
    if size != (width, height):
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def upload_suffix(content_type: str | None, filename: str | None) -> str:
    known = {**IMAGE_TYPES, **CLIP_TYPES}
    if content_type in known:
        return known[content_type]
    suffix = Path(filename or "").suffix.lower()
    aliases = {".jpeg": ".jpg", ".m4v": ".mp4"}
    suffix = aliases.get(suffix, suffix)
    if suffix in known.values():
        return suffix
    raise BadInput(f"unsupported upload type {content_type or suffix or 'unknown'}: "
                   "send a png, jpeg or webp portrait, or an mp4, webm or mov clip")
