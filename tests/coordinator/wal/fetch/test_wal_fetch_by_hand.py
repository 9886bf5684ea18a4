"""``wal-fetch`` run by hand: it writes the file asked for and creates no directory.

PostgreSQL runs restore_command in the data directory with ``%p`` = ``pg_wal/RECOVERYXLOG``, so
only a file going into a ``pg_wal`` directory has a spool (``<that pg_wal>/cloud-dump``: the
prefetched segments, the prefetcher, the cached identity, the remembered end of the archive).
An operator running ``wal-fetch NAME /some/abs/path`` from any directory gets the file and
nothing else, whatever the call does: fetch, answer "not archived", decrypt with a passphrase.
Prefetching in a real recovery is tested in ``test_wal_fetch_recovery.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devrig.moto import StorageTarget
from devrig.walarchive import (
    archive_wal,
    passphrase_segments,
    segment_bytes,
    segment_name,
    wait_for_prefetcher,
    wal_fetch,
)
from storage.base import Storage
from storage.layout import Layout

FIRST = segment_name(1)


def listing(root: Path) -> set[str]:
    """Every path under ``root``, directories included."""
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """The operator's working directory; waits for any prefetcher a call started there."""
    path = tmp_path / "scratch"
    path.mkdir()
    yield path
    assert wait_for_prefetcher(path), "a prefetcher is still running"


@pytest.mark.parametrize("storage_target", ["local"], indirect=True)
@pytest.mark.parametrize("case", ["segment", "not-archived", "passphrase", "history"])
def test_wal_fetch_by_hand_into_another_directory_creates_no_directory(
    storage_target: StorageTarget, storage: Storage, tmp_path: Path, scratch: Path, case: str
) -> None:
    segments = {segment_name(n): segment_bytes(200 + n) for n in range(1, 5)}
    env = {}
    if case == "passphrase":
        env["CLOUD_DUMP_PASSPHRASE_FILE"] = str(
            passphrase_segments(storage, Layout(), segments, tmp_path))
    else:
        for name, data in segments.items():
            archive_wal(storage, Layout(), name, data)
    history = b"1\t0/3000000\tno recovery target specified\n"
    archive_wal(storage, Layout(), "00000002.history", history)
    elsewhere = tmp_path / "restored-wal"
    elsewhere.mkdir()
    name = {"not-archived": segment_name(9), "history": "00000002.history"}.get(case, FIRST)
    before = listing(tmp_path)

    done = wal_fetch(storage_target, scratch, name, dest=elsewhere / name, env=env)

    assert wait_for_prefetcher(scratch)
    created = listing(tmp_path) - before
    if case == "not-archived":
        assert done.returncode == 1, done.stderr
        assert created == set()
    else:
        assert done.returncode == 0, done.stderr
        assert created == {f"restored-wal/{name}"}
        expected = history if case == "history" else segments[FIRST]
        assert (elsewhere / name).read_bytes() == expected


@pytest.mark.parametrize("storage_target", ["local"], indirect=True)
def test_spool_is_in_the_pg_wal_the_file_goes_to_not_in_the_working_directory(
    storage_target: StorageTarget, storage: Storage, tmp_path: Path, scratch: Path
) -> None:
    for n in range(1, 4):
        archive_wal(storage, Layout(), segment_name(n), segment_bytes(210 + n))
    pg_wal = tmp_path / "data" / "pg_wal"
    pg_wal.mkdir(parents=True)
    done = wal_fetch(storage_target, scratch, FIRST, "--prefetch", "2",
                     dest=pg_wal / "RECOVERYXLOG")
    assert done.returncode == 0, done.stderr
    assert wait_for_prefetcher(scratch)
    assert listing(scratch) == set()
    spooled = pg_wal / "cloud-dump" / "prefetch"
    assert sorted(p.name for p in spooled.iterdir() if p.suffix != ".sidecar") == [
        segment_name(2), segment_name(3)]
    # Served from that spool by a call made from yet another directory: gone from storage,
    # only the spool can deliver it.
    storage.delete(Layout().wal_key(segment_name(2), "zstd", encrypted=False))
    done = wal_fetch(storage_target, tmp_path, segment_name(2), "--prefetch", "0",
                     dest=pg_wal / "RECOVERYXLOG")
    assert done.returncode == 0, done.stderr
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == segment_bytes(212)
