"""glibc malloc settings for long-lived processes that move large buffers (workers, the backup
coordinator, the WAL helpers).

Two glibc defaults hold on to memory that Python has freed:

- each thread allocates from an arena of its own (up to 8 per core), and an arena keeps the
  chunks freed in it for later allocations of that thread;
- the mmap threshold is dynamic: after a freed mmap'd block (e.g. one 16 MiB part), glibc raises
  the threshold up to 32 MiB, so the next parts come from an arena's heap, and a heap is
  returned to the system only from its top.

A worker uploading parts on the threads pool thus kept ~125 MB after its first backup, against
~86 MB idle with boto3 loaded (bench-peers prod backup). ``tune_malloc`` fixes the threshold
at glibc's initial 128 KiB (``M_MMAP_THRESHOLD``: large buffers are mapped and unmapped, as
``MALLOC_MMAP_THRESHOLD_=131072`` would) and, with ``arenas``, limits the arenas
(``M_ARENA_MAX``, as ``MALLOC_ARENA_MAX``). Source: mallopt(3).
"""

from __future__ import annotations

import contextlib

M_MMAP_THRESHOLD = -3  # malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024


def tune_malloc(arenas: int | None = None) -> None:
    """Apply the settings above to this process; nothing where the C library is not glibc."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        if arenas is not None:
            libc.mallopt(M_ARENA_MAX, arenas)
