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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

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
