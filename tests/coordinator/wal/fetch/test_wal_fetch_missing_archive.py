"""``wal-fetch`` where no archive exists: never exit 1, which PostgreSQL takes for its end.

Exit 1 means "this archive exists and does not have this file"; at the end of the archive
PostgreSQL promotes. A location with no archive at all (a ``file://`` directory that is not
there or is empty, an S3 prefix with a typo, a bucket that does not exist, a wrong ``--cluster``
or ``--wal-prefix``) must stop recovery instead: exit 200 with one error line naming the
location. Every file PostgreSQL asks for is covered (a segment into ``RECOVERYXLOG``, the
``.history`` probe into ``RECOVERYHISTORY``, a ``.partial`` without ``--allow-partial``), with
and without encryption flags, and the detached prefetcher a segment call starts must not
remember a missing archive as the end of one. Real recoveries are in
``test_wal_fetch_recovery.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.crypto import generate_identity
from devrig.moto import S3_PREFIX, StorageTarget, local_target, s3_target
from devrig.services import run_cli
from devrig.walarchive import (
    SEGMENT,
    archive_wal,
    assert_not_written,
    passphrase_archive,
    segment_bytes,
    spool_dir,
    wait_for_prefetcher,
    wal_fetch,
)
from storage.base import Storage
from storage.layout import Layout

STOP_RECOVERY = 200  # what PostgreSQL must see: above 127, logged as "exit code 200"
HISTORY = "00000002.history"
PARTIAL = SEGMENT + ".partial"
# (file asked for, %p as PostgreSQL passes it, extra flags)
REQUESTS = [
    (SEGMENT, "pg_wal/RECOVERYXLOG", ()),
    (HISTORY, "pg_wal/RECOVERYHISTORY", ()),
    (PARTIAL, f"pg_wal/{PARTIAL}", ()),
]


@dataclass(frozen=True)
class Missing:
    """A location without an archive: the target and flags a call uses, and what its error
    line must say (naming the location)."""

    target: StorageTarget
    flags: tuple[str, ...]
    error: str
    env: dict[str, str]
    absent: Path | None = None  # a directory that must still not exist afterwards


def no_archive_at(location: str) -> str:
    return f"no WAL archive at '{location}'"


def _elsewhere_archived(store: Storage) -> None:
    """An archive that does exist, beside the location the call is pointed at."""
    archive_wal(store, Layout(cluster="prod"), SEGMENT, segment_bytes(1))
    archive_wal(store, Layout(), "000000010000000000000001", segment_bytes(2))


def _local(tmp_path: Path, how: str) -> Missing:
    root = tmp_path / "store"
    target = local_target(root)
    if how == "absent-directory":
        # Like a missing bucket: the store itself is not there (and is not created).
        absent = tmp_path / "no-such-store"
        return Missing(local_target(absent, create=False), (),
                       f"storage directory '{absent}' does not exist", {}, absent)
    if how == "empty-directory":
        return Missing(target, (), no_archive_at(f"file://{root}/wal_archive/"), {})
    store = target.open()
    _elsewhere_archived(store)
    store.close()
    if how == "wrong-cluster":
        return Missing(target, ("--cluster", "prdo"),
                       no_archive_at(f"file://{root}/prdo/wal_archive/"), {})
    assert how == "wrong-wal-prefix"
    return Missing(target, ("--wal-prefix", "wal-archive"),
                   no_archive_at(f"file://{root}/wal-archive/"), {})


def _s3(request: pytest.FixtureRequest, how: str) -> Missing:
    endpoint = request.getfixturevalue("moto_server").endpoint
    aws_env: dict[str, str] = request.getfixturevalue("aws_env")
    bucket: str = request.getfixturevalue("s3_bucket")
    target = s3_target(endpoint, bucket, aws_env)
    if how == "missing-bucket":
        bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
        missing = s3_target(endpoint, bucket, aws_env)
        return Missing(missing, (), f"bucket '{bucket}' does not exist", {})
    store = target.open()
    _elsewhere_archived(store)
    store.close()
    if how == "prefix-typo":
        typo = s3_target(endpoint, bucket, aws_env)
        url = f"s3://{bucket}/{S3_PREFIX}-typo"
        typo = StorageTarget("s3", url, typo.options, {**typo.env, "CLOUD_DUMP_STORAGE": url})
        return Missing(typo, (), no_archive_at(f"{url}/wal_archive/"), {})
    assert how == "wrong-cluster"
    return Missing(target, ("--cluster", "prdo"),
                   no_archive_at(f"{target.url}/prdo/wal_archive/"), {})


def _encrypted(tmp_path: Path, store_factory: Callable[[], Missing]) -> Missing:
    """The location's flags plus the keys of an encrypted archive (passphrase and identity)."""
    missing = store_factory()
    identity, _ = generate_identity()
    key_file = tmp_path / "wal.key"
    key_file.write_text(identity + "\n")
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text("not needed for an answer\n")
    return Missing(missing.target, (*missing.flags, "--identity-key", str(key_file)),
                   missing.error, {"CLOUD_DUMP_PASSPHRASE_FILE": str(passphrase_file)},
                   missing.absent)


LOCATIONS = [
    "local-absent-directory", "local-empty-directory", "local-wrong-cluster",
    "local-wrong-wal-prefix", "local-wrong-cluster-encrypted", "s3-prefix-typo",
    "s3-wrong-cluster", "s3-missing-bucket",
]  # fmt: skip


@pytest.fixture(params=LOCATIONS)
def missing(request: pytest.FixtureRequest, tmp_path: Path) -> Missing:
    kind, _, how = str(request.param).partition("-")
    encrypted = how.endswith("-encrypted")
    how = how.removesuffix("-encrypted")

    def make() -> Missing:
        return _local(tmp_path, how) if kind == "local" else _s3(request, how)

    return _encrypted(tmp_path, make) if encrypted else make()


def test_no_archive_at_the_location_stops_recovery_for_every_file_asked(
    missing: Missing, pgdata: Path
) -> None:
    for name, dest, flags in REQUESTS:
        done = wal_fetch(missing.target, pgdata, name, *missing.flags, *flags, dest=dest,
                         env=missing.env)  # fmt: skip
        assert done.returncode == STOP_RECOVERY, (name, done.returncode, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("cloud-dump: error: ")
        assert missing.error in lines[0], lines[0]
        assert_not_written(pgdata)
        assert missing.absent is None or not missing.absent.exists()
    # The segment call started a prefetcher for the following segments: a missing archive is
    # not the end of one, so nothing tells later calls that there is nothing more to fetch.
    assert wait_for_prefetcher(pgdata)
    assert not (spool_dir(pgdata) / "end-of-archive").exists()
    log = (spool_dir(pgdata) / "prefetch.log").read_text()
    assert "is not in the archive" not in log, log


def test_existing_archive_without_the_file_still_answers_1(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    # An encrypted archive (passphrase mode) that exists but has none of the files asked for.
    recipient = passphrase_archive(storage, Layout())
    archive_wal(storage, Layout(), "000000010000000000000001", segment_bytes(3),
                recipients=[recipient])  # fmt: skip
    for name, dest, flags in REQUESTS:
        done = wal_fetch(storage_target, pgdata, name, *flags, dest=dest,
                         env={"CLOUD_DUMP_PASSPHRASE": "unused"})
        assert done.returncode == 1, (name, done.stderr)
        assert "error" not in done.stderr
    assert_not_written(pgdata)


def test_archive_made_only_of_wal_files_counts_as_existing(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    # The seed tool writes no cloud-dump-archive.json: any object under the prefix will do.
    archive_wal(storage, Layout(), "00000003.history", b"2\t0/5000000\tno reason\n")
    done = wal_fetch(storage_target, pgdata, SEGMENT, "--prefetch", "0")
    assert done.returncode == 1, done.stderr


def _poisoned(tmp_path: Path, module: str) -> dict[str, str]:
    """A PYTHONPATH whose ``module`` fails on import: a broken installation, which no real
    server can produce (a stub, on purpose)."""
    poison = tmp_path / "poison"
    poison.mkdir(exist_ok=True)
    (poison / f"{module}.py").write_text(f"raise RuntimeError('{module} is broken')\n")
    return {"PYTHONPATH": str(poison)}


@pytest.mark.parametrize("storage_target", ["local"], indirect=True)
@pytest.mark.parametrize("module", ["zstandard", "argparse"],
                         ids=["inside-the-command", "importing-the-cli"])
def test_a_broken_installation_stops_recovery_instead_of_answering_1(
    storage_target: StorageTarget, storage: Storage, pgdata: Path,
    tmp_path: Path, module: str,
) -> None:
    # An error nobody anticipated is a bug, and Python's own exit status for it is 1: either
    # way PostgreSQL would take it for the end of the archive.
    archive_wal(storage, Layout(), SEGMENT, segment_bytes(4))
    done = wal_fetch(storage_target, pgdata, SEGMENT, "--prefetch", "0",
                     env=_poisoned(tmp_path, module))
    assert done.returncode == STOP_RECOVERY, done.stderr
    assert f"{module} is broken" in done.stderr
    assert_not_written(pgdata)


def test_help_names_the_stop_recovery_status() -> None:
    done = run_cli("wal-fetch", "--help")
    assert done.returncode == 0
    assert f"{STOP_RECOVERY} any other failure" in " ".join(done.stdout.split())
