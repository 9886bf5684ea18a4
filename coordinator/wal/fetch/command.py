"""``wal-fetch %f %p`` (restore_command): one WAL file from the archive into ``%p`` (DESIGN.md §4).

Contract with PostgreSQL:

- exit 0: ``%p`` holds exactly the archived file. It appears by a rename onto its name, so it is
  never empty or partial, but it is not fsynced: after a crash PostgreSQL does not reuse a file
  restore_command wrote, it asks for it again, and a restored segment it keeps is made durable
  by PostgreSQL itself (``durable_rename``). pgBackRest's archive-get relies on the same;
- exit 1: the archive exists and does not have the file (nothing written). PostgreSQL takes
  this for the end of the archive and may promote, so it is answered only once the archive is
  known to exist (``coordinator.walarchive``: one HEAD of its identity object, paid on this path
  alone). A missing ``.history`` file is the common case at every recovery start and is answered
  after one LIST and that HEAD;
- anything else raises, and the CLI exits ``ExitCode.WAL_FETCH_FAILED`` (200): PostgreSQL then
  stops recovery rather than take a storage outage, or a location where no archive exists at all
  (``WalArchiveNotFound``: a wrong storage URL, ``--cluster`` or ``--wal-prefix``), for the end of
  the archive and promote early. Transient storage errors are retried (the backends retry each
  request; this module retries the whole fetch a few times).

``%p`` may be ``RECOVERYXLOG``/``RECOVERYHISTORY``: the file name always comes from ``%f``.
``<segment>.partial`` is served only with ``--allow-partial`` (without it: 1, for an archive that
exists).

A segment request, in order:

1. spooled (``<spool>/prefetch/``, filled by the detached prefetcher,
``coordinator.wal.fetch.helper``):
   moved into ``%p`` by a rename, without reading it. The prefetcher verified it against its
   archived SHA-256 before writing its sidecar, so a sidecar means a complete file; the call
   only checks that the sidecar names this archive, this boot of the machine (the files are not
   fsynced: ``coordinator.wal.fetch.served``) and the file's size;
2. named in the plan of a running prefetcher: the call waits for it (polling), at most
   ``CLOUD_DUMP_WAL_PREFETCH_WAIT`` seconds (default 30), and only while the prefetcher runs and
   still means to deliver it;
3. otherwise it starts the prefetcher for the following segments first, so that both overlap,
   then fetches the segment itself: this path alone decides "not archived" (1) or failure.

A running prefetcher keeps ``--prefetch`` segments spooled or in flight as the calls take them.
After 1 or 2, when none runs and fewer than half of the next ``--prefetch`` segments are spooled
(or known to be past the end of the archive a moment ago), the call starts one for the missing
ones. It never waits for it: a call served from the spool imports no storage client at all.
``--prefetch 0`` never starts a prefetcher; other files than segments are never prefetched.
A call served from the spool, or waiting for the prefetcher, with nothing to start
(``coordinator.cli.fastpath``), loads ``coordinator.wal.fetch.served`` and nothing of this module.
A fetched file is streamed from storage into place (``WalArchive.copy``), never whole in memory.

Where the spool is. ``--spool-dir`` when given; otherwise it is derived from where the file
goes: PostgreSQL runs restore_command in the data directory with ``%p`` = ``pg_wal/RECOVERYXLOG``,
so a call writing into a ``pg_wal`` directory has the spool ``<that pg_wal>/cloud-dump``. A call
writing anywhere else (``wal-fetch NAME /some/path`` run by hand) has no spool: it fetches
directly, starts no prefetcher, caches no identity, and creates no directory.

Stale spool files. Restore only writes into an empty data directory: a spool in its ``pg_wal``
therefore belongs to one restore. Each spooled file also
has a sidecar naming the archive it came from and its size; a file whose sidecar is missing (the
prefetcher was stopped while writing it), names another archive (a ``--spool-dir`` shared between
restores) or gives another size is discarded and fetched directly.

Passphrase mode: the archive's X25519 identity is stored passphrase-wrapped (scrypt, ~1.7 s).
It is unwrapped once and cached in the spool (mode 0600, owned by the server's user) so later
calls, and the prefetcher, do not pay scrypt again; a call without a spool unwraps it each time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from coordinator.wal.fetch.served import await_prefetched, prefetcher_wanted
from coordinator.wal.fetch.spool import Spool, archive_source, following_segments, spool_root_for
from options.declared import number_from_env
from storage.errors import ConfigError, TransientStorageError, WalArchiveGap
from storage.fsutil import write_atomically
from storage.walnames import is_segment, wal_kind

if TYPE_CHECKING:
    from coordinator.settings import WalFetchSettings
    from coordinator.walarchive import StoredWal, WalArchive

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_N = TypeVar("_N", int, float)

FETCHED = 0
NOT_IN_ARCHIVE = 1
RETRY_BASE_DELAY_S = 2.0  # 2 s then 6 s: ~8 s on top of the backends' own per-request retries
PREFETCHER = "coordinator.wal.fetch.helper"


def run_wal_fetch(args: WalFetchSettings) -> int:
    """The ``wal-fetch`` command: 0 fetched, 1 not in the archive (which exists); raises on any
    other failure (``WalArchiveNotFound`` when there is no archive at the location)."""
    file_name = args.file_name
    kind = wal_kind(file_name)
    if not args.storage:
        raise ConfigError("no storage given: use --storage or CLOUD_DUMP_STORAGE")
    # PostgreSQL never replays a .partial segment on its own: serving one needs intent.
    serve = kind != "partial" or bool(args.allow_partial)
    root = spool_root(args)
    spool = None if root is None else Spool(
        root, archive_source(args.storage, args.cluster, args.wal_prefix)
    )
    destination = Path(args.path)
    segment = kind == "segment"
    if segment and spool is not None:
        if _serve_spooled(args, spool, file_name, destination):
            return FETCHED
        spool.discard_unfinished(file_name)
        if args.prefetch > 0:  # first, so that it works while this call fetches
            names = _prefetch_names(spool, file_name, args.prefetch, None)
            _start_prefetcher(args, spool, names, None)
    code = _fetch_directly(args, spool, file_name, destination, serve=serve)
    if code == NOT_IN_ARCHIVE and segment and spool is not None:
        spool.mark_end_of_archive(file_name)  # no prefetcher for what follows, for a while
    return code


def _serve_spooled(
    args: WalFetchSettings, spool: Spool, file_name: str, destination: Path
) -> bool:
    """Serve ``file_name`` from the spool, waiting for a prefetcher that is fetching it; then
    start one if fewer than half of the next ``--prefetch`` segments are spooled."""
    prefetch = max(0, args.prefetch)
    served_bytes = spool.take(file_name, destination)
    if served_bytes is None and prefetch:
        served_bytes = _await_prefetched(spool, file_name, destination)
    if served_bytes is None:
        return False
    log.debug("served '%s' from the spool", file_name)
    # Counting the spool's entries is cheap; naming the missing segments imports more.
    if prefetcher_wanted(str(spool.root), file_name, prefetch):
        names = _prefetch_names(spool, file_name, prefetch, served_bytes)
        if len(names) * 2 > prefetch:
            _start_prefetcher(args, spool, names, served_bytes)
    return True


def _fetch_directly(
    args: WalFetchSettings, spool: Spool | None, file_name: str, destination: Path,
    *, serve: bool = True,
) -> int:
    from coordinator.settings import keys_from, layout_of, open_store
    from coordinator.walarchive import WalArchive

    storage = open_store(args)
    try:
        return _fetch(WalArchive(storage, layout_of(args), keys_from(args, spool)), file_name,
                      destination, serve=serve)  # fmt: skip
    finally:
        storage.close()


def _fetch(archive: WalArchive, file_name: str, destination: Path, *, serve: bool = True) -> int:
    """Fetch ``file_name`` from storage into ``destination``, with retries.

    1 when the archive does not have it (``serve`` False: whether it has it or not), but only
    for an archive that exists: ``WalArchiveNotFound`` otherwise.
    """
    attempts = _attempts()
    stored = _with_retries(lambda: archive.find(file_name), attempts) if serve else None
    if stored is None and serve and is_segment(file_name):
        stored = _unless_a_gap(archive, file_name, destination, attempts)
    if stored is None:
        _with_retries(archive.require, attempts)
        if serve:
            log.info("'%s' is not in the archive at '%s'", file_name, archive.location)
        else:
            log.info("'%s' is a partial segment: not served without --allow-partial", file_name)
        return NOT_IN_ARCHIVE
    # Streamed into place, never whole in memory; not fsynced: see the module docstring.
    copy = functools.partial(archive.copy, stored)
    _with_retries(lambda: write_atomically(destination, copy, sync=False), attempts)
    return FETCHED


def _unless_a_gap(
    archive: WalArchive, name: str, destination: Path, attempts: int
) -> StoredWal | None:
    """Segment ``name`` is not stored: None when that is the end of its timeline in the archive;
    raise ``WalArchiveGap`` when later segments of the timeline are stored.

    Exit 1 would tell PostgreSQL "end of the archive": it would promote at the gap and the WAL
    after it, already archived, would be lost to this copy. A gap can also be a push still in
    flight while the pusher's look-ahead stored later segments, so the segment is looked for
    again on the fetch retry schedule before recovery is stopped. A standby (``standby.signal``
    beside ``%p``'s pg_wal) is answered 1 with a warning: it keeps asking, and can stream the
    segment from its primary; stopping it would take the standby down. So is, before any
    retry, a copy whose pg_wal holds the segment whole (``_whole_segment_at``): PostgreSQL
    reads that next (the documented order: the archive, then pg_wal), then asks for the next.
    """
    from coordinator.wait import retry  # not on the served path

    later = _with_retries(lambda: archive.later_segment(name), attempts)
    if later is None:
        return None
    pg_wal = destination.parent
    if pg_wal.name == "pg_wal" and _whole_segment_at(pg_wal / name, name):
        # At once, not after the retries below: whatever a push in flight would store, the
        # whole copy here is the same WAL, and every start of such a copy would wait 8 s.
        log.warning("'%s' is not in the archive at '%s', which holds later WAL of its timeline "
                    "('%s'); answering 'not archived': PostgreSQL reads the whole copy of it in "
                    "pg_wal, which came with the data directory (a backup's own WAL, e.g. of a "
                    "backup taken before archiving began)",
                    name, archive.location, later)  # fmt: skip
        return None

    def stored_by_now() -> StoredWal:
        stored = _with_retries(lambda: archive.find(name), attempts)
        if stored is None:
            raise _StillMissing
        return stored

    # The caller has just looked: attempts - 1 looks more, 2 s, 6 s, ... apart.
    try:
        if attempts > 1:
            return retry(stored_by_now, attempts=attempts - 1, retry_on=_StillMissing,
                         first_s=RETRY_BASE_DELAY_S, factor=3.0, pause_first=True)  # fmt: skip
    except _StillMissing:
        pass
    gap = (
        f"'{name}' is missing from the archive at '{archive.location}', which holds later WAL "
        f"of its timeline ('{later}'): a gap in the archive"
    )
    if pg_wal.name == "pg_wal" and (pg_wal.parent / "standby.signal").exists():
        log.warning("%s; answering 'not archived' to this standby, which keeps asking and can "
                    "stream it from its primary", gap)  # fmt: skip
        return None
    raise WalArchiveGap(
        f"{gap}; recovery stops here rather than end early without the WAL after it (put the "
        "segment back from the source's pg_wal, or restore with a target before it)"
    )


def _whole_segment_at(path: Path, name: str) -> bool:
    """Whether ``path`` is a whole WAL segment named ``name`` (its size, its first page where
    the name says, WAL to its end: ``coordinator.walrecords.segment_is_whole``).

    Answering 1 for a segment makes PostgreSQL read ``pg_wal/<name>`` next; only a whole copy
    lets it go on to the next segment, which the archive has. A copy that stops early would end
    recovery there and promote without the archived WAL after it: that stays a gap (exit 200).
    """
    from coordinator.walheader import segment_address_mismatch, segment_system_identifier
    from coordinator.walrecords import segment_is_whole
    from storage.errors import IntegrityError
    from storage.walnames import Segment

    try:
        if path.is_symlink() or not path.is_file():
            return False
        data = path.read_bytes()
        segment_system_identifier(data, name)  # a long header, and the size it gives
        if segment_address_mismatch(data, name) is not None:
            return False
        return segment_is_whole(data, Segment.parse(name, len(data)).start_lsn(len(data)))
    except (OSError, IntegrityError, ConfigError):
        return False


class _StillMissing(Exception):
    """The segment ``_unless_a_gap`` looks for again is not stored yet."""


def _await_prefetched(spool: Spool, name: str, destination: Path) -> int | None:
    """Serve ``name`` once the running prefetcher spools it; None when none is fetching it, it
    gave up on it, or the wait passed its bound (the caller then fetches it itself)."""
    if not spool.being_prefetched(name):
        return None
    return await_prefetched(str(spool.root), spool.source, name, str(destination),
                            _prefetch_wait_s())  # fmt: skip


def _prefetch_names(
    spool: Spool, file_name: str, count: int, segment_bytes: int | None
) -> list[str]:
    """The next ``count`` segments after ``file_name`` that are neither spooled nor known to
    have been missing from the archive a moment ago."""
    end = spool.recent_end_of_archive()
    return [
        name for name in following_segments(file_name, count, segment_bytes)
        if not spool.has(name) and (end is None or name[:8] != end[:8] or name < end)
    ]  # fmt: skip


def _start_prefetcher(
    args: WalFetchSettings, spool: Spool, names: list[str], segment_bytes: int | None
) -> None:
    """Start the detached prefetcher for ``names`` unless one is running already."""
    if not names:
        return
    from coordinator.background import helper_running, spawn_helper
    from coordinator.settings import settings_to_json

    if helper_running(spool.lock_path):
        return
    settings = {"settings": settings_to_json(args), "names": names, "segment_bytes": segment_bytes,
                "spool_root": str(spool.root.absolute()), "source": spool.source}  # fmt: skip
    try:
        process = spawn_helper(PREFETCHER, settings, spool.log_path)
    except OSError as exc:  # an optimisation: this call does not depend on it
        log.warning("cannot start the WAL prefetcher: %s", exc)
        return
    log.debug("started prefetcher %d for %d segments from '%s'", process.pid, len(names),
              names[0])  # fmt: skip


def _prefetch_wait_s() -> float:
    return float(number_from_env("CLOUD_DUMP_WAL_PREFETCH_WAIT"))


def _attempts() -> int:
    return int(number_from_env("CLOUD_DUMP_WAL_FETCH_RETRIES"))


def _with_retries(fetch: Callable[[], _T], attempts: int) -> _T:
    """``fetch()``, attempted up to ``attempts`` times while it raises
    ``TransientStorageError``, RETRY_BASE_DELAY_S (2 s) apart, then 3 times longer each time;
    the last error propagates."""
    from coordinator.wait import retry  # not on the served path

    def warn(exc: BaseException, delay_s: float, attempt: int) -> None:
        log.warning("%s; retrying in %.0f s (attempt %d of %d)", exc, delay_s, attempt,
                    attempts)  # fmt: skip

    return retry(fetch, attempts=attempts, retry_on=TransientStorageError,
                 first_s=RETRY_BASE_DELAY_S, factor=3.0, before_retry=warn)  # fmt: skip


# --- settings shared with the prefetcher ---------------------------------------------------------


def spool_root(args: WalFetchSettings) -> Path | None:
    return spool_root_for(args.path, args.spool_dir)
