"""The detached WAL prefetcher, and the reading of WAL from the archive it shares with wal-fetch.

The prefetcher is started by a ``wal-fetch`` call (``coordinator.walfetch``) as ``python -m
coordinator.walprefetch``, detached, with the call's settings and the segments to fetch first on
stdin (``coordinator.background``); at most one runs per spool (``prefetch.lock``, held for its
whole life). It

- records its plan at once: the segments it still means to deliver, with its pid, so that a call
  asking for one of them waits for it instead of fetching it a second time. A segment leaves the
  plan when it is spooled or given up;
- fetches them in order in ``FETCH_THREADS`` threads (HEAD for raw-sha256, then GET), verifies
  each and spools it: the data file, fsynced, then its sidecar (``Spool.put``). Where they are
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

import argparse
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from coordinator.background import HelperLock, read_settings
from coordinator.walarchive import require_wal_archive
from coordinator.walfetch import Spool, following_segments, is_segment
from storage.base import sha256_hex
from storage.errors import CloudDumpError, ConfigError, DecryptionFailed, IntegrityError
from storage.layout import (
    COMPRESSION_SUFFIXES,
    DEFAULT_WAL_PREFIX,
    ENCRYPTED_SUFFIX,
    Layout,
    compression_suffix,
)
from storage.layout import WAL_ARCHIVE_INFO_NAME as ARCHIVE_INFO_NAME
from storage.layout import WAL_RAW_SHA256 as RAW_SHA256
from storage.walnames import kind_of

if TYPE_CHECKING:
    from storage import Storage

log = logging.getLogger("cloud-dump.prefetcher")

FETCH_THREADS = 4
DEADLINE_S = 300.0  # no segment is planned after this
HARD_DEADLINE_S = DEADLINE_S + 60.0
DEFAULT_IDLE_EXIT_S = 5.0  # replaying one segment takes well under a second
POLL_S = 0.01
_SUFFIX_TO_COMPRESSION = {suffix: name for name, suffix in COMPRESSION_SUFFIXES.items()}


def main() -> int:
    args = read_settings()
    spool = Spool(Path(args.spool_root), str(args.source))
    lock = HelperLock(spool.lock_path)
    if not lock.try_acquire():
        return 0  # another prefetcher serves this spool
    try:
        _setup_logging(str(args.log_level))
        _exit_at_deadline(spool)
        args.passphrase_from_flag = False  # the call that started us warned already
        prefetch(args, spool, [n for n in args.names if is_segment(str(n))])
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


def prefetch(args: argparse.Namespace, spool: Spool, names: list[str]) -> None:
    """Spool the segments ``names``, then the ones after them while calls consume the spool."""
    plan = Plan(spool, [name for name in names if not spool.has(name)])
    if not plan.names:
        return
    log.info("prefetching from '%s'", plan.names[0])
    spool.remove_temp_files()
    from coordinator.commands import open_store

    storage = open_store(args)
    try:
        archive = WalArchive(storage, wal_layout(args), keys_from(args, spool))
        window = max(1, int(args.prefetch))
        Prefetcher(archive, spool, plan, window, args.segment_bytes).run()
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
            time.sleep(POLL_S)
        log.info("stopping after a failed prefetch")
        return []

    def _spool_one(self, name: str, stored: StoredWal) -> None:
        try:
            data, raw_sha256 = self._archive.read(stored)
            self._spool.put(name, data, raw_sha256)
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


def _idle_exit_s() -> float:
    raw = os.environ.get("CLOUD_DUMP_WAL_PREFETCH_IDLE_EXIT", "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_IDLE_EXIT_S
    except ValueError:
        log.warning("CLOUD_DUMP_WAL_PREFETCH_IDLE_EXIT='%s' is not a number: using %.0f s", raw,
                    DEFAULT_IDLE_EXIT_S)  # fmt: skip
        return DEFAULT_IDLE_EXIT_S


def _exit_at_deadline(spool: Spool) -> None:
    """End the process at ``HARD_DEADLINE_S`` whatever its threads wait for (a hung request)."""

    def abandon() -> None:
        log.error("WAL prefetcher still busy after %.0f s: exiting", HARD_DEADLINE_S)
        spool.clear_plan()
        os._exit(1)  # the lock goes with the process

    timer = threading.Timer(HARD_DEADLINE_S, abandon)
    timer.daemon = True
    timer.start()


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)  # prefetch.log in the spool
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def wal_layout(args: argparse.Namespace) -> Layout:
    return Layout(cluster=args.cluster, wal_prefix=args.wal_prefix or DEFAULT_WAL_PREFIX)


def keys_from(args: argparse.Namespace, spool: Spool | None) -> Keys:
    from coordinator.commands import read_passphrase

    return Keys([Path(p) for p in args.identity_key or []], lambda: read_passphrase(args), spool)


# --- reading the archive -------------------------------------------------------------------------


class StoredWal(NamedTuple):
    key: str
    compression: str
    encrypted: bool


class WalArchive:
    """Reads WAL files as wal-push stored them: ``<wal_root><name>[.zst|.gz|.lz4][.age]``."""

    def __init__(self, storage: Storage, layout: Layout, keys: Keys) -> None:
        self._storage = storage
        self._layout = layout
        self._keys = keys

    @property
    def location(self) -> str:
        """The archive in full, storage URL included, for messages."""
        return f"{self._storage.url.rstrip('/')}/{self._layout.wal_root}"

    def find(self, file_name: str) -> StoredWal | None:
        """Where ``file_name`` is stored, or None when it is not archived (one LIST)."""
        prefix = self._layout.wal_root + file_name
        for info in self._storage.list(prefix):
            # The prefix also matches "<segment>.partial" and "<segment>.<offset>.backup".
            stored = _stored(info.key, info.key[len(prefix):])
            if stored is not None:
                return stored
        return None

    def list_segments(self, prefix: str) -> dict[str, StoredWal]:
        """Every segment stored under ``prefix`` (timeline and log, 16 hex digits: 256 segments
        of 16 MiB), from one LIST instead of one per segment."""
        root = self._layout.wal_root
        found: dict[str, StoredWal] = {}
        for info in self._storage.list(root + prefix):
            name = info.key[len(root):len(root) + 24]
            stored = _stored(info.key, info.key[len(root) + 24:])
            if stored is not None and is_segment(name):
                found.setdefault(name, stored)  # the first in key order, as find() takes
        return found

    def require(self) -> None:
        """Raise ``WalArchiveNotFound`` unless an archive exists here: asked only before
        answering "not archived", which PostgreSQL takes for the end of the archive."""
        require_wal_archive(self._storage, self._layout)

    def read(self, stored: StoredWal) -> tuple[bytes, str]:
        """The original bytes of ``stored`` and their SHA-256, verified against raw-sha256."""
        key = stored.key
        expected = (self._storage.head(key).metadata or {}).get(RAW_SHA256)
        if not expected:
            raise IntegrityError(f"archived WAL '{key}' has no {RAW_SHA256} metadata")
        data = self._storage.get(key)
        if stored.encrypted:
            data = self._keys.decrypt(data, key, self)
        plain = _decompress(data, stored.compression, f"archived WAL '{key}'")
        actual = sha256_hex(plain)
        if actual != expected:
            raise IntegrityError(
                f"archived WAL '{key}' does not match its recorded sha256 "
                f"(expected {expected}, got {actual})"
            )
        _check_segment_header(plain, stored)
        return plain, actual

    def read_info(self) -> dict[str, object]:
        key = self._layout.wal_root + ARCHIVE_INFO_NAME
        try:
            info = json.loads(self._storage.get(key))
        except ValueError as exc:
            raise IntegrityError(f"archive info '{key}' is not valid JSON") from exc
        if not isinstance(info, dict) or info.get("format") != 1:
            raise IntegrityError(f"archive info '{key}' has an unknown format")
        return info

    def get(self, key: str) -> bytes:
        return self._storage.get(key)


def _stored(key: str, suffix: str) -> StoredWal | None:
    """``key`` as a stored WAL file if ``suffix`` (what follows the name) is wal-push's."""
    compression = _SUFFIX_TO_COMPRESSION.get(suffix.removesuffix(ENCRYPTED_SUFFIX))
    if compression is None:
        return None
    return StoredWal(key, compression, suffix.endswith(ENCRYPTED_SUFFIX))


def _check_segment_header(plain: bytes, stored: StoredWal) -> None:
    """Refuse a segment whose first page says it is another segment.

    PostgreSQL would read its "unexpected pageaddr" as the end of WAL and, in archive recovery,
    promote early. wal-push refuses such files since it checks headers; this catches what an
    older version, another tool or a hand copy stored. Data without a long page header is left
    to PostgreSQL: cloud-dump's wal-push never stored any.
    """
    from coordinator.walheader import LONG_HEADER_BYTES, XLP_LONG_HEADER, segment_address_mismatch

    name = stored.key.rpartition("/")[2]
    name = name.removesuffix(ENCRYPTED_SUFFIX) if stored.encrypted else name
    name = name.removesuffix(compression_suffix(stored.compression))
    if kind_of(name) not in ("segment", "partial") or len(plain) < LONG_HEADER_BYTES:
        return
    # A long page header whose segment size is the file's own (a power of two): anything else
    # is not a segment cloud-dump's wal-push would have stored, and is left to PostgreSQL.
    seg_size = int.from_bytes(plain[32:36], "little")
    info = int.from_bytes(plain[2:4], "little")
    if not info & XLP_LONG_HEADER or seg_size != len(plain) or seg_size & (seg_size - 1):
        return
    mismatch = segment_address_mismatch(plain, name)
    if mismatch is not None:
        raise IntegrityError(
            f"archived WAL '{stored.key}' {mismatch}: not handing PostgreSQL another segment "
            "under this name"
        )


def _decompress(data: bytes, compression: str, what: str) -> bytes:
    if compression == "none":
        return data
    import io

    from coordinator.fetch import open_plaintext

    return open_plaintext(io.BytesIO(data), compression, identities=None, what=what).read(-1)


# --- decryption keys -----------------------------------------------------------------------------


class Keys:
    """The identities that decrypt the archive, resolved at most once per process.

    ``identity_paths``: recipient mode (``--identity-key``). Otherwise passphrase mode: the
    identity cached in the spool, or the archive's wrapped identity unwrapped with the passphrase
    (``passphrase`` is called only then, so an unencrypted archive needs no passphrase file).
    Without a spool (a call run by hand outside ``pg_wal``) nothing is cached.
    """

    def __init__(
        self, identity_paths: list[Path], passphrase: Callable[[], str | None],
        spool: Spool | None,
    ) -> None:
        self.identity_paths = identity_paths
        self.passphrase = passphrase
        self.spool = spool
        self._identities: list[str] | None = None
        self._failure: Exception | None = None  # one wrong passphrase costs one scrypt
        self._lock = threading.Lock()

    def decrypt(self, data: bytes, key: str, archive: WalArchive) -> bytes:
        from coordinator.crypto import decrypt_bytes

        what = f"archived WAL '{key}'"
        identities = self._resolve(archive, refresh=False)
        try:
            return decrypt_bytes(data, identities, what)
        except DecryptionFailed:
            if self.identity_paths or self._cached() not in identities:
                raise
        # The cached identity may belong to an archive that was since recreated: unwrap again.
        return decrypt_bytes(data, self._resolve(archive, refresh=True), what)

    def _resolve(self, archive: WalArchive, *, refresh: bool) -> list[str]:
        with self._lock:  # the prefetcher's threads share one unwrap (scrypt costs ~1.7 s)
            if self._failure is not None:
                raise self._failure
            if self._identities is not None and not refresh:
                return self._identities
            try:
                self._identities = self._load(archive, refresh)
            except (ConfigError, DecryptionFailed) as exc:
                self._failure = exc
                raise
            return self._identities

    def _load(self, archive: WalArchive, refresh: bool) -> list[str]:
        from coordinator.crypto import read_identities, unwrap_identity

        if self.identity_paths:
            return read_identities(self.identity_paths)
        cached = None if refresh else self._cached()
        if cached is not None:
            return [cached]
        info = archive.read_info()
        encryption = info.get("encryption")
        if not isinstance(encryption, dict) or encryption.get("mode") != "passphrase":
            raise ConfigError("the WAL archive is encrypted to age recipients: give "
                              "--identity-key FILE (env CLOUD_DUMP_IDENTITY_KEY)")
        passphrase = self.passphrase()
        if passphrase is None:
            raise ConfigError("the WAL archive is encrypted with a passphrase: none given "
                              "(--passphrase-file or CLOUD_DUMP_PASSPHRASE)")
        key = str(encryption["wrapped_identity_key"])
        identity = unwrap_identity(archive.get(key), passphrase, key)
        if self.spool is not None:
            self.spool.cache_identity(identity)
        return [identity]

    def _cached(self) -> str | None:
        return None if self.spool is None else self.spool.cached_identity()


if __name__ == "__main__":
    sys.exit(main())
