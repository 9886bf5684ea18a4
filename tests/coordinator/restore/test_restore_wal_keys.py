"""A restore with a recovery target proves, before downloading anything, that the keys it has
decrypt the WAL archive: otherwise every ``wal-fetch`` of the copy would fail, found out only at
``pg_ctl start`` after the whole restore (exit 14, naming the key or object and what to give).

One real backup (``cloud-dump backup --recipient-key``, PostgreSQL 15), restored with its
identity; WAL archived here in wal-push's format (``devrig.walarchive``) under a prefix of each
test's own, in passphrase mode or encrypted to another recipient.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.crypto import generate_identity
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster, make_postgres_dir
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from devrig.walarchive import archive_wal, passphrase_segments
from storage.layout import Layout
from storage.manifest import BackupManifest


@dataclass(frozen=True)
class KeyedBackup:
    store: StorageTarget
    manifest: BackupManifest
    identity: Path  # the backup's key, as the operator of the finding gave it
    tmp: Path


@pytest.fixture(scope="module")
def backup(pg15: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedBackup]:
    tmp = tmp_path_factory.mktemp("wal-keys")
    identity = tmp / "backup.key"
    identity.write_text(generate_identity()[0] + "\n")
    store = local_target(make_postgres_dir("cloud-dump-wal-keys-") / "store")
    backup_cli(pg15, store, "rk1", "--recipient-key", str(identity))
    opened = store.open()
    yield KeyedBackup(store, BackupManifest.from_json(opened.get("rk1/manifest.json"), "rk1"),
                      identity, tmp)
    opened.close()


def restore(
    backup: KeyedBackup, prefix: str, *flags: str
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    pgdata = make_postgres_dir("cloud-dump-wal-keys-") / "data"
    done = run_cli("restore", "--name", "rk1", "--pgdata", str(pgdata), "--identity-key",
                   str(backup.identity), "--wal-prefix", prefix, "--recovery-target", "latest",
                   *flags, env=backup.store.env)
    return pgdata, done


def refused(pgdata: Path, done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a restore refused as the keys' (exit 14), nothing written."""
    assert done.returncode == 14, done.stderr
    assert not pgdata.exists()
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_passphrase_archive_refuses_the_backups_identity_and_a_wrong_passphrase(
    backup: KeyedBackup,
) -> None:
    """The finding: a backup taken with --recipient-key, WAL archived with a passphrase."""
    layout = Layout(wal_prefix="wal_passphrase")
    storage = backup.store.open()
    passphrase_file = passphrase_segments(
        storage, layout, {backup.manifest.start_wal_file: b"wal" * 1000}, backup.tmp)
    storage.close()
    key = "wal_passphrase/cloud-dump-archive-key.age"

    pgdata, done = restore(backup, "wal_passphrase")
    line = refused(pgdata, done)
    assert f"'{key}'" in line and "no identity given is the WAL archive's own key" in line
    assert "--wal-passphrase-file" in line and "restore tried the backup's keys" in line

    wrong = backup.tmp / "wrong-passphrase"
    wrong.write_text("not the passphrase\n")
    pgdata, done = restore(backup, "wal_passphrase", "--wal-passphrase-file", str(wrong))
    line = refused(pgdata, done)
    assert f"the passphrase given does not open the WAL archive's key '{key}'" in line
    assert "restore tried the backup's keys" not in line

    pgdata, done = restore(backup, "wal_passphrase", "--wal-passphrase-file",
                           str(passphrase_file))
    assert done.returncode == 0, done.stderr
    assert (pgdata / "recovery.signal").is_file()


def test_recipient_archive_refuses_keys_that_do_not_open_the_first_segment(
    backup: KeyedBackup,
) -> None:
    """WAL encrypted to a recipient of its own (no archive description): the first segment
    recovery reads must open with the identities; segments before the backup do not count."""
    layout = Layout(wal_prefix="wal_recipients")
    wal_secret, wal_public = generate_identity()
    other_public = generate_identity()[1]
    storage = backup.store.open()
    first = backup.manifest.start_wal_file
    archive_wal(storage, layout, "000000010000000000000000", b"old" * 1000,
                recipients=[other_public])  # before the backup: never read
    stored = archive_wal(storage, layout, first, b"wal" * 1000, recipients=[wal_public])
    storage.close()

    pgdata, done = restore(backup, "wal_recipients")
    line = refused(pgdata, done)
    assert f"cannot decrypt archived WAL '{stored}'" in line
    assert "--wal-identity-key" in line and "restore tried the backup's keys" in line

    wal_key = backup.tmp / "wal.key"
    wal_key.write_text(wal_secret + "\n")
    pgdata, done = restore(backup, "wal_recipients", "--wal-identity-key", str(wal_key))
    assert done.returncode == 0, done.stderr
    assert (pgdata / "recovery.signal").is_file()


def test_wal_keys_without_an_identity_are_refused_naming_the_segment_read_first(
    backup: KeyedBackup,
) -> None:
    """Only a WAL passphrase given (which replaces the backup's keys for the WAL), the WAL
    encrypted to recipients, the backup's first segment not archived: the next one is named."""
    layout = Layout(wal_prefix="wal_nokey")
    storage = backup.store.open()
    later = "000000010000000000000099"
    stored = archive_wal(storage, layout, later, b"wal" * 1000,
                         recipients=[generate_identity()[1]])
    storage.close()
    pgdata, done = restore(backup, "wal_nokey", "--wal-passphrase", "not-this-archive's")
    line = refused(pgdata, done)
    assert (f"archived WAL '{stored}' is encrypted to age recipients and no identity was "
            "given") in line
    assert "--wal-identity-key" in line and "restore tried the backup's keys" not in line
