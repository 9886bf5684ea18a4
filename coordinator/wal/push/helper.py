"""The detached WAL pusher: keeps the workers busy while PostgreSQL calls wal-push file by file.

Started by a ``wal-push`` call that found no marker for its file (``coordinator.wal.push.command``),
run as ``python -m coordinator.wal.push.helper`` with the call's settings on stdin
(``coordinator.background``); at most one per spool (``pusher.lock``). It:

- takes the files wal-push calls are waiting for (``requests/``) first, then, while the spool's
  look-ahead state allows it (``coordinator.wal.push.spool.LookAhead``), the files PostgreSQL marked
  ``.ready`` in ``archive_status/``, in the archiver's order (timeline history files first,
  then the oldest), skipping files already confirmed or with an error;
- pushes nothing ahead of PostgreSQL until a file a call asked for, sent after the last
  failure, is newly stored (not "already archived"): look-ahead is closed at start and on
  every failure (a prepared file not sent yet is dropped), and never reaches the earliest file
  whose push failed. Pushes sent before a failure was known may still land; nothing is sent
  after it;
- reads, identifies, compresses and encrypts them in ``PREPARE_THREADS`` threads (zstd and
  hashlib release the GIL), stages each and sends its ``push_wal``, keeping at most
  ``--look-ahead`` files prepared or in flight (the Redis memory it can hold);
- on each answer writes the file's marker (storage confirmed it) or its error, for the waiting
  call to report; a push unanswered for ``CLOUD_DUMP_WAL_RETRY_S`` is sent again, one past
  ``--timeout`` becomes an error;
- exits after ``CLOUD_DUMP_WAL_PUSHER_IDLE_EXIT`` seconds (default 2) with nothing to do, or
  when the broker stayed away longer than its grace period (``coordinator.wal.push.work``; a
  broker back within it costs nothing but the re-sends of what it lost), after recording that
  error for every waiting call: the next call starts a new pusher.

It never marks anything ``.done``: PostgreSQL does, once the call for that file returned 0, so a
file is never recycled before it is stored. Its log is ``pusher.log`` in the spool.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.background import HelperLock, read_payload
from coordinator.logs import setup_helper_logging
from coordinator.malloc import tune_malloc
from coordinator.settings import (
    Encryption,
    WalPushSettings,
    encryption_of,
    layout_of,
    settings_from_json,
)
from coordinator.wait import Backoff
from coordinator.wal.push.encode import archive_for, encode_wal, read_wal, recipients_for
from coordinator.wal.push.spool import (
    PUSHER_LOCK,
    LookAhead,
    Spool,
    archive_order,
    prune_markers,
    ready_names,
)
from coordinator.wal.push.work import WalWork, open_work
from options.declared import number_from_env
from storage.errors import BrokerUnreachable, CloudDumpError
from storage.walnames import kind_of

if TYPE_CHECKING:
    from coordinator.runner import Handle
    from workers.wal import PushWalRequest, PushWalResult, WalArchiveInfo

log = logging.getLogger("cloud-dump.pusher")

PREPARE_THREADS = 2
# While there is room for more work: how often the (small) requests directory and the
# archive_status directory (thousands of entries on a server that fell behind) are listed.
REQUEST_SCAN_S = 0.005
READY_SCAN_S = 0.05
LOOP_PAUSE_S = 0.005


@dataclass
class Prepared:
    raw_sha256: str
    identity: str  # of the open file that was read (the marker records it)
    request: PushWalRequest
    payload: bytes  # what is staged under request.ref
    archive: WalArchiveInfo | None


@dataclass
class InFlight:
    prepared: Prepared
    handle: Handle
    # Sent while look-ahead was closed (so: a file a call asked for), after failure number
    # ``failures``: its confirmation opens look-ahead if no failure came since.
    sent_closed: bool = False
    failures: int = 0


class Pusher:
    def __init__(
        self, args: WalPushSettings, spool: Spool, work: WalWork, *, wal_dir: Path,
        location: str,
    ) -> None:
        self._args = args
        self._spool = spool
        self._work = work
        self._location = location
        self._wal_dir = wal_dir
        self._window = max(1, int(args.look_ahead))
        self._layout = layout_of(args)
        self._encryption: Encryption | None = None  # resolved by run(); None: not encrypted
        self._archive_lock = threading.Lock()  # one archive_for at a time: it may run scrypt
        self._preparing: dict[str, Future[Prepared]] = {}
        self._in_flight: dict[str, InFlight] = {}
        # Failed here: retried only when a call asks for it again, not in a loop on its own.
        self._failed_names: set[str] = set()
        # Markers of ready files, once seen, are not read again (a file a call asks for is
        # always checked against its marker: the marker answers only for the file it names).
        self._confirmed_names: set[str] = set()
        self._ready: list[str] = []
        self._ready_listed_at = 0.0
        self._look_ahead = LookAhead(False, None)
        self._failures = 0

    def run(self) -> None:
        # Closed at every start: a pusher that died may have left failures nobody recorded.
        self._spool.close_look_ahead(None)
        self._look_ahead = self._spool.look_ahead()
        self._encryption = encryption_of(self._args)
        idle_since = time.monotonic()
        idle_exit_s = float(number_from_env("CLOUD_DUMP_WAL_PUSHER_IDLE_EXIT"))
        last_scan = 0.0
        # A loop, not a wait: each round does the work. LOOP_PAUSE_S (5 ms, fixed) between
        # rounds: a waiting call's request is picked up, and a worker's answer turned into its
        # marker, within 5 ms (the call's own latency); the broker is read at most every
        # REFRESH_EVERY_S anyway (coordinator.broker.flights).
        pause = Backoff(LOOP_PAUSE_S)
        with ThreadPoolExecutor(PREPARE_THREADS, "wal-prepare") as pool:
            while True:
                now = time.monotonic()
                if self._room() and now - last_scan >= REQUEST_SCAN_S:
                    for name, path in self._candidates()[: self._room()]:
                        self._preparing[name] = pool.submit(self._prepare, name, path)
                    last_scan = now
                self._collect_prepared()
                self._collect_answers()
                if self._preparing or self._in_flight:
                    idle_since = now
                elif now - idle_since > idle_exit_s and not self._candidates():
                    break
                pause.pause()
        prune_markers(self._spool, self._wal_dir)

    def fail_everything(self, error: BaseException) -> None:
        """Record ``error`` for every file in hand or asked for (the broker is gone)."""
        names = {*self._preparing, *self._in_flight, *self._spool.requested()}
        for name in names:
            self._spool.write_error(name, error)

    def _room(self) -> int:
        return self._window - len(self._preparing) - len(self._in_flight)

    def _candidates(self) -> list[tuple[str, Path]]:
        """Files to push next, in order: those calls wait for, then ready ones."""
        busy = self._preparing.keys() | self._in_flight.keys()
        requested = self._spool.requested()
        now = time.monotonic()
        if now - self._ready_listed_at >= READY_SCAN_S or requested.keys() - self._ready:
            self._ready = sorted(ready_names(self._wal_dir / "archive_status"), key=archive_order)
            self._ready_listed_at = now
        chosen: list[tuple[str, Path]] = []
        for name in sorted(requested, key=archive_order):
            if name not in busy and self._wanted(name, requested[name], asked=True):
                chosen.append((name, requested[name]))
        for name in self._ready:
            if not self._look_ahead.allows(name):
                break  # closed, or at the barrier: nothing from here on (archiver order)
            if name in requested or name in busy or name in self._failed_names:
                continue
            if self._wanted(name, self._wal_dir / name, asked=False):
                chosen.append((name, self._wal_dir / name))
        return chosen

    def _wanted(self, name: str, path: Path, asked: bool) -> bool:
        """Not confirmed for the file now at ``path``, a valid name, and no error waiting for
        its call."""
        if kind_of(name) is None or self._spool.has_error(name):
            return False
        if not asked and name in self._confirmed_names:
            return False
        if self._spool.is_confirmed(name, self._location, path):
            self._confirmed_names.add(name)
            return False
        return True

    def _prepare(self, name: str, path: Path) -> Prepared:
        """Read, check, compress, encrypt and stage one file (in a worker thread)."""
        raw = read_wal(path, name)
        with self._archive_lock:
            archive = archive_for(
                self._work, self._spool, self._location, self._layout, raw, self._encryption
            )
        recipients = recipients_for(self._encryption, archive)
        request, payload = encode_wal(raw, self._args.compression, recipients, self._layout)
        return Prepared(raw.raw_sha256, raw.identity, request, payload, archive)

    def _collect_prepared(self) -> None:
        for name, future in list(self._preparing.items()):
            if not future.done():
                continue
            del self._preparing[name]
            error = future.exception()
            if error is not None:
                self._failed(name, error)
                continue
            prepared = future.result()
            if not self._look_ahead.allows(name) and name not in self._spool.requested():
                continue  # prepared as look-ahead, which a failure has closed since: not sent
            deadline = time.monotonic() + float(self._args.timeout)
            handle = self._work.start(prepared.request, prepared.payload, deadline)
            self._in_flight[name] = InFlight(
                prepared, handle, not self._look_ahead.open, self._failures
            )

    def _collect_answers(self) -> None:
        for name, sent in list(self._in_flight.items()):
            outcome = self._work.check(sent.handle)
            if outcome is None:
                continue
            del self._in_flight[name]
            self._work.release(sent.handle)
            if isinstance(outcome, BaseException):
                self._failed(name, outcome)
            else:
                self._confirmed(name, sent, outcome)

    def _confirmed(self, name: str, sent: InFlight, outcome: PushWalResult) -> None:
        prepared = sent.prepared
        self._spool.confirm(name, prepared.raw_sha256, prepared.identity, self._location)
        self._confirmed_names.add(name)
        if (
            sent.sent_closed
            and sent.failures == self._failures
            and not self._look_ahead.open
            and outcome.status == "stored"
        ):
            # A file a call asked for, sent after the last failure, is newly stored: push ahead
            # again. "Already archived" does not open it: a restored copy re-pushing its
            # source's identical segments would otherwise send its own later ones ahead.
            self._spool.open_look_ahead(name)
            self._look_ahead = self._spool.look_ahead()
        if prepared.archive is None and outcome.archive is not None:
            with self._archive_lock:
                self._spool.write_archive_cache(self._location, outcome.archive.model_dump_json())
        log.info(
            "WAL file '%s' %s at '%s'",
            name,
            "archived" if outcome.status == "stored" else "was already archived",
            outcome.key,
        )

    def _failed(self, name: str, error: BaseException) -> None:
        self._close_look_ahead(name)
        if isinstance(error, BrokerUnreachable):
            raise error
        log.error("could not push WAL file '%s': %s", name, error)
        self._failed_names.add(name)
        self._spool.write_error(name, error)

    def _close_look_ahead(self, failed: str) -> None:
        """Nothing more ahead of PostgreSQL; in flight already is beyond recall."""
        self._failures += 1
        self._spool.close_look_ahead(failed)
        self._look_ahead = self._spool.look_ahead()


def main() -> int:
    payload = read_payload()
    args = settings_from_json(WalPushSettings, payload["settings"])  # type: ignore[arg-type]
    spool = Spool(Path(str(payload["spool_dir"])))
    lock = HelperLock(spool.directory / PUSHER_LOCK)
    if not lock.try_acquire():
        return 0  # another pusher serves this spool
    setup_helper_logging(str(args.log_level))
    # Each file is read whole (16 MiB) and compressed in a thread: with glibc's floating
    # thresholds those buffers were mapped afresh, 18 of the 80 ms of CPU a file cost (5 ms
    # with these settings, for ~20 MB more resident: bench-peers prod WAL).
    tune_malloc()
    log.info("WAL pusher started (look-ahead %s)", args.look_ahead)
    pusher: Pusher | None = None
    try:
        assert args.broker, "the pusher runs only with a broker"
        work = open_work(args)
        pusher = Pusher(args, spool, work, wal_dir=Path(str(payload["wal_dir"])),
                        location=str(payload["location"]))
        try:
            pusher.run()
        finally:
            work.close()
    except CloudDumpError as exc:
        log.error("WAL pusher stopped: %s", exc)
        if pusher is not None:
            pusher.fail_everything(exc)
        else:
            for name in spool.requested():
                spool.write_error(name, exc)
        return 1
    except Exception:
        log.exception("WAL pusher failed")
        raise
    finally:
        lock.release()
    log.info("WAL pusher done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
