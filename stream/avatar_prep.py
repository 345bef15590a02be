"""Avatars prepared once: their faces found, aligned and VAE-encoded before any session shows them.

An avatar (a portrait, or a clip played forward-backward) shows the same pictures over and over, so
what the face stage and the model's ``encode_condition`` would compute on every tick is computed once,
in the order a session plays the frames, and kept:

- ``prepare_avatar`` runs the very ``FaceTracking`` stage a camera session runs, over one played cycle
  from a fresh start, so crops, affines and the smoothing (points and nose bias) are exactly what live
  tracking gives on its first cycle; then it encodes the faces' condition latents, a window's worth at a
  time.
- ``PreparedAvatar`` is the result. It indexes like the frames it plays, so a session's ticks take
  ``avatar[index % len(avatar)]`` whether it holds one or a plain list of frames.
- ``AvatarFaces`` is the face stage of a session that shows one: a lookup by the same index, with no
  face detection and no VAE encode per frame. Frames of a clip without a face pass through (counted).
- ``AvatarCache`` keeps prepared avatars by what they are made of: the sha256 of the frames, the
  config's name, resolution and landmark mapping, the weights and mask the condition latents come from,
  dtype, device, the mediapipe version and ``FORMAT``. The last few stay in memory; given a directory, each is also
  one safetensors file there (written to a temporary file, then renamed), so a restarted server skips
  the work. A file is used only if its key and a digest of its tensors match and every shape fits;
  anything else is logged and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stream.face_tracking import FaceTracking
from stream.frames import AlignedFace, Control, FaceFrame, VideoFrame
from stream.generation import faces_to_tensor

log = logging.getLogger(__name__)

# Bump when the face geometry, the condition latents or the file layout change: old files then
# simply stop matching.
FORMAT = 2
ENCODE_BATCH = 16  # faces per encode_condition call: one window, as a live session encodes them


def loop_frames(avatar: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    """An avatar's frames as the ticks play them: a portrait, or a clip looped forward-backward."""
    frames = [avatar] if isinstance(avatar, np.ndarray) else list(avatar)
    return frames + frames[-2:0:-1]


@dataclass(eq=False)
class PreparedAvatar:
    """An avatar's played frames, each with its aligned face and condition latents (None: no face).

    One entry per played frame: a clip of N frames plays 2N - 2. ``conditions`` are (C, h, w) on
    the model's device, as ``encode_condition`` makes them. Indexes like ``frames``.
    """

    frames: list[np.ndarray]
    faces: list[AlignedFace | None]
    conditions: list[torch.Tensor | None]
    key: str = ""

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.frames[index]

    @property
    def nbytes(self) -> int:
        """Memory of its distinct frames, crops and latents (a clip's played frames repeat its own)."""
        frames = {id(frame): frame.nbytes for frame in self.frames}
        crops = sum(face.image.nbytes for face in self.faces if face is not None)
        latents = sum(c.element_size() * c.nelement() for c in self.conditions if c is not None)
        return sum(frames.values()) + crops + latents

    @property
    def frames_without_face(self) -> int:
        return sum(face is None for face in self.faces)


def prepare_avatar(frames: np.ndarray | list[np.ndarray], lipsync, key: str = "") -> PreparedAvatar:
    """Track, align and encode an avatar's faces, in the order a session plays them (blocking)."""
    played = loop_frames(frames)
    fps = lipsync.config["fps"]
    tracking = FaceTracking(lipsync.config)
    try:
        faces = [tracking.process(VideoFrame(i, i / fps, image))[0].face for i, image in enumerate(played)]
    finally:
        tracking.close()
    found = [face for face in faces if face is not None]
    encoded = iter([condition for start in range(0, len(found), ENCODE_BATCH)
                    for condition in lipsync.generator.encode_condition(
                        faces_to_tensor([face.image for face in found[start : start + ENCODE_BATCH]]))])
    return PreparedAvatar(played, faces, [None if face is None else next(encoded) for face in faces], key)


class AvatarFaces:
    """The face stage of a session showing a prepared avatar: each tick's face, looked up.

    A tick at ``frame.index`` shows ``avatar[frame.index % len(avatar)]`` (stream/live.py); an
    "avatar" Control brings the next ``PreparedAvatar`` in-band, ahead of the ticks that show it.
    """

    name = "face"

    def __init__(self, avatar: PreparedAvatar):
        self.avatar = avatar
        self.frames_without_face = 0

    def process(self, frame: VideoFrame) -> list[FaceFrame]:
        position = frame.index % len(self.avatar)
        face = self.avatar.faces[position]
        if face is None:
            self.frames_without_face += 1
        return [FaceFrame(frame, face, condition=self.avatar.conditions[position])]

    def control(self, command: Control) -> None:
        if command.kind == "avatar":
            self.avatar = command.value

    def flush(self) -> list[FaceFrame]:
        return []


# What each generator's condition latents depend on besides the face, hashed once per generator.
_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_identity(generator) -> str:
    """sha256 of what turns a face into condition latents: the VAE's encoding weights, its scaling,
    the mouth mask and the dtype. A generator without a VAE (the bypass) is its class and resolution."""
    identity = _identities.get(generator)
    if identity is not None:
        return identity
    digest = hashlib.sha256()
    vae = getattr(generator, "vae", None)
    if vae is None:
        digest.update(f"{type(generator).__qualname__} {generator.resolution}".encode())
    else:
        digest.update(f"{vae.scaling_factor} {vae.shift_factor}".encode())
        tensors = {f"vae.{name}": tensor for name, tensor in vae.state_dict().items()
                   if not name.startswith(("autoencoder.decoder.", "autoencoder.post_quant_conv."))}
        _hash_tensors(digest, {**tensors, "mask": generator.mask})
    identity = _identities[generator] = digest.hexdigest()
    return identity


def avatar_key(frames: np.ndarray | list[np.ndarray], lipsync) -> str:
    """The cache key of ``frames`` prepared by ``lipsync``'s config and models."""
    made_by = {"format": FORMAT, "config": lipsync.config["name"], "resolution": lipsync.config["resolution"],
               "landmarks": lipsync.config["face"]["landmarks"],
               "model": model_identity(lipsync.generator), "device": lipsync.device.type,
               "mediapipe": importlib.metadata.version("mediapipe")}
    digest = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode())
    for frame in [frames] if isinstance(frames, np.ndarray) else frames:
        frame = np.ascontiguousarray(frame)
        digest.update(f"{frame.shape} {frame.dtype}".encode())
        digest.update(frame.data)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$LIPSTREAM_CACHE/avatars``, else ``~/.cache/lipstream/avatars``."""
    return Path(os.environ.get("LIPSTREAM_CACHE") or Path.home() / ".cache" / "lipstream") / "avatars"


class CacheFileError(ValueError):
    """A cache file that cannot be used as it is: it will be rebuilt."""


class AvatarCache:
    """Prepared avatars by content: the last ``keep`` (and ``max_bytes``) in memory and, with a
    ``directory``, on disk.

    Thread-safe; ``prepare`` blocks (call it off the event loop). ``reused``, ``loaded`` and
    ``prepared`` count memory hits, disk hits and avatars made.
    """

    def __init__(self, directory: str | Path | None = None, keep: int = 8, max_bytes: int = 1 << 30):
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.keep = keep
        self.max_bytes = max_bytes
        self.reused = self.loaded = self.prepared = 0
        self._memory: OrderedDict[str, PreparedAvatar] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory is not None else None

    def prepare(self, frames: np.ndarray | list[np.ndarray], lipsync) -> PreparedAvatar:
        """``frames`` prepared by ``lipsync``: from memory, else from disk, else made and stored."""
        key = avatar_key(frames, lipsync)
        with self._lock:
            avatar = self._memory.get(key)
            if avatar is not None:
                self._memory.move_to_end(key)
                self.reused += 1
                return avatar
        avatar = self._load(key, frames, lipsync)
        if avatar is None:
            avatar = prepare_avatar(frames, lipsync, key)
            self._store(avatar)
        with self._lock:
            self._memory[key] = avatar
            while len(self._memory) > 1 and (len(self._memory) > self.keep or
                                             sum(a.nbytes for a in self._memory.values()) > self.max_bytes):
                self._memory.popitem(last=False)
        return avatar

    def _load(self, key: str, frames, lipsync) -> PreparedAvatar | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            avatar = read_prepared(path, key, frames, lipsync)
        # A cache file is only ever a shortcut: whatever is wrong with it (truncated, garbage, an
        # unreadable header, another layout), the avatar is made again and the file rewritten.
        except Exception as exc:  # noqa: BLE001
            log.warning("avatar cache: ignoring %s (%s); preparing the avatar again", path, exc)
            return None
        self.loaded += 1
        return avatar

    def _store(self, avatar: PreparedAvatar) -> None:
        self.prepared += 1
        path = self.path(avatar.key)
        if path is None:
            return
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_prepared(temporary, avatar)
            os.replace(temporary, path)  # readers see the old file or the whole new one
        except OSError as exc:
            log.warning("avatar cache: cannot write %s (%s); keeping the avatar in memory only", path, exc)
            temporary.unlink(missing_ok=True)


def write_prepared(path: Path, avatar: PreparedAvatar) -> None:
    """One safetensors file: crops, affines, crop sizes and conditions of the frames with a face."""
    present = [i for i, face in enumerate(avatar.faces) if face is not None]
    tensors = {"has_face": torch.tensor([face is not None for face in avatar.faces], dtype=torch.uint8)}
    if present:
        faces = [avatar.faces[i] for i in present]
        tensors.update(crops=torch.from_numpy(np.stack([face.image for face in faces])),
                       affines=torch.from_numpy(np.stack([face.affine for face in faces])),
                       crop_sizes=torch.tensor([face.crop_size for face in faces], dtype=torch.int64),
                       conditions=torch.stack([avatar.conditions[i] for i in present]).cpu())
    digest = hashlib.sha256()
    _hash_tensors(digest, tensors)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path),
              metadata={"format": str(FORMAT), "key": avatar.key, "digest": digest.hexdigest()})


def read_prepared(path: Path, key: str, frames, lipsync) -> PreparedAvatar:
    """The avatar in ``path``, checked against ``key`` and its own digest; raises CacheFileError."""
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata() or {}
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    if metadata.get("key") != key:
        raise CacheFileError("made from other frames, models or code")
    digest = hashlib.sha256()
    _hash_tensors(digest, tensors)
    if metadata.get("digest") != digest.hexdigest():
        raise CacheFileError("its tensors do not match their digest")
    played = loop_frames(frames)
    has_face = tensors.get("has_face")
    if has_face is None or tuple(has_face.shape) != (len(played),):
        raise CacheFileError(f"it is not for {len(played)} played frames")
    count, resolution = int(has_face.sum()), lipsync.config["resolution"]
    expected = {"crops": ((count, resolution, resolution, 3), torch.uint8),
                "affines": ((count, 2, 3), torch.float64), "crop_sizes": ((count, 2), torch.int64)}
    for name, (shape, dtype) in expected.items() if count else ():
        tensor = tensors.get(name)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CacheFileError(f"{name!r} is not {dtype} {shape}")
    if count and (tensors.get("conditions") is None or len(tensors["conditions"]) != count):
        raise CacheFileError(f"it does not have {count} conditions")
    faces: list[AlignedFace | None] = [None] * len(played)
    conditions: list[torch.Tensor | None] = [None] * len(played)
    if count:
        latents = tensors["conditions"].to(lipsync.device)
        for j, i in enumerate(np.flatnonzero(has_face.numpy())):
            faces[i] = AlignedFace(image=tensors["crops"][j].numpy(), affine=tensors["affines"][j].numpy(),
                                   crop_size=tuple(int(v) for v in tensors["crop_sizes"][j]))
            conditions[i] = latents[j]
    return PreparedAvatar(played, faces, conditions, key)


def _hash_tensors(digest, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
