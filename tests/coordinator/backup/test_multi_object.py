"""An archive longer than the store's part count continues in further objects (issue 12).

Parts keep one size however large the database grows; with ``--s3-max-parts 2`` and 5 MiB
parts every 10 MiB of a stored archive is its own object, so a small cluster's uncompressed base
archive spans several. Backed up through Celery workers on S3 (each object its own multipart
upload, opened and completed by the workers) and in-process to a local directory, encrypted;
then restored, verified plain and ``--deep``, damaged, and deleted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.crypto import generate_identity
from devrig import sample
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.roundtrip import backup_cli, restore_and_compare
from devrig.services import RedisServer, WorkerPool, error_line, run_cli
from storage.layout import Layout
from storage.manifest import ArchiveRecord, BackupManifest

PARTS_PER_OBJECT = 2
PART_BYTES = 5 * 1024 * 1024
SPLIT = ("--compression", "none", "--s3-max-parts", str(PARTS_PER_OBJECT))


def manifest_of(target: StorageTarget, name: str) -> BackupManifest:
    store = target.open()
    try:
        key = Layout().manifest_key(name)
        return BackupManifest.from_json(store.get(key), key)
    finally:
        store.close()


def assert_split(target: StorageTarget, manifest: BackupManifest) -> ArchiveRecord:
    """The base archive is several objects of at most two parts, named in order, whose bytes
    are the stream the manifest records; every other archive is one object, as before."""
    assert manifest.format_version == 3
    base = next(a for a in manifest.archives if a.name == "base")
    objects = base.stored_objects
    assert len(objects) >= 3, objects
    assert [o.key for o in objects] == [
        Layout.archive_object_key(base.key, i) for i in range(len(objects))
    ]
    assert objects[1].key == base.key + ".0002"
    assert all(o.parts == PARTS_PER_OBJECT for o in objects[:-1])
    assert {p.size for p in base.parts[:-1]} == {PART_BYTES}
    store = target.open()
    try:
        stored = [store.get(o.key) for o in objects]
    finally:
        store.close()
    assert [(len(b), hashlib.sha256(b).hexdigest()) for b in stored] == [
        (o.size, o.sha256) for o in objects
    ]
    whole = b"".join(stored)
    assert (len(whole), hashlib.sha256(whole).hexdigest()) == (base.stored_size, base.sha256)
    assert all(not a.objects for a in manifest.archives if a.name != "base")
    return base


def test_split_archive_through_workers_on_s3_restores_verifies_and_deletes(
    pg_factory: PgFactory,
    s3_store: StorageTarget,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    cluster = pg_factory(15)
    tablespace = sample.populate(cluster)
    expected = sample.digest(cluster.sql)
    start_workers(s3_store.env, count=2)
    backup_cli(cluster, s3_store, "split", *SPLIT, broker=redis_server)

    manifest = manifest_of(s3_store, "split")
    assert_split(s3_store, manifest)
    restore_and_compare(cluster, s3_store, "split", tablespace, expected)
    for flags in ([], ["--deep"]):
        done = run_cli("verify", "--name", "split", *flags, env=s3_store.env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "backup 'split': OK" in done.stdout
    # Nothing the backup opened is left: every object's upload was completed.
    store = s3_store.open()
    try:
        assert store.list_multipart_uploads("split/") == []
        deleted = run_cli("delete", "--name", "split", env=s3_store.env)
        assert deleted.returncode == 0, deleted.stderr
        assert list(store.list("split/")) == []
    finally:
        store.close()


@pytest.fixture(scope="module")
def encrypted_split(pg_factory: PgFactory) -> tuple[PgCluster, str, Path]:
    """A cluster with the sample data, the directory of its key files, its tablespace."""
    cluster = pg_factory(15)
    tablespace = sample.populate(cluster)
    keys = make_postgres_dir("cloud-dump-split-keys-")
    identity, recipient = generate_identity()
    (keys / "key.pub").write_text(recipient + "\n")
    (keys / "key.txt").write_text(identity + "\n")
    return cluster, str(keys), tablespace


def test_encrypted_split_archive_damaged_in_a_later_object_is_named(
    encrypted_split: tuple[PgCluster, str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    cluster, keys, tablespace = encrypted_split
    target = local_target(tmp_path_factory.mktemp("split-store"))
    backup_cli(cluster, target, "sealed", *SPLIT, "--recipient-key", f"{keys}/key.pub")
    base = assert_split(target, manifest_of(target, "sealed"))
    identity = ["--identity-key", f"{keys}/key.txt"]
    done = run_cli("verify", "--deep", "--name", "sealed", *identity, env=target.env)
    assert done.returncode == 0, done.stdout + done.stderr
    # cleanup takes the further objects for the backup's own, not for foreign ones.
    done = run_cli("cleanup", "--dry-run", env=target.env)
    assert done.returncode == 0 and "not a backup's" not in done.stderr, done.stderr

    root = Path(target.url.removeprefix("file://"))
    second = base.stored_objects[1]
    intact = (root / second.key).read_bytes()

    def restore() -> str:
        pgdata = make_postgres_dir("cloud-dump-split-restore-") / "data"
        mapping = f"{tablespace}={make_postgres_dir('cloud-dump-split-ts-')}"
        done = run_cli("restore", "--name", "sealed", "--pgdata", str(pgdata), *identity,
                       "--tablespace-mapping", mapping, env=target.env)  # fmt: skip
        assert done.returncode == int(ExitCode.INTEGRITY), done.stderr
        assert not (pgdata / "global" / "pg_control").exists()
        return error_line(done.stderr)

    # Bytes appended: never read by the ranges, but not the object the manifest records.
    (root / second.key).write_bytes(intact + b"appended")
    assert restore() == (f"cloud-dump: error: object '{second.key}' is {second.size + 8} "
                         f"bytes, manifest.json records {second.size}")  # fmt: skip
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0xFF
    (root / second.key).write_bytes(damaged)
    assert second.key in restore()
    for flags in ([], ["--deep"]):
        done = run_cli("verify", "--name", "sealed", *flags, *identity, env=target.env)
        assert done.returncode == int(ExitCode.INTEGRITY), done.stdout + done.stderr
        assert second.key in done.stdout

    last = base.stored_objects[-1]
    (root / last.key).unlink()
    done = run_cli("verify", "--name", "sealed", *identity, env=target.env)
    assert done.returncode == int(ExitCode.INTEGRITY)
    assert f"object '{last.key}' is missing" in done.stdout


def test_workers_taking_fewer_parts_per_object_refuse_the_claim(
    pg_factory: PgFactory,
    s3_store: StorageTarget,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    # The backup decides where an object ends; workers whose store takes fewer parts would
    # fail the part past their limit, 8 GB into the stream at 1,000 parts: said before any.
    cluster = pg_factory(15)
    start_workers({**s3_store.env, "CLOUD_DUMP_S3_MAX_PARTS": "2"}, count=1)
    done = run_cli("backup", "--name", "mismatch", "--db-url", cluster.replication_url(),
                   "--broker", redis_server.url, "--no-progress", env=s3_store.env)  # fmt: skip
    assert done.returncode == int(ExitCode.CONFIG), done.stderr
    assert error_line(done.stderr) == (
        "cloud-dump: error: the backup puts up to 10000 parts in one object (--s3-max-parts), "
        "but the workers' store takes at most 2 (their CLOUD_DUMP_S3_MAX_PARTS): set the same "
        "on both"
    )
    store = s3_store.open()
    try:
        assert list(store.list("mismatch/")) == []
    finally:
        store.close()
    backup_cli(cluster, s3_store, "matched", "--s3-max-parts", "2", broker=redis_server)
