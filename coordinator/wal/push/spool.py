"""wal-push's local spool: confirmation markers, requests and errors, the cached archive identity.

Where: ``--spool-dir`` when given, else ``<pg_wal>/cloud-dump/`` when ``%p`` is in a ``pg_wal``
directory (archive_command runs in PGDATA as the server's OS user, which owns pg_wal, and
BASE_BACKUP leaves pg_wal's contents out, so the spool never lands in a backup or a restored
cluster). A call on a file anywhere else (run by hand) has no spool (``NoSpool``): no markers,
no pusher, no directory created. Layout::

    archived/<WAL file name>   "2 <raw sha256> <size> <dev> <inode> <mtime_ns> <ctime_ns>
                               <location>": written only after storage confirmed the file
                               with that identity (``coordinator.wal.push.marker.marker_text``)
    requests/<WAL file name>   the absolute path of a file a wal-push call is waiting for
    errors/<WAL file name>     {"type": ..., "message": ...}: why the WAL pusher could not
                               push it; the waiting call reports it and removes it
    look-ahead                 "open|closed [<barrier>]": whether files may be pushed ahead of
                               PostgreSQL's calls (``LookAhead``)
    archive.json               {"location": ..., "info": WalArchiveInfo as JSON}
    pusher.lock, pusher.log    the detached WAL pusher (``coordinator.wal.push.helper``)

A marker is what lets a later invocation answer "already archived" without starting Celery,
boto3 or reading the segment (pgBackRest's async archiving does the same with its ``.ok``
files). It answers only for the file it confirmed: the identity was taken (``fstat``) from the
open file that was read and pushed, and a call trusts the marker only when ``stat`` of ``%p``
gives the same identity. PostgreSQL never changes a file once it is marked ``.ready``, but a
file put there by someone else (a restored copy writing its own WAL under the same names, an
operator copying files back) must be pushed, so that the worker compares its content and
refuses different bytes (exit 17) instead of a marker answering 0 and PostgreSQL recycling a
file that was never stored. The marker also names the archive location it was confirmed for,
so pointing wal-push at another store or prefix pushes again.

Look-ahead (``LookAhead``). Files pushed ahead of PostgreSQL's calls cannot be taken back: after
a cluster's push was refused (another cluster's WAL under the same names, e.g. a restored copy
archiving into its source's archive), pushing its later files would make the rightful owner's
own pushes of those names fail for good. So look-ahead is closed until a file PostgreSQL asked
for is newly stored ("already archived" does not count: a copy re-pushing its source's identical
segments proves nothing), closes again on any failure, and never reaches the earliest file whose
push failed (the barrier) until PostgreSQL itself has got that file confirmed.

This module is on the fast path of every archive_command call: at import it loads only
standard library modules the CLI has already loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from coordinator.background import make_spool_dir
from coordinator.wal.push.marker import (
    ERROR_DIR,
    MARKER_DIR,
    PUSHER_LOCK,
    REQUEST_DIR,
    TMP_PREFIX,
    archive_location,
    file_identity,
    marker_answers,
    marker_text,
)
from coordinator.wal.spooldir import wal_spool_dir
from storage.fsutil import write_atomically

if TYPE_CHECKING:

    from workers.wal import PushWalResult

    Outcome = PushWalResult | BaseException

__all__ = [
    "MARKER_DIR",
    "PUSHER_LOCK",
    "LookAhead",
    "NoSpool",
    "Spool",
    "archive_location",
    "file_identity",
]

LOOK_AHEAD_NAME = "look-ahead"
PUSHER_LOG = "pusher.log"
ARCHIVE_CACHE_NAME = "archive.json"


def open_spool(wal_path: str, spool_dir: str | None) -> Spool:
    """The spool of a wal-push of ``wal_path``: ``NoSpool`` outside a ``pg_wal`` directory
    without ``--spool-dir`` (see ``coordinator.wal.spooldir.wal_spool_dir``)."""
    directory = wal_spool_dir(wal_path, spool_dir)
    return NoSpool() if directory is None else Spool(Path(directory))


class LookAhead(NamedTuple):
    """Whether files may be pushed ahead of PostgreSQL's calls, and how far.

    ``barrier``: the earliest file (archiver order) whose push failed and that PostgreSQL has
    not got confirmed since; look-ahead never takes it or anything after it.
    """

    open: bool
    barrier: str | None

    def allows(self, name: str) -> bool:
        return self.open and (
            self.barrier is None or archive_order(name) < archive_order(self.barrier)
        )


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def exists(self) -> bool:
        """False for ``NoSpool``: nothing is recorded, no pusher can serve it."""
        return True

    def marker_path(self, file_name: str) -> Path:
        # A cheap guard: the name becomes a path. Only validated names ever get a marker
        # (``confirm``), so an odd name merely finds none.
        if "/" in file_name or file_name in ("", ".", ".."):
            raise ValueError(f"invalid WAL file name '{file_name}'")
        return self.directory / MARKER_DIR / file_name

    def is_confirmed(self, file_name: str, location: str, path: Path) -> bool:
        """Whether storage confirmed the file now at ``path`` as ``file_name`` for this archive
        location: a marker of this location whose identity ``stat`` of ``path`` still gives."""
        try:
            text = self.marker_path(file_name).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return False
        return marker_answers(text, str(path), location)

    def confirm(self, file_name: str, raw_sha256: str, identity: str, location: str) -> None:
        """Record that storage confirmed ``file_name``; call only after it did.

        ``identity`` (``file_identity``) is of the open file that was read and pushed.
        """
        from storage.walnames import wal_kind

        wal_kind(file_name)
        self._write(self.marker_path(file_name), marker_text(raw_sha256, identity, location))

    def look_ahead(self) -> LookAhead:
        """The recorded look-ahead state; closed when none is recorded (or it is unreadable)."""
        try:
            fields = (self.directory / LOOK_AHEAD_NAME).read_text().split()
        except (FileNotFoundError, NotADirectoryError):
            fields = []
        barrier = fields[1] if len(fields) == 2 else None
        return LookAhead(bool(fields) and fields[0] == "open", barrier)

    def close_look_ahead(self, failed: str | None) -> None:
        """Push nothing ahead any more; ``failed`` (a file whose push failed) becomes the
        barrier if it comes before the recorded one."""
        barrier = self.look_ahead().barrier
        if failed is not None and (
            barrier is None or archive_order(failed) < archive_order(barrier)
        ):
            barrier = failed
        self._write_look_ahead(LookAhead(False, barrier))

    def open_look_ahead(self, confirmed: str) -> None:
        """Storage confirmed ``confirmed``, a file PostgreSQL asked for, pushed after the last
        failure: look-ahead may resume, up to the barrier unless PostgreSQL is at or past it."""
        barrier = self.look_ahead().barrier
        if barrier is not None and archive_order(confirmed) >= archive_order(barrier):
            barrier = None
        self._write_look_ahead(LookAhead(True, barrier))

    def _write_look_ahead(self, state: LookAhead) -> None:
        words = ["open" if state.open else "closed", *([state.barrier] if state.barrier else [])]
        self._write(self.directory / LOOK_AHEAD_NAME, " ".join(words) + "\n")

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
        return [e.name for e in entries if not e.name.startswith(TMP_PREFIX)]

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
                if not marker.name.startswith(TMP_PREFIX) and not keep(marker.name):
                    marker.unlink(missing_ok=True)

    def _write(self, path: Path, text: str) -> None:
        """Write atomically (temp file + rename): a reader sees the old text or the new one.

        No fsync: a marker lost in a crash only costs one more (idempotent) push, and a torn
        one fails the location comparison. Mode: 0666 less the umask (the spool's directories are
        0700). Temporary names start with ``TMP_PREFIX``, which readers skip.
        Raises ``OSError`` naming ``path``.
        """
        make_spool_dir(self.directory, path.parent)
        write_atomically(path, text, mode=None, sync=False, temp_prefix=TMP_PREFIX)


class NoSpool(Spool):
    """No spool (a call run by hand on a file outside ``pg_wal``): nothing is read or written,
    no marker answers, no look-ahead, and the call pushes its own file synchronously."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent-cloud-dump-spool"))

    @property
    def exists(self) -> bool:
        return False

    def is_confirmed(self, file_name: str, location: str, path: Path) -> bool:
        return False

    def confirm(self, file_name: str, raw_sha256: str, identity: str, location: str) -> None:
        return None

    def look_ahead(self) -> LookAhead:
        return LookAhead(False, None)

    def _write(self, path: Path, text: str) -> None:
        return None

    def read_archive_cache(self, location: str) -> str | None:
        return None

    def prune(self, keep: Callable[[str], bool]) -> None:
        return None


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
    own_name: str,
    ready: Iterable[str],
    limit: int,
    confirmed: Callable[[str], bool],
    state: LookAhead,
) -> list[str]:
    """Up to ``limit`` ready segments that come after ``own_name``, oldest first, that
    ``state`` allows (none while closed, none from its barrier on).

    Only plain segments: PostgreSQL archives a ``.history`` file before the segments of its
    timeline anyway, and ``.partial``/``.backup`` files are rare. Names that are not WAL file
    names, or are already confirmed (``confirmed`` must check the marker against the file), are
    skipped.
    """
    from storage.walnames import kind_of

    if limit <= 0 or not state.open:
        return []
    chosen: list[str] = []
    for name in sorted(set(ready)):
        if len(chosen) >= limit or not state.allows(name):
            break
        if name > own_name and kind_of(name) == "segment" and not confirmed(name):
            chosen.append(name)
    return chosen


def prune_markers(spool: Spool, wal_dir: Path) -> None:
    """Drop markers of files no longer in pg_wal: PostgreSQL will not ask for them again."""
    try:
        present = {entry.name for entry in wal_dir.iterdir()}
    except OSError:
        return
    spool.prune(lambda name: name in present)
