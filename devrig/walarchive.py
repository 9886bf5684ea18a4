"""WAL archived as wal-push stores it, and wal-fetch run as PostgreSQL runs it (one process per
file, working directory PGDATA), for the wal-fetch tests.

``archive_wal`` writes an archive in wal-push's format (key, compression and age suffixes,
raw-sha256 metadata, archive info for passphrase mode), so those tests do not depend on wal-push.

``pgdata`` (function) stands for the data directory restore_command runs in. A call may leave the
detached prefetcher running: at its end the fixture waits for it to finish (or kills that one
process and fails) before the directory goes away. ``wal_fetch`` has it stop after 1 s without a
segment taken from the spool (5 s by default), so that the tests do not wait on it for long.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import lz4.frame
import pytest
import zstandard

from coordinator.crypto import encrypt_bytes, generate_identity, wrap_identity
from coordinator.wait import wait_until
from devrig.moto import StorageTarget
from devrig.services import VENV_BIN
from storage.base import Storage
from storage.layout import Layout

SEGMENT_BYTES = 16 * 1024 * 1024
SEGMENT = "000000010000000000000003"
PASSPHRASE = "correct horse battery staple"


def segment_bytes(seed: int, size: int = SEGMENT_BYTES) -> bytes:
    """Deterministic WAL-like content: compressible, but different for every seed."""
    block = hashlib.sha256(str(seed).encode()).digest() * 128  # 4 KiB of varying bytes
    return (block + bytes(12 * 1024)) * (size // (16 * 1024))


def segment_name(number: int) -> str:
    return f"0000000100000000{number:08X}"


def compress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1)
    if compression == "lz4":
        return bytes(lz4.frame.compress(data))
    return data


def archive_wal(
    store: Storage,
    layout: Layout,
    name: str,
    data: bytes,
    *,
    compression: str = "zstd",
    recipients: Sequence[str] = (),
    raw_sha256: str | None = None,
) -> str:
    """Store ``data`` as wal-push does; returns the key."""
    payload = compress(data, compression)
    if recipients:
        payload = encrypt_bytes(payload, recipients)
    key = layout.wal_key(name, compression, encrypted=bool(recipients))
    metadata = {"raw-sha256": raw_sha256 or hashlib.sha256(data).hexdigest(),
                "system-identifier": "7300000000000000001"}
    store.put(key, payload, metadata=metadata)
    return key


@functools.cache
def wrapped_identity() -> tuple[bytes, str]:
    """One passphrase-wrapped identity for the whole session: scrypt costs seconds a call."""
    identity, recipient = generate_identity()
    return wrap_identity(identity, PASSPHRASE), recipient


def passphrase_archive(store: Storage, layout: Layout) -> str:
    """Archive info for passphrase mode; returns the public key WAL is encrypted to."""
    wrapped, recipient = wrapped_identity()
    wrapped_key = layout.wal_root + "cloud-dump-archive-key.age"
    store.put(wrapped_key, wrapped)
    info = {"format": 1, "system_identifier": "7300000000000000001",
            "encryption": {"mode": "passphrase", "recipient": recipient,
                           "wrapped_identity_key": wrapped_key}}
    store.put(layout.wal_root + "cloud-dump-archive.json", json.dumps(info).encode())
    return recipient


def passphrase_segments(
    storage: Storage, layout: Layout, segments: dict[str, bytes], tmp_path: Path
) -> Path:
    """Archive ``segments`` encrypted in passphrase mode; the passphrase file."""
    recipient = passphrase_archive(storage, layout)
    for name, data in segments.items():
        archive_wal(storage, layout, name, data, recipients=[recipient])
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSPHRASE + "\n")
    return passphrase_file


@pytest.fixture
def pgdata(tmp_path: Path) -> Iterator[Path]:
    """Stands for the data directory restore_command runs in."""
    path = tmp_path / "pgdata"
    (path / "pg_wal").mkdir(parents=True)
    yield path
    if not wait_for_prefetcher(path):
        left = prefetcher_pids(path)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"prefetcher(s) {left} still running 60 s after the test")


def spool_dir(pgdata: Path) -> Path:
    return pgdata / "pg_wal/cloud-dump"


def prefetcher_pids(pgdata: Path) -> list[int]:
    """The prefetchers that wal-fetch calls in ``pgdata`` started: they run in its directory.

    Found by process rather than by the spool's lock, which a prefetcher takes only once its
    interpreter is up, a moment after the call that started it returned.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = (entry / "cwd").readlink()
        except OSError:  # not a process, gone, or a zombie
            continue
        if b"coordinator.wal.fetch.helper" in argv and cwd == pgdata.resolve():
            pids.append(int(entry.name))
    return pids


def wait_for_prefetcher(pgdata: Path, timeout_s: float = 60) -> bool:
    """Wait until the prefetchers started in ``pgdata`` exit; False if one is still running."""
    return bool(wait_until(lambda: not prefetcher_pids(pgdata), timeout_s=timeout_s,
                           first_s=0.02))


def wal_fetch(
    target: StorageTarget,
    pgdata: Path,
    name: str,
    *extra: str,
    dest: str | Path = "pg_wal/RECOVERYXLOG",
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run wal-fetch as restore_command does: %p relative to PGDATA, the working directory (by
    hand: any directory, any destination)."""
    return subprocess.run(
        [str(VENV_BIN / "cloud-dump"), "wal-fetch", name, str(dest), *extra],
        capture_output=True, text=True, timeout=120, cwd=pgdata, check=False,
        env={**os.environ, "CLOUD_DUMP_WAL_FETCH_RETRIES": "1",
             "CLOUD_DUMP_WAL_PREFETCH_IDLE_EXIT": "1", **target.env, **(env or {})},
    )


def assert_not_written(pgdata: Path) -> None:
    leftovers = [p.name for p in (pgdata / "pg_wal").iterdir() if p.is_file()]
    assert leftovers == [], "wal-fetch left files in pg_wal"
