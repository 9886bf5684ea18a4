"""wal-push's local spool: confirmation markers, requests and errors, the cached archive identity.

Layout (default ``<PGDATA>/pg_wal/cloud-dump/``: archive_command runs as the server's OS user,
which owns pg_wal, and BASE_BACKUP leaves pg_wal's contents out, so the spool never lands in a
backup or a restored cluster)::

    archived/<WAL file name>   "<raw sha256> <location>": written only after storage confirmed
    requests/<WAL file name>   the absolute path of a file a wal-push call is waiting for
    errors/<WAL file name>     {"type": ..., "message": ...}: why the WAL pusher could not
                               push it; the waiting call reports it and removes it
    archive.json               {"location": ..., "info": WalArchiveInfo as JSON}
    pusher.lock, pusher.log    the detached WAL pusher (``coordinator.walpushd``)

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

from coordinator.fastpath import MARKER_DIR, archive_location

__all__ = ["MARKER_DIR", "Spool", "archive_location"]

REQUEST_DIR = "requests"
ERROR_DIR = "errors"
PUSHER_LOCK = "pusher.lock"
PUSHER_LOG = "pusher.log"
ARCHIVE_CACHE_NAME = "archive.json"
_TMP_PREFIX = ".tmp-"


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

    def request(self, file_name: str, path: Path) -> None:
        """Ask the WAL pusher for ``file_name``, read from ``path`` (absolute)."""
        self._write(self._entry(REQUEST_DIR, file_name), f"{path}\n")

    def requested(self) -> dict[str, Path]:
        """The files wal-push calls are waiting for, by name."""
        found = {}
        for entry in self._names(REQUEST_DIR):
            with contextlib.suppress(OSError):
                found[entry] = Path(self._entry(REQUEST_DIR, entry).read_text().strip())
        return found

    def clear_request(self, file_name: str) -> None:
        self._entry(REQUEST_DIR, file_name).unlink(missing_ok=True)

    def write_error(self, file_name: str, error: BaseException) -> None:
        """Record why ``file_name`` could not be pushed, for the call that waits for it."""
        import json

        kind = "OSError" if isinstance(error, OSError) else type(error).__name__
        text = json.dumps({"type": kind, "message": str(error)})
        self._write(self._entry(ERROR_DIR, file_name), text + "\n")

    def has_error(self, file_name: str) -> bool:
        return self._entry(ERROR_DIR, file_name).exists()

    def take_error(self, file_name: str) -> BaseException | None:
        """The recorded error for ``file_name`` as an exception to raise (and forget it)."""
        import json

        path = self._entry(ERROR_DIR, file_name)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            record = {}
        path.unlink(missing_ok=True)
        return rebuild_error(str(record.get("type", "")), str(record.get("message", "")))

    def clear_error(self, file_name: str) -> None:
        self._entry(ERROR_DIR, file_name).unlink(missing_ok=True)

    def _entry(self, kind: str, file_name: str) -> Path:
        self.marker_path(file_name)  # the same guard on the name
        return self.directory / kind / file_name

    def _names(self, kind: str) -> list[str]:
        try:
            entries = list((self.directory / kind).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [e.name for e in entries if not e.name.startswith(_TMP_PREFIX)]

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


def rebuild_error(kind: str, message: str) -> BaseException:
    """The project error named ``kind`` (an ``OSError`` for local I/O), for the exit code."""
    from storage import errors

    if kind == "OSError":
        return OSError(message)
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.CloudDumpError):
        return cls(message)
    return errors.CloudDumpError(message or "the WAL pusher failed without saying why")


def archive_order(name: str) -> tuple[bool, str]:
    """PostgreSQL's archiver order: timeline history files first, then the oldest file."""
    return (not name.endswith(".history"), name)


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
    from storage.walnames import kind_of

    if limit <= 0:
        return []
    chosen: list[str] = []
    for name in sorted(set(ready)):
        if len(chosen) >= limit:
            break
        if name > own_name and kind_of(name) == "segment" and not confirmed(name):
            chosen.append(name)
    return chosen
