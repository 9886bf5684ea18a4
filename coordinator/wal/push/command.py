"""``cloud-dump wal-push %p %f``: archive one WAL file, and exit 0 only once storage has it.

PostgreSQL runs archive_command once per WAL file, one at a time, and retries on failure. A call:

1. Validates the name; if the spool has a confirmation marker for this very file (its identity
   still what was pushed: ``coordinator.wal.push.spool``), returns at once. Under load this is the
   path most calls take (see 2), so nothing heavy is imported before it.
2. With a broker (and ``--look-ahead`` above 0, the default) and a spool: hands the file to the
   detached
   WAL pusher (``coordinator.wal.push.helper``), starting it if none runs, and waits until the
   pusher writes the file's marker (storage confirmed it) or its error. The pusher keeps up to
   ``--look-ahead`` files in flight on the workers, taking the next ``.ready`` files of
   ``pg_wal/archive_status`` on its own, so the calls that follow find their marker and
   return in the time it takes Python to start (pgBackRest's async archive-push works the
   same way). Only a marker returns success; an error the pusher records is raised with its
   own exit code; a pusher that stops without either is started again, twice at most.
3. Without a broker (or with ``--look-ahead 0``, or without a spool: a file outside ``pg_wal``
   and no ``--spool-dir``): pushes in this process, synchronously. The file itself first; once
   storage confirmed it, and only without a broker and with a spool, up to ``--look-ahead``
   ready files that follow it as one batch (``push_wal`` runs in threads here). Markers for
   every confirmed file.

Either way only this call's own file decides the exit status, and nothing short of a
confirmation within ``--timeout`` returns success. Look-ahead follows the spool's ``LookAhead``
state on both paths: nothing is pushed ahead of PostgreSQL before the file it asked for is
confirmed, and nothing at or past a file whose push failed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.wait import wait_until
from coordinator.wal.push.quickwait import asked_here
from coordinator.wal.push.spool import (
    PUSHER_LOCK,
    PUSHER_LOG,
    Spool,
    archive_location,
    open_spool,
    prune_markers,
    ready_names,
    select_look_ahead,
)

if TYPE_CHECKING:
    from subprocess import Popen

    from coordinator.settings import WalPushSettings
    from coordinator.wal.push.encode import RawWal
    from coordinator.wal.push.work import WalWork
    from storage.layout import Layout
    from workers.wal import PushWalResult, WalArchiveInfo

    Outcome = PushWalResult | BaseException

log = logging.getLogger(__name__)

PUSHER_MODULE = "coordinator.wal.push.helper"
# Starts of the pusher one call may make before giving up (it records its own errors, so a
# pusher that stops without a word about this file is a bug or a crash: say so, do not spin).
MAX_PUSHER_STARTS = 3
_POLL_FIRST_S = 0.001
_POLL_FACTOR = 1.5
_POLL_MAX_S = 0.02


def run_wal_push(args: WalPushSettings) -> None:
    """Archive ``args.file_name`` from ``args.path``; return only once storage confirmed it."""
    spool = open_spool(args.path, args.spool_dir)
    location = archive_location(args.storage, args.cluster, args.wal_prefix)
    name = args.file_name
    # Markers exist only for valid names, so this check needs no validation (and no import).
    if (
        "/" not in name
        and name not in ("", ".", "..")
        and spool.is_confirmed(name, location, Path(args.path))
    ):
        log.debug("WAL file '%s' is already archived (spool marker)", name)
        return
    from storage.walnames import wal_kind

    wal_kind(name)  # refuse a bad name before it touches a path or a key
    if args.broker and args.look_ahead > 0 and spool.exists:
        _push_through_pusher(args, spool, location)
    else:
        _push(args, spool, location)


# --- through the detached WAL pusher -----------------------------------------------------


def _push_through_pusher(args: WalPushSettings, spool: Spool, location: str) -> None:
    from coordinator.background import helper_running, spawn_helper
    from coordinator.settings import settings_to_json

    name = args.file_name
    path = Path(args.path).absolute()
    path.stat()  # a missing file is this call's error (exit 16), not the pusher's
    lock = spool.directory / PUSHER_LOCK
    if name not in asked_here:
        # An old failure (e.g. of a look-ahead push) is retried now. Not one the pusher
        # recorded in answer to this call's own request (coordinator.wal.push.quickwait).
        spool.clear_error(name)
    spool.request(name, path)
    settings = {
        "settings": settings_to_json(args),
        "spool_dir": str(spool.directory),
        "wal_dir": str(path.parent),
        "location": location,
    }
    child: Popen[bytes] | None = None
    starts = 0

    def confirmed() -> bool:
        """The marker is there; raises the pusher's recorded error, or when it keeps stopping.
        Starts a pusher when none runs."""
        nonlocal child, starts
        if spool.is_confirmed(name, location, path):
            return True
        if (error := spool.take_error(name)) is not None:
            spool.clear_request(name)
            raise error
        if (child is None or child.poll() is not None) and not helper_running(lock):
            if spool.is_confirmed(name, location, path):  # it confirmed, then exited
                return True
            if starts == MAX_PUSHER_STARTS:
                spool.clear_request(name)
                from storage.errors import CloudDumpError

                raise CloudDumpError(
                    f"the WAL pusher stopped without pushing '{name}': see "
                    f"{spool.directory / PUSHER_LOG}"
                )
            child = spawn_helper(PUSHER_MODULE, settings, spool.directory / PUSHER_LOG)
            starts += 1
        return False

    # From 1 ms, 1.5 times longer each time, up to 20 ms: PostgreSQL archives one file at a
    # time, so this call's latency is the archiver's pace, and a pusher that had the file in
    # flight already confirms it within milliseconds; a slow store (seconds) is looked at 50
    # times a second, a marker's stat apiece.
    if not wait_until(confirmed, timeout_s=args.timeout, first_s=_POLL_FIRST_S,
                      max_s=_POLL_MAX_S, factor=_POLL_FACTOR):  # fmt: skip
        spool.clear_request(name)
        from coordinator.broker.client import START_WORKER_HINT
        from storage.errors import NoWorkerAvailable

        raise NoWorkerAvailable(
            f"storage did not confirm WAL file '{name}' within {args.timeout:.0f} s "
            f"(see {spool.directory / PUSHER_LOG}): {START_WORKER_HINT}"
        )
    spool.clear_request(name)
    log.info("WAL file '%s' archived (confirmed by storage)", name)


# --- synchronous, in this process or one batch through the workers ------------------------


def _push(args: WalPushSettings, spool: Spool, location: str) -> None:
    from coordinator.settings import encryption_of, layout_of
    from coordinator.wal.push.encode import archive_for, read_wal, recipients_for
    from coordinator.wal.push.work import open_work

    layout = layout_of(args)
    encryption = encryption_of(args)
    deadline = time.monotonic() + args.timeout
    path = Path(args.path)
    own = read_wal(path, args.file_name)
    work = open_work(args)
    try:
        try:
            archive = archive_for(work, spool, location, layout, own, encryption)
            batch = _Batch(work, spool, location, layout, args.compression,
                           recipients_for(encryption, archive), archive)  # fmt: skip
            outcome = batch.push([own], deadline)[own.file_name]
            if isinstance(outcome, BaseException):
                raise outcome
        except BaseException:
            spool.close_look_ahead(own.file_name)
            raise
        # Newly stored, after every failure this spool recorded: push ahead again. Not on
        # "already archived": a restored copy re-pushing its source's identical segments would
        # otherwise send its own later ones ahead (see walpushd).
        if outcome.status != "stored":
            log.debug("look-ahead stays closed until a file is newly stored")
        else:
            spool.open_look_ahead(own.file_name)
        log.info(
            "WAL file '%s' %s at '%s'",
            own.file_name,
            "archived" if outcome.status == "stored" else "was already archived",
            outcome.key,
        )
        if not args.broker and spool.exists:  # through a broker, look-ahead is the pusher's job
            _push_ahead(batch, path.parent, own.file_name, args.look_ahead, deadline)
    finally:
        work.close()
    prune_markers(spool, path.parent)


def _push_ahead(batch: _Batch, wal_dir: Path, own_name: str, limit: int, deadline: float) -> None:
    """Push up to ``limit`` ready files after ``own_name`` that the look-ahead state allows.

    Only ever after the call's own file was confirmed. A failure closes look-ahead at that file
    (its own call reports it); the others of the batch were sent with it and may land.
    """
    spool, location = batch.spool, batch.location
    names = select_look_ahead(
        own_name,
        ready_names(wal_dir / "archive_status"),
        limit,
        lambda name: spool.is_confirmed(name, location, wal_dir / name),
        spool.look_ahead(),
    )
    files = _read_look_ahead(spool, wal_dir, names)
    if not files:
        return
    for name, outcome in batch.push(files, deadline).items():
        if isinstance(outcome, BaseException):
            spool.close_look_ahead(name)
            log.warning("look-ahead push of '%s' failed (its own call will retry): %s", name,
                        outcome)  # fmt: skip


def _read_look_ahead(spool: Spool, wal_dir: Path, names: list[str]) -> list[RawWal]:
    """The files to push ahead, up to the first one that cannot be read (which closes it)."""
    from coordinator.wal.push.encode import read_wal
    from storage.errors import CloudDumpError

    files = []
    for name in names:
        try:
            files.append(read_wal(wal_dir / name, name))
        except (CloudDumpError, OSError) as exc:
            spool.close_look_ahead(name)
            log.warning("not pushing '%s' ahead: %s", name, exc)
            break
    return files


class _Batch:
    """Files pushed together through one ``WalWork``, with the settings they share; records a
    marker for each file storage confirmed."""

    def __init__(
        self,
        work: WalWork,
        spool: Spool,
        location: str,
        layout: Layout,
        compression: str,
        recipients: list[str] | None,
        archive: WalArchiveInfo | None,
    ) -> None:
        self.work = work
        self.spool = spool
        self.location = location
        self._layout = layout
        self._compression = compression
        self._recipients = recipients
        self._archive = archive

    def push(self, files: list[RawWal], deadline: float) -> dict[str, Outcome]:
        """Each file's outcome; never raises for one file."""
        from coordinator.wal.push.encode import encode_wal

        pushes = [
            encode_wal(raw, self._compression, self._recipients, self._layout) for raw in files
        ]
        outcomes = self.work.push(pushes, files[0].file_name, deadline)
        self._archive = _record(self.spool, self.location, files, outcomes, self._archive)
        return outcomes


def _record(
    spool: Spool,
    location: str,
    batch: list[RawWal],
    outcomes: dict[str, PushWalResult | BaseException],
    archive: WalArchiveInfo | None,
) -> WalArchiveInfo | None:
    """Markers for every confirmed file, each with the identity of the file that was read; the
    archive identity, if not cached yet (returned)."""
    for raw in batch:
        outcome = outcomes[raw.file_name]
        if isinstance(outcome, BaseException):
            continue
        spool.confirm(raw.file_name, raw.raw_sha256, raw.identity, location)
        if archive is None and outcome.archive is not None:
            archive = outcome.archive
            spool.write_archive_cache(location, archive.model_dump_json())
    return archive
