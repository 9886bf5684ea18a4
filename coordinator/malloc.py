"""glibc malloc settings for long-lived processes that move large buffers (workers, the backup
coordinator, the WAL helpers).

Two glibc defaults hold on to memory that Python has freed:

- each thread allocates from an arena of its own (up to 8 per core), and an arena keeps the
  chunks freed in it for later allocations of that thread;
- the mmap threshold is dynamic: after a freed mmap'd block (e.g. one 16 MiB part), glibc raises
  the threshold up to 32 MiB, so the next parts come from an arena's heap, and a heap is
  returned to the system only from its top.

A worker uploading parts on the threads pool thus kept ~125 MB after its first backup, against
~86 MB idle with boto3 loaded (bench-peers prod backup), when it read each 16 MiB part whole.
``tune_malloc`` fixes both thresholds instead of letting them float (mallopt(3)):

- ``M_MMAP_THRESHOLD`` at ``MMAP_THRESHOLD_BYTES``, above the largest buffer a worker holds
  whole (a WAL file as staged: one segment, 16 MiB at most; parts are read in 1 MiB slices).
  Below it, a buffer's memory is reused from one task to the next. It was glibc's initial
  128 KiB until measured: every staged WAL file, its reply slices and socket reads were then
  mapped, faulted in page by page and unmapped, ~14,000 page faults and 31 ms of system CPU
  for one 7 MiB WAL push (1 ms at this threshold), in a process whose CPU is what limits WAL
  archiving (bench-peers prod WAL: workers were a quarter of the host's CPU).
- ``M_TRIM_THRESHOLD`` at twice that, glibc's own ratio when it raises the threshold: the free
  top of a heap is kept up to that size (one WAL file's worth and its copies), not returned
  after every task to be faulted in again by the next.

What a heap keeps free is given back by ``release_free_memory`` (``malloc_trim(0)``), which a
worker calls around every task but a WAL push, and after WAL pushes once none came for a second
(``tasks.app``): WAL pushes, which come one after another, reuse it; a backup's parts start and
end without it. Workers run with one arena (``arenas=1``, ``M_ARENA_MAX`` as
``MALLOC_ARENA_MAX``): ``malloc_trim`` gives back the free top of the main arena's heap but not
of a thread's arena, where the pool thread's buffers stayed (a worker kept 120 MB after a burst
of prod WAL pushes, 100 MB once given back). Measured on the bench-peers prod backup: a
worker's peak 101 MB (106 MB with the thresholds alone), its parts' CPU 1.0 s against 2.1 s
with the 128 KiB threshold.
"""

from __future__ import annotations

import ctypes

from storage.kernelsync import libc_function

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 17 * 1024 * 1024  # a 16 MiB WAL segment and its object header fit
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES


def release_free_memory() -> None:
    """Give the memory this process's heaps hold free back to the system (``malloc_trim(0)``,
    which since glibc 2.8 also releases free pages inside a heap, not only at its top)."""
    malloc_trim = libc_function("malloc_trim", ctypes.c_size_t)
    if malloc_trim is not None:
        malloc_trim(0)


def tune_malloc(arenas: int | None = None) -> None:
    """Apply the settings above to this process; nothing where the C library is not glibc."""
    mallopt = libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    if arenas is not None:
        mallopt(M_ARENA_MAX, arenas)
