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

1. spooled (``<spool>/prefetch/``, filled by the detached prefetcher, ``coordinator.walprefetch``):
   moved into ``%p`` by a rename, without reading it. The prefetcher verified it against its
   archived SHA-256 and fsynced it before writing its sidecar, so a sidecar means a complete
   file; the call only checks that the sidecar names this archive and the file's size;
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

import contextlib
import errno
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from coordinator.background import make_spool_dir
from coordinator.fastpath import wal_spool_dir
from storage.errors import ConfigError, TransientStorageError
from storage.walnames import kind_of, wal_kind

if TYPE_CHECKING:
    import argparse

    from coordinator.walprefetch import WalArchive

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_N = TypeVar("_N", int, float)

FETCHED = 0
NOT_IN_ARCHIVE = 1
DEFAULT_ATTEMPTS = 3
RETRY_BASE_DELAY_S = 2.0  # 2 s then 6 s: ~8 s on top of the backends' own per-request retries
# How long a prefetch's "not archived yet" stands: short, since a standby's archive grows.
END_OF_ARCHIVE_MEMORY_S = 10.0
DEFAULT_PREFETCH_WAIT_S = 30.0
PREFETCH_POLL_S = 0.005
PREFETCHER = "coordinator.walprefetch"


def run_wal_fetch(args: argparse.Namespace) -> int:
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


def serve_without_cli(
    name: str, destination: str, *, spool_dir: str | None, source: str, prefetch: int
) -> bool:
    """The served path for ``coordinator.fastpath``: move spooled ``name`` into ``destination``.

    Only when there is nothing else to do: no prefetcher to start (one runs, or half of the
    next ``prefetch`` segments are spooled), since starting one needs every setting of the full
    command line. False when it did not serve (then only an unfit spooled file was discarded).
    """
    root = spool_root_for(destination, spool_dir)
    if root is None or not is_segment(name):
        return False
    spool = Spool(root, source)
    if not spool.has(name):
        return False
    if prefetch > 0 and spool.count_ahead(name) * 2 < prefetch:
        from coordinator.background import helper_running

        if not helper_running(spool.lock_path):
            return False
    return spool.take(name, Path(destination)) is not None


def _serve_spooled(
    args: argparse.Namespace, spool: Spool, file_name: str, destination: Path
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
    if prefetch and spool.count_ahead(file_name) * 2 < prefetch:
        names = _prefetch_names(spool, file_name, prefetch, served_bytes)
        if len(names) * 2 > prefetch:
            _start_prefetcher(args, spool, names, served_bytes)
    return True


def _fetch_directly(
    args: argparse.Namespace, spool: Spool | None, file_name: str, destination: Path,
    *, serve: bool = True,
) -> int:
    from coordinator.commands import open_store
    from coordinator.walprefetch import WalArchive, keys_from, wal_layout

    storage = open_store(args)
    try:
        return _fetch(WalArchive(storage, wal_layout(args), keys_from(args, spool)), file_name,
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
    if stored is None:
        _with_retries(archive.require, attempts)
        if serve:
            log.info("'%s' is not in the archive at '%s'", file_name, archive.location)
        else:
            log.info("'%s' is a partial segment: not served without --allow-partial", file_name)
        return NOT_IN_ARCHIVE
    data, _ = _with_retries(functools.partial(archive.read, stored), attempts)
    write_atomically(destination, data, sync=False)  # not fsynced: see the module docstring
    return FETCHED


def _await_prefetched(spool: Spool, name: str, destination: Path) -> int | None:
    """Serve ``name`` once the running prefetcher spools it; None when none is fetching it, it
    gave up on it, or the wait passed its bound (the caller then fetches it itself)."""
    if not spool.being_prefetched(name):
        return None
    bound_s = _prefetch_wait_s()
    deadline = time.monotonic() + bound_s
    polls = 0
    while time.monotonic() < deadline:
        time.sleep(PREFETCH_POLL_S)
        polls += 1
        if spool.has(name):
            return spool.take(name, destination)
        # The plan and the lock are read less often than the sidecar is looked for.
        if polls % 10 == 0 and not spool.being_prefetched(name):
            return spool.take(name, destination)  # spooled just before the prefetcher left?
    log.warning("the prefetcher has not delivered '%s' within %.0f s: fetching it directly",
                name, bound_s)  # fmt: skip
    return None


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


def following_segments(file_name: str, count: int, segment_bytes: int | None) -> list[str]:
    """Names of the ``count`` segments after ``file_name`` on its timeline.

    The segment size is the served file's length when known, else PostgreSQL's default: a wrong
    guess can only name a segment that does not exist, which ends prefetching early.
    """
    from storage.walnames import DEFAULT_SEGMENT_SIZE, Segment

    size = DEFAULT_SEGMENT_SIZE
    if segment_bytes and not segment_bytes & (segment_bytes - 1):
        size = segment_bytes
    try:
        segment = Segment.parse(file_name, size)
    except ConfigError:
        return []
    names = []
    for _ in range(count):
        segment = segment.next()
        names.append(segment.name(size))
    return names


def _start_prefetcher(
    args: argparse.Namespace, spool: Spool, names: list[str], segment_bytes: int | None
) -> None:
    """Start the detached prefetcher for ``names`` unless one is running already."""
    if not names:
        return
    from coordinator.background import helper_running, namespace_settings, spawn_helper

    if helper_running(spool.lock_path):
        return
    settings = {**namespace_settings(args), "names": names, "segment_bytes": segment_bytes,
                "spool_root": str(spool.root.absolute()), "source": spool.source}  # fmt: skip
    try:
        process = spawn_helper(PREFETCHER, settings, spool.log_path)
    except OSError as exc:  # an optimisation: this call does not depend on it
        log.warning("cannot start the WAL prefetcher: %s", exc)
        return
    log.debug("started prefetcher %d for %d segments from '%s'", process.pid, len(names),
              names[0])  # fmt: skip


def _prefetch_wait_s() -> float:
    return max(0.0, _env_number("CLOUD_DUMP_WAL_PREFETCH_WAIT", DEFAULT_PREFETCH_WAIT_S, float))


def _attempts() -> int:
    return max(1, _env_number("CLOUD_DUMP_WAL_FETCH_RETRIES", DEFAULT_ATTEMPTS, int))


def _env_number(name: str, default: _N, kind: Callable[[str], _N]) -> _N:
    raw = os.environ.get(name, "")
    try:
        return kind(raw) if raw else default
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}='{raw}' is not {what}") from None


def _with_retries(fetch: Callable[[], _T], attempts: int) -> _T:
    for attempt in range(1, attempts + 1):
        try:
            return fetch()
        except TransientStorageError as exc:
            if attempt == attempts:
                raise
            delay_s = RETRY_BASE_DELAY_S * 3 ** (attempt - 1)
            log.warning("%s; retrying in %.0f s (attempt %d of %d)", exc, delay_s, attempt,
                        attempts)
            time.sleep(delay_s)
    raise AssertionError("unreachable")


# --- settings shared with the prefetcher ---------------------------------------------------------


def spool_root(args: argparse.Namespace) -> Path | None:
    return spool_root_for(args.path, args.spool_dir)


def spool_root_for(destination: str, spool_dir: str | None) -> Path | None:
    """The spool of a call writing ``destination`` (``%p``); None: it has none.

    ``--spool-dir`` when given. Otherwise only a file going into an existing ``pg_wal``
    directory has one, ``<that pg_wal>/cloud-dump``: restore_command runs in the data directory
    with ``%p`` = ``pg_wal/RECOVERYXLOG``. A call run by hand into another directory creates
    nothing there or in its working directory (see the module docstring). The rule is wal-push's
    too: one definition, ``coordinator.fastpath.wal_spool_dir``.
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
    docstrings of this module and of ``coordinator.walprefetch``.
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
            _move(path, destination)
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
        return sum(1 for entry in self.entries() if entry[:8] == name[:8] and entry > name)

    def remove_temp_files(self) -> None:
        """Drop what a stopped writer left (only the prefetcher, holding the lock, calls this)."""
        with contextlib.suppress(FileNotFoundError):
            for path in self.prefetch_dir.iterdir():
                if path.name.startswith(_TEMP_PREFIX):
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
        for entry in self.entries():
            if entry[:8] == name[:8] and entry < name:
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


# --- moving and writing files --------------------------------------------------------------------

_TEMP_PREFIX = ".cloud-dump-tmp-"


def _move(source: Path, destination: Path) -> None:
    """Rename ``source`` onto ``destination``; across file systems (a ``--spool-dir`` elsewhere)
    copy it beside ``destination`` first, so that it still appears whole."""
    try:
        source.replace(destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        write_atomically(destination, source.read_bytes(), sync=False)
        source.unlink()


def write_atomically(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``path`` (mode 0600) so that it appears whole or not at all.

    A temp file beside it is renamed over it; with ``sync`` the file is fsynced before the rename
    and the directory after it, so the name never points at unwritten blocks after a crash.
    """
    tmp = path.with_name(f"{_TEMP_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise _naming_target(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _naming_target(exc, path) from exc
        raise
    if sync:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _naming_target(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path``, the file asked for, not the temporary file beside it (a name
    the operator never gave, for a directory that may not even exist)."""
    return type(exc)(exc.errno, exc.strerror, str(path))


def is_segment(name: str) -> bool:
    return kind_of(name) == "segment"
