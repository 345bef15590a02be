"""Opening media that someone else named or sent, without letting FFmpeg decide what it is.

FFmpeg's probing picks a demuxer from a file's content, whatever its name says: a 54-byte "mp4"
holding ``ffconcat version 1.0`` + ``file 'secret.png'`` opens as a concat script that reads
another local file. Some demuxers (concat, hls, image2 patterns, subfile) open further URLs named
inside the data. So untrusted media is opened here only:

- clips (mp4/mov, webm/matroska): from memory, with the demuxer forced by the declared type and
  ``format_whitelist`` naming it, so no other demuxer, and no protocol at all (mov's external
  references stay off);
- portraits (png/jpeg/webp): by the image decoders, after the header's signature and size were
  read here, so a 30000x30000 PNG is refused before a byte is inflated;
- inputs a user names by URL or path (``transport/ingest.py``): with a protocol whitelist for the
  scheme and, for files, a whitelist of streaming containers.

Pixel counts are capped before decoding (``MAX_PIXELS``), and clips are decoded one frame at a
time and scaled on the way out, so one upload costs what its kept frames cost, not its source.
"""

from __future__ import annotations

import io
import struct
from typing import Iterator

import av
import numpy as np

# About 16.8 megapixels: a 4096x4096 portrait or an 8K-wide clip frame, ~50 MB as RGB at most.
MAX_PIXELS = 4096 * 4096

# The demuxer each declared clip type is read with (FFmpeg's names for them).
CLIP_DEMUXERS = {".mp4": "mov", ".mov": "mov", ".webm": "matroska"}
# What a file named as a live input (rtmp --in FILE, --audio FILE) may be: streaming containers
# and plain audio, never a script, a playlist or an image sequence.
FILE_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,flv,mpegts,wav,mp3,aac,ogg,avi"
# Protocols FFmpeg may use for an input of each scheme, nested opens (HLS segments) included.
PROTOCOLS = {"file": "file", "rtmp": "rtmp,tcp", "rtmps": "rtmps,rtmp,tcp,tls",
             "srt": "srt,udp", "http": "http,https,tcp,tls,crypto", "https": "http,https,tcp,tls,crypto"}
HTTP_DEMUXERS = "hls," + FILE_DEMUXERS  # HLS over http(s), and its segments


class UnsafeMedia(ValueError):
    """Media that is not what it claims, or too large to decode: the message is for the sender."""


def input_options(url: str) -> dict[str, str]:
    """FFmpeg options that hold an input named by ``url`` (or a path) to its scheme's protocols and to
    streaming containers (``check_input`` has vetted the scheme)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    options = {"protocol_whitelist": PROTOCOLS.get(scheme, "file")}
    if scheme == "file":
        options["format_whitelist"] = FILE_DEMUXERS
    elif scheme in ("http", "https"):
        options["format_whitelist"] = HTTP_DEMUXERS
    return options


def image_size(data: bytes) -> tuple[str, int, int]:
    """(kind, width, height) from a png, jpeg or webp header; UnsafeMedia for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data.startswith(b"\xff\xd8"):
        return ("jpeg", *_jpeg_size(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("webp", *_webp_size(data))
    raise UnsafeMedia("not a png, jpeg or webp image")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length follows
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        # SOF0-15 give the frame size; C4 (huffman), C8 (reserved) and CC (arithmetic) are not frames.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and position + 9 <= len(data):
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        position += 2 + length
    raise UnsafeMedia("a jpeg without a readable frame header")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise UnsafeMedia("a webp without a readable header")


def check_pixels(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise UnsafeMedia(f"a {width}x{height} picture")
    if width * height > MAX_PIXELS:
        raise UnsafeMedia(f"{width}x{height} pixels is more than the {MAX_PIXELS / 1e6:.1f} megapixels "
                          "an avatar may have: send a smaller picture")


def decode_image(data: bytes) -> np.ndarray:
    """An RGB uint8 picture from png, jpeg or webp bytes, its size checked before it is decoded."""
    import cv2

    kind, width, height = image_size(data)
    check_pixels(width, height)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise UnsafeMedia(f"not a readable {kind} image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def clip_frames(data: bytes, suffix: str, fps: float, count: int, long_side: int) -> Iterator[np.ndarray]:
    """Up to ``count`` RGB frames of a clip, re-timed to ``fps`` (nearest earlier source frame) and
    scaled to at most ``long_side`` pixels (even sides), decoded one at a time from memory.

    UnsafeMedia when the bytes are not a clip of the declared type, or its frames are too large.
    """
    demuxer = CLIP_DEMUXERS.get(suffix)
    if demuxer is None:
        raise UnsafeMedia(f"clips are mp4, mov or webm, not {suffix!r}")
    options = {"format_whitelist": "mov,mp4,m4a,3gp,3g2,mj2" if demuxer == "mov" else "matroska,webm"}
    if demuxer == "mov":
        options["enable_drefs"] = "0"  # the default, said aloud: never open files a clip refers to
    try:
        container = av.open(io.BytesIO(data), format=demuxer, options=options,
                            stream_options=[{"max_pixels": str(MAX_PIXELS)}])
    except (av.error.FFmpegError, ValueError) as exc:
        raise UnsafeMedia(f"not a readable clip ({exc})") from None
    with container:
        if not container.streams.video:
            raise UnsafeMedia("the clip has no video stream")
        stream = container.streams.video[0]
        check_pixels(stream.codec_context.width, stream.codec_context.height)
        stream.codec_context.options = {"max_pixels": str(MAX_PIXELS)}
        scale = min(1.0, long_side / max(stream.codec_context.width, stream.codec_context.height))
        size = (max(2, int(stream.codec_context.width * scale) // 2 * 2),
                max(2, int(stream.codec_context.height * scale) // 2 * 2))
        start = stream.start_time * stream.time_base if stream.start_time is not None else 0
        index, previous = 0, None
        try:
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base - start) if frame.pts is not None else index / fps
                # Emit every output tick that falls before this frame with the frame before it.
                while previous is not None and index / fps < t - 0.5 / fps and index < count:
                    yield previous
                    index += 1
                if index >= count:
                    return
                check_pixels(frame.width, frame.height)  # a stream may change size midway
                previous = frame.reformat(width=size[0], height=size[1], format="rgb24",
                                          interpolation="AREA").to_ndarray()
        except av.error.FFmpegError as exc:
            if previous is None:
                raise UnsafeMedia(f"not a readable clip ({exc})") from None
        if previous is None:
            raise UnsafeMedia("the clip's video stream holds no frames")
        if index < count:
            yield previous
