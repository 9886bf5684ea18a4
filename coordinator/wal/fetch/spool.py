"""wal-fetch's spool in ``<pg_wal>/cloud-dump``: prefetched segments with their sidecars, the
prefetcher's plan, the end-of-archive memory and the cached identity.

Written by the detached prefetcher; read by the wal-fetch calls through the served path's
functions (``coordinator.wal.fetch.served``, which defines the names and what a spooled file
promises).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from coordinator.background import make_spool_dir
from coordinator.wal.fetch import served
from coordinator.wal.fetch.served import archive_source
from coordinator.wal.spooldir import wal_spool_dir
from storage.errors import ConfigError
from storage.fsutil import TEMP_PREFIX, write_atomically
from storage.walnames import DEFAULT_SEGMENT_SIZE, following_names, is_segment_size

log = logging.getLogger(__name__)
__all__ = ["Spool", "archive_source", "following_segments", "spool_root_for"]


def following_segments(file_name: str, count: int, segment_bytes: int | None) -> list[str]:
    """Names of the ``count`` segments after ``file_name`` on its timeline; none if it is not a
    segment name.

    The segment size is the served file's length when that is a valid segment size, else
    PostgreSQL's default: a wrong guess can only name a segment that does not exist, which ends
    prefetching early.
    """
    size = DEFAULT_SEGMENT_SIZE
    if segment_bytes and is_segment_size(segment_bytes):
        size = segment_bytes
    try:
        return following_names(file_name, count, size)
    except ConfigError:
        return []


def spool_root_for(destination: str, spool_dir: str | None) -> Path | None:
    """The spool of a call writing ``destination`` (``%p``); None: it has none.

    ``--spool-dir`` when given. Otherwise only a file going into an existing ``pg_wal``
    directory has one, ``<that pg_wal>/cloud-dump``: restore_command runs in the data directory
    with ``%p`` = ``pg_wal/RECOVERYXLOG``. A call run by hand into another directory creates
    nothing there or in its working directory (see the module docstring). The rule is wal-push's
    too: one definition, ``coordinator.wal.spooldir.wal_spool_dir``.
    """
    root = wal_spool_dir(destination, spool_dir)
    return None if root is None else Path(root)


# --- the spool -----------------------------------------------------------------------------------


class Spool:
    """Prefetched segments of one restore, the prefetcher's plan and lock, the cached identity.

    ``prefetch/<segment>`` and its sidecar ``prefetch/<segment>.sidecar``; ``prefetch-plan``:
    the segments the running prefetcher still means to deliver, with its pid. See the module
    docstrings of this module and of ``coordinator.wal.fetch.helper``.
    """

    def __init__(self, root: Path, source: str) -> None:
        self.root = root
        self.source = source
        self.prefetch_dir = root / served.PREFETCH_DIR
        self.lock_path = root / served.LOCK_NAME
        self.log_path = root / "prefetch.log"
        self._plan_path = root / served.PLAN_NAME

    def has(self, name: str) -> bool:
        """Whether ``name`` is spooled (its sidecar, written last, is there)."""
        return self._sidecar(name).is_file()

    def take(self, name: str, destination: Path) -> int | None:
        """Move spooled ``name`` to ``destination``; its size, or None if it is not spooled
        (``served.take``: a file unfit to serve is discarded)."""
        return served.take(str(self.root), self.source, name, str(destination))

    def discard_unfinished(self, name: str) -> None:
        """Remove a data file of ``name`` left without a sidecar by a prefetcher that stopped."""
        if (self.prefetch_dir / name).exists() and not self.being_prefetched(name):
            log.warning("discarding spooled '%s': it has no sidecar", name)
            self._remove(name)

    def put(self, name: str, write: Callable[[IO[bytes]], tuple[int, str]]) -> None:
        """Spool ``name``: ``write(f)`` fills its data file and returns its size and SHA-256,
        having verified them (it raises otherwise, and nothing is spooled). Then its sidecar,
        with the boot id: see ``coordinator.wal.fetch.served`` for why neither is fsynced
        (both are where the boot id cannot be read)."""
        self._make_dir(self.prefetch_dir)
        boot = served.boot_id()
        verified: list[tuple[int, str]] = []

        def fill(f: IO[bytes]) -> None:
            verified.append(write(f))

        write_atomically(self.prefetch_dir / name, fill, sync=boot is None)
        sidecar = served.sidecar_text(*verified[0], self.source, boot)
        write_atomically(self._sidecar(name), sidecar, sync=boot is None)

    def remove_temp_files(self) -> None:
        """Drop what a stopped writer left (only the prefetcher, holding the lock, calls this)."""
        with contextlib.suppress(FileNotFoundError):
            for path in self.prefetch_dir.iterdir():
                if path.name.startswith(TEMP_PREFIX):
                    path.unlink(missing_ok=True)

    def _make_dir(self, directory: Path) -> None:
        make_spool_dir(self.root, directory)

    def _sidecar(self, name: str) -> Path:
        return self.prefetch_dir / f"{name}{served.SIDECAR_SUFFIX}"

    def _remove(self, name: str) -> None:
        served.remove(str(self.root), name)

    def entries(self) -> Iterator[str]:
        """Segments with a data file or a sidecar in the spool."""
        yield from served.entries(str(self.root))

    # --- the prefetcher's plan -------------------------------------------------------------------

    def write_plan(self, names: list[str]) -> None:
        """Record that this process (holding the prefetcher lock) will deliver ``names``."""
        self._make_dir(self.root)
        write_atomically(self._plan_path, served.plan_text(os.getpid(), names), sync=False)

    def clear_plan(self) -> None:
        self._plan_path.unlink(missing_ok=True)

    def being_prefetched(self, name: str) -> bool:
        """Whether a running prefetcher still means to deliver ``name``."""
        return served.being_prefetched(str(self.root), name)

    # --- end of the archive, cached identity -----------------------------------------------------

    def mark_end_of_archive(self, name: str) -> None:
        """Remember that ``name`` was not archived yet, so that the next few calls do not start
        a prefetcher for it or what follows it (only prefetching relies on this)."""
        with contextlib.suppress(OSError):
            self._make_dir(self.root)
            write_atomically(self.root / served.END_OF_ARCHIVE_NAME, name.encode(), sync=False)

    def recent_end_of_archive(self) -> str | None:
        return served.recent_end_of_archive(str(self.root))

    @property
    def _identity_path(self) -> Path:
        return self.root / "identity.key"

    def cached_identity(self) -> str | None:
        try:
            text = self._identity_path.read_text().strip()
        except OSError:
            return None
        return text if text.startswith("AGE-SECRET-KEY-1") else None

    def cache_identity(self, identity: str) -> None:
        self._make_dir(self.root)
        write_atomically(self._identity_path, (identity + "\n").encode(), sync=False)
