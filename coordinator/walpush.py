"""``cloud-dump wal-push %p %f``: archive one WAL file, and exit 0 only once storage has it.

PostgreSQL runs archive_command once per WAL file, one at a time, and retries on failure. A call:

1. Validates the name; if the spool has a confirmation marker for it, returns at once. Under
   load this is the path most calls take (see 2), so nothing heavy is imported before it.
2. With a broker (and ``--look-ahead`` above 0, the default): hands the file to the detached
   WAL pusher (``coordinator.walpushd``), starting it if none runs, and waits until the pusher
   writes the file's marker (storage confirmed it) or its error. The pusher keeps up to
   ``--look-ahead`` files in flight on the workers, taking the next ``.ready`` files of
   ``pg_wal/archive_status`` on its own, so the calls that follow find their marker and
   return in the time it takes Python to start (pgBackRest's async archive-push works the
   same way). Only a marker returns success; an error the pusher records is raised with its
   own exit code; a pusher that stops without either is started again, twice at most.
3. Without a broker (or with ``--look-ahead 0``): pushes in this process, synchronously: the
   file itself plus, without a broker, up to ``--look-ahead`` ready files in the same batch
   (``push_wal`` runs in threads here), then writes their markers.

Either way only this call's own file decides the exit status, and nothing short of a
confirmation within ``--timeout`` returns success.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.walspool import (
    PUSHER_LOCK,
    PUSHER_LOG,
    Spool,
    archive_location,
    default_spool_dir,
    ready_names,
    select_look_ahead,
)

if TYPE_CHECKING:
    from subprocess import Popen

    from coordinator.walencode import RawWal
    from workers.wal import PushWalResult, WalArchiveInfo

log = logging.getLogger(__name__)

PUSHER_MODULE = "coordinator.walpushd"
# Starts of the pusher one call may make before giving up (it records its own errors, so a
# pusher that stops without a word about this file is a bug or a crash: say so, do not spin).
MAX_PUSHER_STARTS = 3
_POLL_MAX_S = 0.02


def run_wal_push(args: argparse.Namespace) -> None:
    """Archive ``args.file_name`` from ``args.path``; return only once storage confirmed it."""
    spool = Spool(Path(args.spool_dir) if args.spool_dir else default_spool_dir(args.path))
    location = archive_location(args.storage, args.cluster, args.wal_prefix)
    name = args.file_name
    # Markers exist only for valid names, so this check needs no validation (and no import).
    if "/" not in name and name not in ("", ".", "..") and spool.is_confirmed(name, location):
        log.debug("WAL file '%s' is already archived (spool marker)", name)
        return
    from storage.walnames import wal_kind

    wal_kind(name)  # refuse a bad name before it touches a path or a key
    if args.broker and args.look_ahead > 0:
        _push_through_pusher(args, spool, location)
    else:
        _push(args, spool, location)


# --- through the detached WAL pusher -----------------------------------------------------


def _push_through_pusher(args: argparse.Namespace, spool: Spool, location: str) -> None:
    from coordinator.background import helper_running, namespace_settings, spawn_helper

    name = args.file_name
    path = Path(args.path).absolute()
    path.stat()  # a missing file is this call's error (exit 16), not the pusher's
    lock = spool.directory / PUSHER_LOCK
    spool.clear_error(name)  # an old failure (e.g. of a look-ahead push) is retried now
    spool.request(name, path)
    settings = {
        **namespace_settings(args),
        "spool_dir": str(spool.directory),
        "wal_dir": str(path.parent),
        "location": location,
    }
    deadline = time.monotonic() + args.timeout
    child: Popen[bytes] | None = None
    starts = 0
    pause_s = 0.001
    while not spool.is_confirmed(name, location):
        if (error := spool.take_error(name)) is not None:
            spool.clear_request(name)
            raise error
        if (child is None or child.poll() is not None) and not helper_running(lock):
            if spool.is_confirmed(name, location):  # it confirmed, then exited
                break
            if starts == MAX_PUSHER_STARTS:
                spool.clear_request(name)
                from storage.errors import CloudDumpError

                raise CloudDumpError(
                    f"the WAL pusher stopped without pushing '{name}': see "
                    f"{spool.directory / PUSHER_LOG}"
                )
            child = spawn_helper(PUSHER_MODULE, settings, spool.directory / PUSHER_LOG)
            starts += 1
        if time.monotonic() > deadline:
            spool.clear_request(name)
            from coordinator.dispatch import START_WORKER_HINT
            from storage.errors import NoWorkerAvailable

            raise NoWorkerAvailable(
                f"storage did not confirm WAL file '{name}' within {args.timeout:.0f} s "
                f"(see {spool.directory / PUSHER_LOG}): {START_WORKER_HINT}"
            )
        time.sleep(pause_s)
        pause_s = min(pause_s * 1.5, _POLL_MAX_S)
    spool.clear_request(name)
    log.info("WAL file '%s' archived (confirmed by storage)", name)


# --- synchronous, in this process or one batch through the workers ------------------------


def _push(args: argparse.Namespace, spool: Spool, location: str) -> None:
    from coordinator.walencode import (
        archive_for,
        encode_wal,
        encryption_of,
        read_wal,
        recipients_for,
    )
    from coordinator.walrunner import open_runner
    from storage.layout import DEFAULT_WAL_PREFIX, Layout

    layout = Layout(cluster=args.cluster, wal_prefix=args.wal_prefix or DEFAULT_WAL_PREFIX)
    encryption = encryption_of(args)
    deadline = time.monotonic() + args.timeout
    own = read_wal(Path(args.path), args.file_name)
    wal_dir = Path(args.path).parent
    look_ahead = []
    if not args.broker:  # through a broker, look-ahead is the pusher's job
        look_ahead = select_look_ahead(
            args.file_name,
            ready_names(wal_dir / "archive_status"),
            args.look_ahead,
            lambda name: spool.is_confirmed(name, location),
        )
    runner = open_runner(args)
    try:
        archive = archive_for(runner, spool, location, layout, own, encryption)
        recipients = recipients_for(encryption, archive)
        batch = [own, *_read_look_ahead(wal_dir, look_ahead)]
        requests = [encode_wal(runner, raw, args.compression, recipients, layout) for raw in batch]
        outcomes = runner.push(requests, own.file_name, deadline)
        runner.delete_staged(*(r.ref for r in requests))
    finally:
        runner.close()
    _record(spool, location, batch, outcomes, archive)
    outcome = outcomes[own.file_name]
    if isinstance(outcome, BaseException):
        raise outcome
    log.info(
        "WAL file '%s' %s at '%s'",
        own.file_name,
        "archived" if outcome.status == "stored" else "was already archived",
        outcome.key,
    )
    prune_markers(spool, wal_dir)


def _read_look_ahead(wal_dir: Path, names: list[str]) -> list[RawWal]:
    from coordinator.walencode import read_wal
    from storage.errors import CloudDumpError

    batch = []
    for name in names:
        try:
            batch.append(read_wal(wal_dir / name, name))
        except (CloudDumpError, OSError) as exc:
            log.warning("not pushing '%s' ahead: %s", name, exc)
    return batch


def _record(
    spool: Spool,
    location: str,
    batch: list[RawWal],
    outcomes: dict[str, PushWalResult | BaseException],
    archive: WalArchiveInfo | None,
) -> None:
    """Markers for every confirmed file; the archive identity, if not cached yet."""
    for raw in batch:
        outcome = outcomes[raw.file_name]
        if isinstance(outcome, BaseException):
            if raw is not batch[0]:
                log.warning(
                    "look-ahead push of '%s' failed (its own call will retry): %s",
                    raw.file_name,
                    outcome,
                )
            continue
        spool.confirm(raw.file_name, raw.raw_sha256, location)
        if archive is None and outcome.archive is not None:
            archive = outcome.archive
            spool.write_archive_cache(location, archive.model_dump_json())


def prune_markers(spool: Spool, wal_dir: Path) -> None:
    """Drop markers of files no longer in pg_wal: PostgreSQL will not ask for them again."""
    try:
        present = {entry.name for entry in wal_dir.iterdir()}
    except OSError:
        return
    spool.prune(lambda name: name in present)
