"""wal-push's local spool: confirmation markers, the cached archive identity, look-ahead choice.

Layout (default ``<PGDATA>/pg_wal/cloud-dump/``: archive_command runs as the server's OS user,
which owns pg_wal, and BASE_BACKUP leaves pg_wal's contents out, so the spool never lands in a
backup or a restored cluster)::

    archived/<WAL file name>   "<raw sha256> <location>": written only after storage confirmed
    archive.json               {"location": ..., "info": WalArchiveInfo as JSON}

A marker is what lets a later invocation answer "already archived" without starting Celery,
boto3 or reading the segment (pgBackRest's async archiving does the same with its ``.ok``
files): PostgreSQL never changes a file once it is marked ``.ready``. The marker names the
archive location it was confirmed for, so pointing wal-push at another store or prefix pushes
again instead of trusting a marker that speaks of a different archive.

This module is on the fast path of every archive_command call: at import it loads only
standard library modules the CLI has already loaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

MARKER_DIR = "archived"
ARCHIVE_CACHE_NAME = "archive.json"
_TMP_PREFIX = ".tmp-"


def archive_location(storage_url: str | None, cluster: str | None, wal_prefix: str | None) -> str:
    """A one-line name of the archive a push goes to (no credentials: URLs carry none)."""
    return f"{storage_url or '-'}|{cluster or '-'}|{(wal_prefix or 'wal_archive').strip('/')}"


def default_spool_dir(wal_path: str) -> Path:
    """``pg_wal/cloud-dump`` beside the WAL file (``%p`` is ``pg_wal/<name>`` under PGDATA)."""
    return Path(wal_path).parent / "cloud-dump"


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def marker_path(self, file_name: str) -> Path:
        # A cheap guard: the name becomes a path. Only validated names ever get a marker
        # (``confirm``), so an odd name merely finds none.
        if "/" in file_name or file_name in ("", ".", ".."):
            raise ValueError(f"invalid WAL file name '{file_name}'")
        return self.directory / MARKER_DIR / file_name

    def is_confirmed(self, file_name: str, location: str) -> bool:
        """Whether storage confirmed ``file_name`` for this archive location."""
        try:
            text = self.marker_path(file_name).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return False
        return text.strip().partition(" ")[2] == location

    def confirm(self, file_name: str, raw_sha256: str, location: str) -> None:
        """Record that storage confirmed ``file_name``; call only after it did."""
        from storage.walnames import wal_kind

        wal_kind(file_name)
        self._write(self.marker_path(file_name), f"{raw_sha256} {location}\n")

    def read_archive_cache(self, location: str) -> str | None:
        """The cached archive identity (JSON text) for ``location``, if any."""
        import json  # not needed on the fast path

        try:
            cached = json.loads((self.directory / ARCHIVE_CACHE_NAME).read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(cached, dict) or cached.get("location") != location:
            return None
        info = cached.get("info")
        return json.dumps(info) if isinstance(info, dict) else None

    def write_archive_cache(self, location: str, info_json: str) -> None:
        import json

        text = json.dumps({"location": location, "info": json.loads(info_json)})
        self._write(self.directory / ARCHIVE_CACHE_NAME, text + "\n")

    def prune(self, keep: Callable[[str], bool]) -> None:
        """Remove markers whose file name ``keep`` rejects (files PostgreSQL has recycled)."""
        with contextlib.suppress(FileNotFoundError):
            for marker in (self.directory / MARKER_DIR).iterdir():
                if not marker.name.startswith(_TMP_PREFIX) and not keep(marker.name):
                    marker.unlink(missing_ok=True)

    def _write(self, path: Path, text: str) -> None:
        """Write atomically (temp file + rename): a reader sees the old text or the new one.

        No fsync: a marker lost in a crash only costs one more (idempotent) push, and a torn
        one fails the location comparison.
        """
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
        tmp.write_text(text)
        tmp.replace(path)


def ready_names(archive_status_dir: Path) -> list[str]:
    """WAL file names PostgreSQL has marked ``.ready`` (read only: PostgreSQL owns them)."""
    try:
        entries = [entry.name for entry in archive_status_dir.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [e.removesuffix(".ready") for e in entries if e.endswith(".ready")]


def select_look_ahead(
    own_name: str, ready: Iterable[str], limit: int, confirmed: Callable[[str], bool]
) -> list[str]:
    """Up to ``limit`` ready segments that come after ``own_name``, oldest first.

    Only plain segments: PostgreSQL archives a ``.history`` file before the segments of its
    timeline anyway, and ``.partial``/``.backup`` files are rare. Names that are not WAL file
    names, or are already confirmed, are skipped.
    """
    from storage.errors import ConfigError
    from storage.walnames import wal_kind

    if limit <= 0:
        return []
    chosen: list[str] = []
    for name in sorted(set(ready)):
        if len(chosen) >= limit:
            break
        if name <= own_name:
            continue
        try:
            if wal_kind(name) != "segment":
                continue
        except ConfigError:
            continue
        if not confirmed(name):
            chosen.append(name)
    return chosen
