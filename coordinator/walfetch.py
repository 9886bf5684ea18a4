"""``wal-fetch %f %p`` (restore_command): one WAL file from the archive into ``%p`` (DESIGN.md §4).

Contract with PostgreSQL:

- exit 0: ``%p`` holds exactly the archived file, written atomically (temp file in ``%p``'s
  directory, fsync, rename, fsync of the directory): never an empty or partial file;
- exit 1: the file is not in the archive (nothing written). A missing ``.history`` file is the
  common case at every recovery start and is answered after one LIST, without retries;
- anything else raises, and the CLI exits 126: PostgreSQL then stops recovery rather than take a
  storage outage for the end of the archive and promote early. Transient storage errors are
  retried (the backends retry each request; this module retries the whole fetch a few times).

``%p`` may be ``RECOVERYXLOG``/``RECOVERYHISTORY``: the file name always comes from ``%f``.

Prefetch. A segment request also fetches the next ``--prefetch`` segments of the same timeline in
parallel threads into ``<spool>/prefetch/``; later calls are served from there. The process waits
for its prefetches before exiting (nothing may outlive restore_command). A call served from the
spool touches storage only when fewer than half of the next segments are spooled, so most calls
are a local verify-and-rename without even importing the storage client.

Stale spool files. The spool defaults to ``pg_wal/cloud-dump`` of the cluster being recovered
(restore_command runs with the data directory as its working directory), and restore only writes
into an empty data directory: a spool therefore belongs to one restore. Each spooled file also
carries a sidecar with the SHA-256 of its content and the archive it came from; a file whose
sidecar is missing, names another archive (a ``--spool-dir`` shared between restores) or does not
match its content is discarded and fetched again.

Passphrase mode: the archive's X25519 identity is stored passphrase-wrapped (scrypt, ~1.7 s).
It is unwrapped once and cached in the spool (mode 0600, owned by the server's user) so later
calls do not pay scrypt again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from storage.base import sha256_hex
from storage.errors import (
    ConfigError,
    DecryptionFailed,
    IntegrityError,
    TransientStorageError,
)
from storage.layout import COMPRESSION_SUFFIXES, DEFAULT_WAL_PREFIX, ENCRYPTED_SUFFIX, Layout
from storage.walnames import DEFAULT_SEGMENT_SIZE, Segment, wal_kind

if TYPE_CHECKING:
    from storage import Storage

log = logging.getLogger(__name__)
_T = TypeVar("_T")

FETCHED = 0
NOT_IN_ARCHIVE = 1
ARCHIVE_INFO_NAME = "cloud-dump-archive.json"
RAW_SHA256 = "raw-sha256"
DEFAULT_ATTEMPTS = 3
# How long a prefetch's "not archived yet" stands: short, since a standby's archive grows.
END_OF_ARCHIVE_MEMORY_S = 10.0
RETRY_BASE_DELAY_S = 2.0  # 2 s then 6 s: ~8 s on top of the backends' own per-request retries
_SUFFIX_TO_COMPRESSION = {suffix: name for name, suffix in COMPRESSION_SUFFIXES.items()}


def run_wal_fetch(args: argparse.Namespace) -> int:
    """The ``wal-fetch`` command: 0 fetched, 1 not in the archive; raises on any other failure."""
    file_name = args.file_name
    kind = wal_kind(file_name)
    if kind == "partial" and not args.allow_partial:
        # PostgreSQL never replays a .partial segment on its own: serving one needs intent.
        log.info("'%s' is a partial segment: not served without --allow-partial", file_name)
        return NOT_IN_ARCHIVE
    if not args.storage:
        raise ConfigError("no storage given: use --storage or CLOUD_DUMP_STORAGE")
    layout = Layout(cluster=args.cluster, wal_prefix=args.wal_prefix or DEFAULT_WAL_PREFIX)
    spool = Spool(
        Path(args.spool_dir) if args.spool_dir else Path.cwd() / "pg_wal" / "cloud-dump",
        source=f"{args.storage}#{layout.wal_root}",
    )
    destination = Path(args.path)
    served_bytes = spool.take(file_name, destination)
    upcoming = _following(file_name, args.prefetch if kind == "segment" else 0, served_bytes)
    missing = [name for name in upcoming if not spool.has(name)]
    if served_bytes is not None:
        log.debug("served '%s' from the spool", file_name)
        # Half or more of the next segments spooled, or known to be past the end of the archive
        # a moment ago: no storage access at all for this call.
        end = spool.recent_end_of_archive()
        unknown = [n for n in missing if end is None or n[:8] != end[:8] or n < end]
        if len(unknown) * 2 <= len(upcoming):
            return FETCHED
    from coordinator.commands import open_store

    storage = open_store(args)
    try:
        archive = WalArchive(storage, layout, _keys_from(args, spool))
        wanted = None if served_bytes is not None else file_name
        return _fetch(archive, spool, wanted, destination, missing)
    finally:
        storage.close()


def _fetch(
    archive: WalArchive, spool: Spool, file_name: str | None, destination: Path,
    prefetch: list[str],
) -> int:
    """Fetch ``file_name`` (None: already served) into ``destination``; spool ``prefetch``."""
    attempts = _attempts()
    end_of_archive = threading.Event()
    found = None
    # The first request runs alone: it builds the storage client, which threads racing on
    # first use would each build again (~0.2 s of CPU apiece).
    if file_name is not None:
        found = _with_retries(lambda: archive.find(file_name), attempts)
        if found is None:
            log.info("'%s' is not in the archive", file_name)
            return NOT_IN_ARCHIVE
    elif prefetch:
        _prefetch_one(archive, spool, prefetch.pop(0), end_of_archive)
    # Leaving the pool waits for the prefetches: nothing may outlive restore_command.
    with ThreadPoolExecutor(max(1, len(prefetch)), "wal-prefetch") as pool:
        for name in prefetch:
            pool.submit(_prefetch_one, archive, spool, name, end_of_archive)
        if found is not None:
            stored = found
            write_atomically(destination, _with_retries(lambda: archive.read(*stored), attempts))
    return FETCHED


def _following(file_name: str, count: int, segment_bytes: int | None) -> list[str]:
    """Names of the ``count`` segments after ``file_name`` on its timeline.

    The segment size is the served file's length when known, else PostgreSQL's default: a wrong
    guess can only name a segment that does not exist, which ends prefetching early.
    """
    if count <= 0:  # also --prefetch 0 and negative values
        return []
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


def _prefetch_one(
    archive: WalArchive, spool: Spool, name: str, end_of_archive: threading.Event
) -> None:
    """Spool one segment; failures are logged only: they must never fail the current fetch."""
    if end_of_archive.is_set():
        return
    try:
        data = archive.fetch(name)
        if data is None:
            end_of_archive.set()
            spool.mark_end_of_archive(name)
            return
        spool.put(name, data)
    except Exception as exc:  # a prefetch is an optimisation; the real request will retry
        log.debug("prefetch of '%s' failed: %s", name, exc)


def _attempts() -> int:
    raw = os.environ.get("CLOUD_DUMP_WAL_FETCH_RETRIES", "")
    try:
        return max(1, int(raw)) if raw else DEFAULT_ATTEMPTS
    except ValueError:
        raise ConfigError(f"CLOUD_DUMP_WAL_FETCH_RETRIES='{raw}' is not a whole number") from None


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


# --- the archive ---------------------------------------------------------------------------------


class WalArchive:
    """Reads WAL files as wal-push stored them: ``<wal_root><name>[.zst|.gz|.lz4][.age]``."""

    def __init__(self, storage: Storage, layout: Layout, keys: Keys) -> None:
        self._storage = storage
        self._layout = layout
        self._keys = keys

    def find(self, file_name: str) -> tuple[str, str, bool] | None:
        """(key, compression, encrypted) of the stored file, or None when it is not archived."""
        prefix = self._layout.wal_root + file_name
        for info in self._storage.list(prefix):
            suffix = info.key[len(prefix):]
            encrypted = suffix.endswith(ENCRYPTED_SUFFIX)
            compression = _SUFFIX_TO_COMPRESSION.get(suffix.removesuffix(ENCRYPTED_SUFFIX))
            # The prefix also matches "<segment>.partial" and "<segment>.<offset>.backup".
            if compression is not None:
                return info.key, compression, encrypted
        return None

    def fetch(self, file_name: str) -> bytes | None:
        """The original bytes of ``file_name``, verified; None when it is not archived."""
        found = self.find(file_name)
        return None if found is None else self.read(*found)

    def read(self, key: str, compression: str, encrypted: bool) -> bytes:
        """The original bytes of the stored object ``key``, verified against raw-sha256."""
        expected = (self._storage.head(key).metadata or {}).get(RAW_SHA256)
        if not expected:
            raise IntegrityError(f"archived WAL '{key}' has no {RAW_SHA256} metadata")
        data = self._storage.get(key)
        if encrypted:
            data = self._keys.decrypt(data, key, self)
        plain = _decompress(data, compression, f"archived WAL '{key}'")
        actual = sha256_hex(plain)
        if actual != expected:
            raise IntegrityError(
                f"archived WAL '{key}' does not match its recorded sha256 "
                f"(expected {expected}, got {actual})"
            )
        return plain

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


def _decompress(data: bytes, compression: str, what: str) -> bytes:
    if compression == "none":
        return data
    import io

    from coordinator.fetch import open_plaintext

    return open_plaintext(io.BytesIO(data), compression, identities=None, what=what).read(-1)


# --- decryption keys -----------------------------------------------------------------------------


@dataclass
class Keys:
    """The identities that decrypt the archive, resolved at most once per process.

    ``identity_paths``: recipient mode (``--identity-key``). Otherwise passphrase mode: the
    identity cached in the spool, or the archive's wrapped identity unwrapped with the passphrase
    (``passphrase`` is called only then, so an unencrypted archive needs no passphrase file).
    """

    identity_paths: list[Path]
    passphrase: Callable[[], str | None]
    spool: Spool
    _identities: list[str] | None = None
    _failure: Exception | None = None  # one wrong passphrase costs one scrypt, not one a thread
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decrypt(self, data: bytes, key: str, archive: WalArchive) -> bytes:
        from coordinator.crypto import decrypt_bytes

        what = f"archived WAL '{key}'"
        identities = self._resolve(archive, refresh=False)
        try:
            return decrypt_bytes(data, identities, what)
        except DecryptionFailed:
            if self.identity_paths or self.spool.cached_identity() not in identities:
                raise
        # The cached identity may belong to an archive that was since recreated: unwrap again.
        return decrypt_bytes(data, self._resolve(archive, refresh=True), what)

    def _resolve(self, archive: WalArchive, *, refresh: bool) -> list[str]:
        with self._lock:  # prefetch threads share one unwrap (scrypt costs ~1.7 s)
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
        cached = None if refresh else self.spool.cached_identity()
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
        identity = unwrap_identity(
            archive.get(str(encryption["wrapped_identity_key"])), passphrase
        )
        self.spool.cache_identity(identity)
        return [identity]


def _keys_from(args: argparse.Namespace, spool: Spool) -> Keys:
    from coordinator.commands import read_passphrase

    # The CLI resolves these for the other commands only; wal-fetch keeps its imports lean.
    args.passphrase_from_flag = args.passphrase is not None
    args.passphrase = args.passphrase or os.environ.get("CLOUD_DUMP_PASSPHRASE") or None
    return Keys([Path(p) for p in args.identity_key or []], lambda: read_passphrase(args), spool)


# --- the spool -----------------------------------------------------------------------------------


class Spool:
    """Prefetched WAL files of one restore, and the cached identity. See the module docstring."""

    def __init__(self, root: Path, source: str) -> None:
        self.root = root
        self.prefetch_dir = root / "prefetch"
        self._source = source

    def has(self, name: str) -> bool:
        return (self.prefetch_dir / name).is_file()

    def put(self, name: str, data: bytes) -> None:
        """Spool ``data``: the sidecar first, so a spooled file without one is incomplete.

        Not fsynced: after a crash a damaged file fails its checksum and is fetched again.
        """
        self.prefetch_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        sidecar = json.dumps({"raw_sha256": sha256_hex(data), "source": self._source}).encode()
        write_atomically(self.prefetch_dir / f"{name}.json", sidecar, sync=False)
        write_atomically(self.prefetch_dir / name, data, sync=False)

    def take(self, name: str, destination: Path) -> int | None:
        """Move a verified spooled ``name`` to ``destination``; its size, or None if not spooled."""
        path = self.prefetch_dir / name
        if not path.is_file():
            return None
        problem = None
        try:
            data = path.read_bytes()
            facts = json.loads((self.prefetch_dir / f"{name}.json").read_bytes())
        except (OSError, ValueError):
            problem = "it has no valid sidecar"
        else:
            if not isinstance(facts, dict) or facts.get("source") != self._source:
                problem = "it was fetched from another archive"
            elif facts.get("raw_sha256") != sha256_hex(data):
                problem = "its content does not match its checksum"
        if problem is not None:
            log.warning("discarding spooled '%s': %s", name, problem)
            self._remove(name)
            return None
        write_atomically(destination, data)
        self._remove(name)
        self._prune_before(name)
        return len(data)

    def _remove(self, name: str) -> None:
        for path in (self.prefetch_dir / name, self.prefetch_dir / f"{name}.json"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _prune_before(self, name: str) -> None:
        """Drop spooled segments of this timeline older than ``name``: never asked for again
        (a restarted recovery re-fetches them from storage), they only hold disk space."""
        for entry in self._entries():
            if len(entry) == 24 and entry[:8] == name[:8] and entry < name[:24]:
                self._remove(entry)

    def _entries(self) -> Iterator[str]:
        try:
            yield from (p.name for p in self.prefetch_dir.iterdir() if "." not in p.name)
        except FileNotFoundError:
            return

    def mark_end_of_archive(self, name: str) -> None:
        """Remember that ``name`` was not archived yet, so that the next few calls served from
        the spool do not look for it again (only prefetching relies on this)."""
        with contextlib.suppress(OSError):
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(self._identity_path, (identity + "\n").encode(), sync=False)


# --- atomic writes -------------------------------------------------------------------------------


def write_atomically(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``path`` (mode 0600) so that it appears whole or not at all.

    A temp file beside it is renamed over it; with ``sync`` the file is fsynced before the rename
    and the directory after it, so the name never points at unwritten blocks after a crash.
    """
    tmp = path.with_name(f".cloud-dump-tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if sync:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
