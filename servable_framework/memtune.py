"""Keep freed memory mapped, so that large messages do not page-fault (glibc only).

A 64 MiB tensor arriving on a ZMQ socket lands in a buffer libzmq mallocs for it. glibc serves any allocation
above 32 MiB with a fresh ``mmap`` and unmaps it on ``free``, so every such message touches 16,384 new pages:
on the 2-core VM that costs 40-50 ms per 64 MiB, ten times the copy itself (``np.copyto`` of 64 MiB: ~5-8 ms).
Main and its Workers therefore ask glibc (``mallopt``) for one arena (libzmq's I/O thread would otherwise
allocate from a thread arena, which cannot hold a chunk this size and mmaps it anyway), no mmap'd chunks, and a
trim threshold of ``keep_mib``: freed memory up to that size stays mapped and serves the next message. Measured
with two processes echoing 64 MiB over ``ipc://``: 80-120 ms per round trip with glibc's defaults, 30-32 ms
with this.

The price is resident memory: a process keeps up to ``keep_mib`` of freed memory (and its peak heap when
fragmentation blocks trimming) instead of handing it back to the OS. Agents are left alone (their checkpoint
loading would leave a large heap behind). Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("servable_framework.memtune")

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory(keep_mib: int) -> bool:
    """Tune this process's glibc malloc as the module docstring says; True when it took effect.

    Call it early, before the process starts threads that allocate (each such thread may already own an arena,
    which it keeps). ``keep_mib`` <= 0 leaves glibc's defaults.
    """
    if keep_mib <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # only glibc has it (and mallopt with these meanings)
        return False
    keep = min(keep_mib, 2047) * 1024 * 1024  # mallopt takes an int
    done = all(libc.mallopt(param, value) == 1
               for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, keep)))
    if not done:  # pragma: no cover - glibc accepts all three values
        log.warning("mallopt refused a setting; large messages may page-fault")
    return done
