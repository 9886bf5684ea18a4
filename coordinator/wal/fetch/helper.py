"""The detached WAL prefetcher (reading the archive through ``coordinator.walarchive``).

The prefetcher is started by a ``wal-fetch`` call (``coordinator.wal.fetch.command``) as ``python -m
coordinator.wal.fetch.helper``, detached, with the call's settings and the segments to fetch first
on stdin (``coordinator.background``); at most one runs per spool (``prefetch.lock``, held for its
whole life). It

- records its plan at once: the segments it still means to deliver, with its pid, so that a call
  asking for one of them waits for it instead of fetching it a second time. A segment leaves the
  plan when it is spooled or given up;
- fetches them in order in ``FETCH_THREADS`` threads, one GET each (its raw-sha256 metadata
  comes with the body), streamed through decryption, decompression and the hash into the spool
  in chunks (``WalArchive.copy``): no segment is ever whole in memory. Verified, each gets its
  sidecar (``Spool.put``; not fsynced: ``coordinator.wal.fetch.served``). Where they are
  stored comes from one LIST per timeline and log (256 segments of 16 MiB), listed again only
  for a segment the last listing did not show;
- then keeps the window full: as calls take segments from the spool, it plans and fetches the
  following ones, so that at most ``--prefetch`` segments are spooled or in flight (the disk it
  may use). Starting Python and boto3 costs ~0.5 s of CPU, so one process serves a whole
  recovery rather than one per window;
- stops at the first segment missing from the archive (recorded in the spool: the calls do not
  start another prefetcher for it for a while, so it is recorded only once the archive is known
  to exist: a location with no archive at all is no end of one, and is logged as an error);
  when no spooled segment was taken for
  ``CLOUD_DUMP_WAL_PREFETCH_IDLE_EXIT`` seconds (default 5: recovery paused, ended, or moved to
  another timeline); and after ``DEADLINE_S`` (a later call starts a new one if needed).
  Whatever a request hangs on, the process ends at ``HARD_DEADLINE_S``.

Its failures are logged to ``prefetch.log`` in the spool and go no further: the prefetcher is an
optimisation, and the ``wal-fetch`` call stays authoritative. It fetches itself whatever the
prefetcher did not deliver, with its own retries and exit codes.

``WalArchive`` reads WAL files as wal-push stored them and verifies them against the raw-sha256
in their metadata; ``Keys`` decrypts them. A ``wal-fetch`` call that fetches a file directly uses
them too.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from coordinator.background import HelperLock, read_payload
from coordinator.logs import setup_helper_logging
from coordinator.settings import WalFetchSettings, keys_from, layout_of, settings_from_json
from coordinator.wait import Backoff
from coordinator.wal.fetch.spool import Spool, following_segments
from coordinator.walarchive import StoredWal, WalArchive
from options.declared import number_from_env
from storage.errors import CloudDumpError
from storage.walnames import is_segment

log = logging.getLogger("cloud-dump.prefetcher")

FETCH_THREADS = 2
DEADLINE_S = 300.0  # no segment is planned after this
HARD_DEADLINE_S = DEADLINE_S + 60.0
POLL_S = 0.01
M_ARENA_MAX = -8  # glibc's malloc.h


def main() -> int:
    _limit_malloc_arenas()
    payload = read_payload()
    # The call that started this prefetcher warned about a passphrase typed on its command line.
    args = replace(settings_from_json(WalFetchSettings, payload["settings"]),  # type: ignore[arg-type]
                   passphrase_from_flag=False)
    spool = Spool(Path(str(payload["spool_root"])), str(payload["source"]))
    lock = HelperLock(spool.lock_path)
    if not lock.try_acquire():
        return 0  # another prefetcher serves this spool
    try:
        setup_helper_logging(str(args.log_level))
        _exit_at_deadline(spool)
        names = payload.get("names")
        segment_bytes = payload.get("segment_bytes")
        wanted = [str(n) for n in names if is_segment(str(n))] if isinstance(names, list) else []
        prefetch(args, spool, wanted, segment_bytes if isinstance(segment_bytes, int) else None)
    except CloudDumpError as exc:
        log.error("WAL prefetcher stopped: %s", exc)
        return 1
    except Exception:
        log.exception("WAL prefetcher failed")
        return 1
    finally:
        spool.clear_plan()
        lock.release()
    return 0


def prefetch(
    args: WalFetchSettings, spool: Spool, names: list[str], segment_bytes: int | None
) -> None:
    """Spool the segments ``names``, then the ones after them while calls consume the spool."""
    plan = Plan(spool, [name for name in names if not spool.has(name)])
    if not plan.names:
        return
    log.info("prefetching from '%s'", plan.names[0])
    spool.remove_temp_files()
    from coordinator.settings import open_store

    storage = open_store(args)
    try:
        archive = WalArchive(storage, layout_of(args), keys_from(args, spool))
        window = max(1, int(args.prefetch))
        Prefetcher(archive, spool, plan, window, segment_bytes).run()
    finally:
        storage.close()
    log.info("prefetching done")


class Prefetcher:
    """Keeps up to ``window`` segments spooled or being fetched ahead of the wal-fetch calls."""

    def __init__(self, archive: WalArchive, spool: Spool, plan: Plan, window: int,
                 segment_bytes: int | None) -> None:  # fmt: skip
        self._archive = archive
        self._spool = spool
        self._plan = plan
        self._window = window
        self._segment_bytes = segment_bytes
        self._stored: dict[str, StoredWal] = {}  # what the LISTs so far showed
        self._last = plan.names[-1] if plan.names else ""  # the last segment planned
        # After one failure no segment is planned any more: a wrong passphrase or a storage
        # outage would otherwise have it try the whole archive. The calls retry on their own.
        self._failed = threading.Event()

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        deadline = time.monotonic() + DEADLINE_S
        with ThreadPoolExecutor(FETCH_THREADS, "wal-prefetch") as pool:
            batch = list(self._plan.names)
            while batch:
                present = self._locate(batch)
                for name in present:
                    pool.submit(self._spool_one, name, self._stored[name])
                if len(present) < len(batch):
                    missing = batch[len(present)]
                    self._plan.drop(batch[len(present):])
                    self._archive.require()  # no archive at all: no end of one to remember
                    log.info("'%s' is not in the archive at '%s' (yet): prefetching stops "
                             "there", missing, self._archive.location)  # fmt: skip
                    self._spool.mark_end_of_archive(missing)
                    return
                batch = self._next_batch(deadline)

    def _locate(self, batch: list[str]) -> list[str]:
        """The leading names of ``batch`` that are archived. Storage is listed again only for a
        name the last listing did not show: the archive of a running primary grows."""
        unknown = {name[:16] for name in batch if name not in self._stored}
        # The first LIST runs alone: it builds the storage client, which threads racing on
        # first use would each build again (~0.2 s of CPU apiece).
        for prefix in sorted(unknown):
            self._stored.update(self._archive.list_segments(prefix))
        return list(itertools.takewhile(self._stored.__contains__, batch))

    def _next_batch(self, deadline: float) -> list[str]:
        """Once there is room in the window, the segments to fetch next; [] to stop."""
        idle_exit_s = _idle_exit_s()
        seen: set[str] = set()
        idle_since = time.monotonic()
        # A loop, not a wait: each round plans. POLL_S (10 ms, fixed) between looks at the
        # spool: room opens when a call takes a segment, one per replayed segment (tens of ms
        # at the fastest), so the window is refilled well within one segment's replay.
        pause = Backoff(POLL_S)
        while not self._failed.is_set():
            if time.monotonic() > deadline:
                log.info("prefetching for %.0f s: stopping", DEADLINE_S)
                return []
            timeline = self._last[:8]
            spooled = {name for name in self._spool.entries() if name[:8] == timeline}
            room = self._window - len(spooled | set(self._plan.names))
            following = following_segments(self._last, room, self._segment_bytes)
            if following:
                self._last = following[-1]
                names = [name for name in following if name not in spooled]
                if names:
                    self._plan.add(names)
                    return names
                continue
            if spooled != seen:
                seen, idle_since = spooled, time.monotonic()
            elif time.monotonic() - idle_since > idle_exit_s:
                log.info("no spooled segment taken for %.1f s: stopping", idle_exit_s)
                return []
            pause.pause()
        log.info("stopping after a failed prefetch")
        return []

    def _spool_one(self, name: str, stored: StoredWal) -> None:
        try:
            self._spool.put(name, functools.partial(self._archive.copy, stored))
            log.debug("spooled '%s'", name)
        except Exception as exc:  # an optimisation: the wal-fetch call for it fetches it itself
            log.warning("prefetch of '%s' failed: %s", name, exc)
            self._failed.set()
        finally:
            self._plan.drop([name])


class Plan:
    """The segments this prefetcher still means to deliver, mirrored in the spool for the
    wal-fetch calls that wait for them."""

    def __init__(self, spool: Spool, names: list[str]) -> None:
        self._spool = spool
        self._lock = threading.Lock()
        self.names = names
        spool.write_plan(names)

    def add(self, names: list[str]) -> None:
        with self._lock:
            self.names = [*self.names, *names]
            self._spool.write_plan(self.names)

    def drop(self, names: list[str]) -> None:
        with self._lock:
            self.names = [name for name in self.names if name not in names]
            self._spool.write_plan(self.names)


def _limit_malloc_arenas() -> None:
    """One glibc malloc arena for all threads (``mallopt(M_ARENA_MAX, 1)``, as the
    ``MALLOC_ARENA_MAX`` variable would): each thread's own arena keeps the chunks it freed, and
    their few allocations a second are no contention worth the memory."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to limit
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)


def _idle_exit_s() -> float:
    return float(number_from_env("CLOUD_DUMP_WAL_PREFETCH_IDLE_EXIT"))


def _exit_at_deadline(spool: Spool) -> None:
    """End the process at ``HARD_DEADLINE_S`` whatever its threads wait for (a hung request)."""

    def abandon() -> None:
        log.error("WAL prefetcher still busy after %.0f s: exiting", HARD_DEADLINE_S)
        spool.clear_plan()
        os._exit(1)  # the lock goes with the process

    timer = threading.Timer(HARD_DEADLINE_S, abandon)
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    sys.exit(main())
