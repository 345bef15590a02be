"""Keeping a long-running server's resident memory where its sessions leave it.

Every session runs its stages in threads of their own (stream/runner.py), and glibc gives threads
new malloc arenas, up to eight per core, each 64 MB of address space that keeps whatever its
threads' freed blocks fragment. Measured on `serve --config tiny` with an aiortc avatar peer and
short sessions one after another (2 cores): resident memory grew from 847 MB after the first session
to 1014 MB after 20 and about 1020 MB after 50, with no Python object left behind (gc census flat)
and the growth all in new arena mappings; ``malloc_trim`` after each session did not give it back.
With two arenas it was 814 MB after the first and 854 MB after 30 (+5 %).

So a server limits glibc to ``ARENAS`` arenas, unless ``$MALLOC_ARENA_MAX`` says otherwise. Threads
then share arenas (their small blocks still come from per-thread caches, without a lock; large
arrays are mapped and unmapped directly). glibc fixes its limit once the ninth arena would be made,
so this must run early, before the sessions' threads exist; elsewhere than glibc it does nothing.

A closed session is also garbage in reference cycles: aiortc's peer connection is full of them
(event emitters holding bound methods, transports holding each other), and with it go the tracks,
the decoders and their FFmpeg threads, and the session they fed. Python frees cycles only in a full
pass of its collector, which in a process of half a million objects (the models, torch, mediapipe)
runs rarely, every few dozen sessions, and then stalls every thread for about 0.3 s (2 cores). In a
soak the server kept every closed session until then: +2.8 GB/hour of resident memory and two more
threads per session. So a server freezes what it loaded before serving (``gc.freeze``: those objects
live as long as the process, and no pass looks at them again) and collects once after each
session or peer closes (``CycleCollector``), a pass over only what was made since: a few ms.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import platform
import time

log = logging.getLogger(__name__)

ARENAS = 2
M_ARENA_MAX = -8  # glibc's malloc.h


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Ask glibc for at most ``arenas`` malloc arenas; True when it agreed."""
    if os.environ.get("MALLOC_ARENA_MAX") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        agreed = bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
    if not agreed:
        log.warning("glibc refused to limit its malloc arenas to %d", arenas)
    return agreed


def freeze_loaded_objects() -> None:
    """Collect what start-up left over, and keep every object alive now out of later passes."""
    gc.collect()
    gc.freeze()


def thaw_loaded_objects() -> None:
    """Undo ``freeze_loaded_objects`` when the server stops: frozen objects are not freed at exit,
    and extensions that count theirs (triton's nanobind) then print leak reports."""
    gc.unfreeze()


class CycleCollector:
    """A collector pass shortly after sessions close: one for several that close together."""

    def __init__(self, delay: float = 1.0) -> None:
        self._delay = delay  # a peer's tasks end on the loop after close() returns
        self._pending: asyncio.TimerHandle | None = None
        self.seconds = 0.0  # spent in passes, all threads stopped

    def closed(self, *_) -> None:
        """Note that a session or peer closed (any arguments are ignored: a closed-callback)."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self._delay, self._collect)

    def _collect(self) -> None:
        self._pending = None
        started = time.perf_counter()
        freed = gc.collect()
        took = time.perf_counter() - started
        self.seconds += took
        log.debug("collected %d objects in %.1f ms", freed, 1000 * took)

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
