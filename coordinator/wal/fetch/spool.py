"""wal-fetch's spool in ``<pg_wal>/cloud-dump``: prefetched segments with their sidecars, the
prefetcher's plan, the end-of-archive memory and the cached identity.

Read by every wal-fetch call (the served path), written by the detached prefetcher.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from coordinator.background import make_spool_dir
from coordinator.wal.spooldir import wal_spool_dir
from storage.errors import ConfigError
from storage.fsutil import TEMP_PREFIX, move, write_atomically
from storage.walnames import (
    DEFAULT_SEGMENT_SIZE,
    following_names,
    is_segment,
    is_segment_size,
    timeline_prefix,
)

log = logging.getLogger(__name__)
END_OF_ARCHIVE_MEMORY_S = 10.0


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


def archive_source(storage: str, cluster: str | None, wal_prefix: str | None) -> str:
    """Names the archive in spooled files' sidecars: the storage URL and the WAL prefix settings.

    Built from the settings rather than from ``Layout`` (whose import a served call avoids): two
    spellings of one archive only cost a fetch again, two archives never share a name.
    """
    return f"{storage}#{cluster or ''}#{wal_prefix or ''}"


# --- the spool -----------------------------------------------------------------------------------


class Spool:
    """Prefetched segments of one restore, the prefetcher's plan and lock, the cached identity.

    ``prefetch/<segment>`` and its sidecar ``prefetch/<segment>.json``; ``prefetch-plan.json``:
    the segments the running prefetcher still means to deliver, with its pid. See the module
    docstrings of this module and of ``coordinator.wal.fetch.helper``.
    """

    def __init__(self, root: Path, source: str) -> None:
        self.root = root
        self.source = source
        self.prefetch_dir = root / "prefetch"
        self.lock_path = root / "prefetch.lock"
        self.log_path = root / "prefetch.log"
        self._plan_path = root / "prefetch-plan.json"

    def has(self, name: str) -> bool:
        """Whether ``name`` is spooled (its sidecar, written last, is there)."""
        return self._sidecar(name).is_file()

    def take(self, name: str, destination: Path) -> int | None:
        """Move spooled ``name`` to ``destination``; its size, or None if it is not spooled."""
        try:
            facts = json.loads(self._sidecar(name).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            facts = None
        path = self.prefetch_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = None
        if size is None:
            problem = "its sidecar has no data file"
        elif not isinstance(facts, dict):
            problem = "its sidecar is not valid"
        elif facts.get("source") != self.source:
            problem = "it was fetched from another archive"
        elif facts.get("size") != size:
            problem = f"it holds {size} bytes, its sidecar says {facts.get('size')}"
        else:
            move(path, destination)
            self._remove(name)
            self._prune_before(name)
            return size
        log.warning("discarding spooled '%s': %s", name, problem)
        self._remove(name)
        return None

    def discard_unfinished(self, name: str) -> None:
        """Remove a data file of ``name`` left without a sidecar by a prefetcher that stopped."""
        if (self.prefetch_dir / name).exists() and not self.being_prefetched(name):
            log.warning("discarding spooled '%s': it has no sidecar", name)
            self._remove(name)

    def put(self, name: str, data: bytes, raw_sha256: str) -> None:
        """Spool verified ``data``: the data file, fsynced, then its sidecar, so that a sidecar
        always means a complete, durable data file."""
        self._make_dir(self.prefetch_dir)
        write_atomically(self.prefetch_dir / name, data)
        facts = {"raw_sha256": raw_sha256, "size": len(data), "source": self.source}
        write_atomically(self._sidecar(name), json.dumps(facts).encode(), sync=False)

    def count_ahead(self, name: str) -> int:
        """How many segments after ``name`` on its timeline are spooled or being written."""
        timeline = timeline_prefix(name)
        return sum(
            1 for entry in self.entries() if timeline_prefix(entry) == timeline and entry > name
        )

    def remove_temp_files(self) -> None:
        """Drop what a stopped writer left (only the prefetcher, holding the lock, calls this)."""
        with contextlib.suppress(FileNotFoundError):
            for path in self.prefetch_dir.iterdir():
                if path.name.startswith(TEMP_PREFIX):
                    path.unlink(missing_ok=True)

    def _make_dir(self, directory: Path) -> None:
        make_spool_dir(self.root, directory)

    def _sidecar(self, name: str) -> Path:
        return self.prefetch_dir / f"{name}.json"

    def _remove(self, name: str) -> None:
        for path in (self.prefetch_dir / name, self._sidecar(name)):
            path.unlink(missing_ok=True)

    def _prune_before(self, name: str) -> None:
        """Drop spooled segments of this timeline older than ``name``: never asked for again
        (a restarted recovery re-fetches them from storage), they only hold disk space."""
        timeline = timeline_prefix(name)
        for entry in self.entries():
            if timeline_prefix(entry) == timeline and entry < name:
                self._remove(entry)

    def entries(self) -> Iterator[str]:
        """Segments with a data file or a sidecar in the spool."""
        try:
            names = {path.name.removesuffix(".json") for path in self.prefetch_dir.iterdir()}
        except FileNotFoundError:
            return
        yield from (name for name in names if is_segment(name))

    # --- the prefetcher's plan -------------------------------------------------------------------

    def write_plan(self, names: list[str]) -> None:
        """Record that this process (holding the prefetcher lock) will deliver ``names``."""
        plan = {"pid": os.getpid(), "names": names}
        self._make_dir(self.root)
        write_atomically(self._plan_path, json.dumps(plan).encode(), sync=False)

    def clear_plan(self) -> None:
        self._plan_path.unlink(missing_ok=True)

    def being_prefetched(self, name: str) -> bool:
        """Whether a running prefetcher still means to deliver ``name``."""
        try:
            plan = json.loads(self._plan_path.read_bytes())
        except (OSError, ValueError):
            return False
        if not isinstance(plan, dict) or name not in plan.get("names", ()):
            return False
        from coordinator.background import helper_pid

        # A plan left by a prefetcher that died is not its successor's.
        return helper_pid(self.lock_path) == plan.get("pid")

    # --- end of the archive, cached identity -----------------------------------------------------

    def mark_end_of_archive(self, name: str) -> None:
        """Remember that ``name`` was not archived yet, so that the next few calls do not start
        a prefetcher for it or what follows it (only prefetching relies on this)."""
        with contextlib.suppress(OSError):
            self._make_dir(self.root)
            write_atomically(self.root / "end-of-archive", name.encode(), sync=False)

    def recent_end_of_archive(self) -> str | None:
        path = self.root / "end-of-archive"
        try:
            if time.time() - path.stat().st_mtime < END_OF_ARCHIVE_MEMORY_S:
                return path.read_text().strip()
        except OSError:
            pass
        return None

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


