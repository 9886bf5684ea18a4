"""Whether a detached helper (the WAL pusher, the prefetcher) is running: its lock is held.

A helper holds an ``flock`` on its lock file for its whole life (``coordinator.background.
HelperLock``). The probe is here, with ``os`` and ``fcntl`` alone, because the fast paths of
``wal-push`` and ``wal-fetch`` ask it on every call, before anything heavy is imported.
"""

from __future__ import annotations

import fcntl
import os


def lock_held(lock_path: str | os.PathLike[str]) -> bool:
    """Whether some process holds ``lock_path`` (an exclusive ``flock``) right now; False when
    the file does not exist or cannot be opened."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the probe's own lock, if it got one
    return False
