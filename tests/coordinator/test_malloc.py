"""coordinator.malloc: a buffer the size a worker holds whole is reused between tasks, not
mapped and faulted in afresh each time (the CPU that cost: coordinator.malloc's docstring)."""

from __future__ import annotations

import subprocess
import sys

# Allocates and frees a staged-WAL-sized buffer (7 MiB, written whole as a payload is) 20 times
# after a warm-up, in a second thread as a worker's task runs; prints the page faults of those
# 20 rounds.
_ROUNDS = """
import ctypes, resource, sys, threading
from coordinator.malloc import M_MMAP_THRESHOLD, tune_malloc
from storage.kernelsync import libc_function
if sys.argv[1] == "tuned":
    tune_malloc()
else:  # the setting before it was measured: glibc's initial threshold, fixed
    libc_function("mallopt", ctypes.c_int, ctypes.c_int)(M_MMAP_THRESHOLD, 128 * 1024)
faults = []
def task():
    for i in range(23):
        if i == 3:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        payload = bytearray(b"x" * (7 * 1024 * 1024))
        del payload
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
thread = threading.Thread(target=task)
thread.start()
thread.join()
print(faults[1] - faults[0])
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return int(out)


def test_a_worker_sized_buffer_is_reused_not_faulted_in_again() -> None:
    # 7 MiB is 1,792 pages: mapped afresh, each round faults in two copies' worth (the bytes
    # literal and the bytearray).
    assert _faults("fixed-128k") > 20 * 1792
    assert _faults("tuned") < 200


_RELEASE = """
from coordinator.malloc import release_free_memory, tune_malloc
tune_malloc()
def rss_kb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])
# 1 MiB buffers, below the threshold: on the heap. Every other one is freed, so the free ones
# sit between live ones, where only malloc_trim gives them back.
buffers = [bytearray(b"x" * (1024 * 1024)) for _ in range(64)]
del buffers[::2]
before = rss_kb()
release_free_memory()
print(before - rss_kb())
"""


def test_release_gives_back_what_the_heap_holds_free() -> None:
    out = subprocess.run([sys.executable, "-c", _RELEASE], check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    assert int(out) > 16 * 1024  # of the 32 MiB freed, in kB

