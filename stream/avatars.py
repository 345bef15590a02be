"""The avatars sessions can show: decoded frames, kept in memory under an id, bounded.

Decoding and checking an upload is the transport's job (transport/avatar_files.py); this store
only keeps what passed, least recently used out first, within a count and a byte budget (uploads
are unauthenticated when no token is set: without a byte bound, eight 8-second clips hold 2 GB). A
running session keeps its own frames, so dropping an avatar from the store never disturbs a session
that shows it.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from stream.avatar_prep import PreparedAvatar

DEFAULT = "default"


@dataclass
class Avatar:
    name: str
    frames: list[np.ndarray]  # RGB uint8; one frame for a portrait
    prepared: PreparedAvatar | None = None  # its faces found and encoded once (stream/avatar_prep.py)

    def playable(self) -> PreparedAvatar | list[np.ndarray]:
        """What a session is given to show: the prepared avatar when there is one."""
        return self.prepared if self.prepared is not None else self.frames

    @property
    def nbytes(self) -> int:
        """What its pictures hold in memory (the prepared crops and latents included)."""
        return sum(frame.nbytes for frame in self.frames) + (self.prepared.nbytes if self.prepared else 0)

    def describe(self, avatar_id: str) -> dict:
        height, width = self.frames[0].shape[:2]
        return {"avatar": avatar_id, "name": self.name, "frames": len(self.frames),
                "width": width, "height": height, "prepared": self.prepared is not None}


class UnknownAvatar(LookupError):
    pass


class AvatarStore:
    """The uploaded avatars: at most ``keep`` of them and ``max_bytes`` in all (the default one aside)."""

    def __init__(self, default: Avatar | None = None, keep: int = 8, max_bytes: int = 1 << 30):
        self.default = default
        self.keep = keep
        self.max_bytes = max_bytes
        self._avatars: OrderedDict[str, Avatar] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(avatar.nbytes for avatar in self._avatars.values())

    def add(self, avatar: Avatar) -> str:
        """Keep ``avatar`` under a new id; the least recently used go to make room (the newest stays,
        whatever its size: an upload is bounded by its own limits)."""
        avatar_id = uuid.uuid4().hex[:12]
        self._avatars[avatar_id] = avatar
        while len(self._avatars) > 1 and (len(self._avatars) > self.keep or self.nbytes > self.max_bytes):
            self._avatars.popitem(last=False)
        return avatar_id

    def get(self, avatar_id) -> Avatar:
        """The avatar by id; None, "" or "default" name the server's default one."""
        if avatar_id in (None, "", DEFAULT):
            if self.default is None:
                raise UnknownAvatar("no avatar chosen and the server has no default one: upload a portrait "
                                    "(POST /avatar) or start the server with --avatar PATH")
            return self.default
        if not isinstance(avatar_id, str) or avatar_id not in self._avatars:
            raise UnknownAvatar(f"unknown avatar {avatar_id!r}: upload it first (POST /avatar)")
        self._avatars.move_to_end(avatar_id)
        return self._avatars[avatar_id]

    def describe(self) -> list[dict]:
        listed = [avatar.describe(avatar_id) for avatar_id, avatar in self._avatars.items()]
        if self.default is not None:
            listed.insert(0, self.default.describe(DEFAULT))
        return listed
