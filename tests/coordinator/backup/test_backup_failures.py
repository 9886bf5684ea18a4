"""Bad input and broken parts: a clear one-line error, a documented exit code, nothing left
that looks like a valid backup or a usable PGDATA."""

from __future__ import annotations

import http.server
import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.crypto import generate_identity
from coordinator.wait import wait_until
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.procs import free_port
from devrig.roundtrip import restore_and_compare, start_backup
from devrig.sample import BigSource, make_big_source
from devrig.services import PART_RECEIVED, RedisServer, WorkerPool, error_line, run_cli
from devrig.walfiles import SEG1, SYSID_A, WalDir, make_segment
from storage.manifest import BackupManifest
from tasks.config import PARTS_QUEUE, make_app


@pytest.fixture(scope="session")
def source(pg_factory: PgFactory) -> PgCluster:
    cluster = pg_factory(15)
    cluster.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    return cluster


def backup(cluster: PgCluster, target: StorageTarget, name: str, *extra: str) -> None:
    result = run_cli("backup", f"--name={name}", "--db-url", cluster.replication_url(),
                     "--no-progress", *extra, env=target.env)
    assert result.returncode == 0, result.stderr


def one_line_error(stderr: str, *fragments: str) -> None:
    error = error_line(stderr)
    for fragment in fragments:
        assert fragment in error, error


def assert_no_usable_pgdata(pgdata: Path) -> None:
    assert not (pgdata / "PG_VERSION").exists()
    assert not pgdata.exists() or not any(pgdata.iterdir())


def listed(target: StorageTarget) -> list[str]:
    result = run_cli("list", "--json", env=target.env)
    assert result.returncode == 0, result.stderr
    return [row["name"] for row in json.loads(result.stdout)]


def fresh_pgdata() -> Path:
    return make_postgres_dir("cloud-dump-fail-") / "data"


@pytest.mark.parametrize("name", ["a/b", "..", "x..y", "", "-dash", "wal_archive"])
def test_backup_rejects_bad_names_before_connecting(name: str, tmp_path: Path) -> None:
    result = run_cli("backup", f"--name={name}", "--db-url",
                     f"postgres://u:p@127.0.0.1:{free_port()}/postgres",
                     "--storage", f"file://{tmp_path}")
    assert result.returncode == ExitCode.CONFIG
    one_line_error(result.stderr, "name")
    assert not list(tmp_path.iterdir())


def test_backup_refuses_an_existing_name_and_leaves_it_unchanged(
    source: PgCluster, storage_target: StorageTarget
) -> None:
    backup(source, storage_target, "b1")
    before = {i.key: i.etag for i in storage_target.open().list("b1/")}
    result = run_cli("backup", "--name", "b1", "--db-url", source.replication_url(),
                     env=storage_target.env)
    assert result.returncode == ExitCode.BACKUP_EXISTS
    one_line_error(result.stderr, "backup 'b1' already exists")
    assert {i.key: i.etag for i in storage_target.open().list("b1/")} == before


def test_a_name_taken_is_an_expected_refusal_in_the_workers_log(
    source: PgCluster,
    storage_target: StorageTarget,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    """The command says 'already exists' (exit 12); the worker that refused the claim logs one
    INFO line, not an ERROR with a traceback (Celery's ``Task.throws``)."""
    pool = start_workers(storage_target.env, count=1)
    backup(source, storage_target, "b1", "--broker", redis_server.url)
    result = run_cli("backup", "--name", "b1", "--db-url", source.replication_url(),
                     "--broker", redis_server.url, env=storage_target.env)  # fmt: skip
    assert result.returncode == ExitCode.BACKUP_EXISTS, result.stderr
    one_line_error(result.stderr, "backup 'b1' already exists")
    log = pool.processes[0].log_path
    assert wait_until(lambda: "raised expected: BackupExists" in log.read_text(),
                      timeout_s=30, first_s=0.05), log.read_text()  # fmt: skip
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text


def test_backup_unreachable_database(storage_target: StorageTarget) -> None:
    port = free_port()
    result = run_cli("backup", "--name", "b1", "--db-url",
                     f"postgres://repl:sekret@127.0.0.1:{port}/postgres?replication=yes",
                     env=storage_target.env)
    assert result.returncode == ExitCode.DATABASE_UNREACHABLE
    one_line_error(result.stderr, f"127.0.0.1:{port}")
    assert "sekret" not in result.stderr
    assert listed(storage_target) == []
    assert storage_target.open().list_multipart_uploads("") == []


def test_backup_unreachable_broker(source: PgCluster, tmp_path: Path) -> None:
    result = run_cli("backup", "--name", "b1", "--db-url", source.replication_url(),
                     "--broker", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == ExitCode.BROKER_UNREACHABLE
    one_line_error(result.stderr, "cannot reach broker")


@pytest.mark.parametrize("command", ["backup", "check"])
def test_a_broker_url_that_reaches_no_redis_is_an_unreachable_broker(
    command: str, source: PgCluster, tmp_path: Path
) -> None:
    """An HTTP server where the broker should be (a proxy, a wrong port): exit 6 naming the
    broker, not an unexpected error (exit 1)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    url = f"redis://127.0.0.1:{server.server_address[1]}/0"
    extra = ["--name", "b1", "--db-url", source.replication_url()] if command == "backup" else []
    try:
        result = run_cli(command, *extra, "--broker", url,
                         env={"CLOUD_DUMP_STORAGE": f"file://{tmp_path}"})  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    one_line_error(result.stderr, "cannot reach broker", url)
    assert not list(tmp_path.iterdir())


def test_backup_unreachable_storage(source: PgCluster) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_cli("backup", "--name", "b1", "--db-url", source.replication_url(),
                     "--storage", "s3://bucket", "--s3-endpoint", endpoint,
                     "--storage-max-attempts", "1",
                     env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert result.returncode == ExitCode.STORAGE_UNREACHABLE
    one_line_error(result.stderr, endpoint)


def test_restore_refuses_non_empty_pgdata_and_touches_nothing(
    source: PgCluster, storage_target: StorageTarget
) -> None:
    backup(source, storage_target, "b1")
    pgdata = fresh_pgdata()
    pgdata.mkdir()
    (pgdata / "precious").write_text("keep me")
    result = run_cli("restore", "--name", "b1", "--pgdata", str(pgdata), env=storage_target.env)
    assert result.returncode == ExitCode.TARGET_NOT_EMPTY
    one_line_error(result.stderr, str(pgdata))
    assert [p.name for p in pgdata.iterdir()] == ["precious"]
    assert (pgdata / "precious").read_text() == "keep me"


def test_restore_of_a_missing_backup(storage_target: StorageTarget) -> None:
    pgdata = fresh_pgdata()
    result = run_cli("restore", "--name", "nope", "--pgdata", str(pgdata), env=storage_target.env)
    assert result.returncode == ExitCode.BACKUP_NOT_FOUND
    one_line_error(result.stderr, "'nope'")
    assert not pgdata.exists()


def test_restore_wrong_passphrase(source: PgCluster, storage_target: StorageTarget,
                                  tmp_path: Path) -> None:
    (tmp_path / "right").write_text("right passphrase\n")
    (tmp_path / "wrong").write_text("wrong passphrase\n")
    backup(source, storage_target, "b1", "--passphrase-file", str(tmp_path / "right"))
    pgdata = fresh_pgdata()
    result = run_cli("restore", "--name", "b1", "--pgdata", str(pgdata),
                     "--passphrase-file", str(tmp_path / "wrong"), env=storage_target.env)
    assert result.returncode == ExitCode.DECRYPTION_FAILED
    one_line_error(result.stderr, "passphrase", "'b1/backup_key.age'")
    assert_no_usable_pgdata(pgdata)


def test_restore_wrong_identity(source: PgCluster, storage_target: StorageTarget,
                                tmp_path: Path) -> None:
    _, public = generate_identity()
    other_secret, _ = generate_identity()
    (tmp_path / "key.pub").write_text(public)
    (tmp_path / "other.txt").write_text(other_secret)
    backup(source, storage_target, "b1", "--recipient-key", str(tmp_path / "key.pub"))
    pgdata = fresh_pgdata()
    result = run_cli("restore", "--name", "b1", "--pgdata", str(pgdata),
                     "--identity-key", str(tmp_path / "other.txt"), env=storage_target.env)
    assert result.returncode == ExitCode.DECRYPTION_FAILED
    one_line_error(result.stderr)
    assert_no_usable_pgdata(pgdata)


def _base_key(target: StorageTarget, name: str) -> str:
    manifest = BackupManifest.from_json(target.open().get(f"{name}/manifest.json"), name)
    return next(a.key for a in manifest.archives if a.name == "base")


def test_restore_corrupted_archive(source: PgCluster, storage_target: StorageTarget) -> None:
    backup(source, storage_target, "b1")
    store = storage_target.open()
    key = _base_key(storage_target, "b1")
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0xFF
    store.delete(key)
    store.put(key, bytes(data))
    pgdata = fresh_pgdata()
    result = run_cli("restore", "--name", "b1", "--pgdata", str(pgdata), env=storage_target.env)
    assert result.returncode == ExitCode.INTEGRITY, result.stderr
    one_line_error(result.stderr)
    assert_no_usable_pgdata(pgdata)


def test_restore_missing_archive(source: PgCluster, storage_target: StorageTarget) -> None:
    backup(source, storage_target, "b1")
    storage_target.open().delete(_base_key(storage_target, "b1"))
    pgdata = fresh_pgdata()
    result = run_cli("restore", "--name", "b1", "--pgdata", str(pgdata), env=storage_target.env)
    assert result.returncode == ExitCode.INTEGRITY, result.stderr
    one_line_error(result.stderr, "missing")
    assert_no_usable_pgdata(pgdata)


# --- processes dying mid-backup --------------------------------------------------------------


@pytest.fixture
def big_source(pg_factory: PgFactory) -> BigSource:
    """A new one for each test here, where the rig's is shared by a module's tests."""
    return make_big_source(pg_factory)


def _wait_for_line(path: Path, needle: str, timeout_s: float) -> bool:
    return bool(wait_until(lambda: needle in path.read_text(errors="replace"),
                           timeout_s=timeout_s, first_s=0.002))


def broker_drained(broker_url: str) -> bool:
    """Every task sent is done: nothing waits in the ``parts`` queue, and no message is out
    unacknowledged (tasks are acknowledged late: after they ran, whatever their outcome)."""
    with make_app(broker_url).connection_for_read() as conn:
        channel = conn.default_channel
        queued = int(channel.queue_declare(queue=PARTS_QUEUE).message_count)
        unacked = int(channel.client.hlen(channel.unacked_key))
    return queued == 0 and unacked == 0


def test_worker_killed_mid_backup_does_not_fail_it(
    big_source: BigSource,
    storage_target: StorageTarget,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    cluster, tablespace, expected = big_source
    victim = start_workers(storage_target.env, count=1)
    coordinator = start_backup(cluster, storage_target, redis_server.url, "b1",
                               "--part-timeout", "5")
    # Kill the only worker the moment it receives its first part: the message is lost with
    # it, and only the coordinator's re-dispatch can bring that part in.
    assert _wait_for_line(victim.processes[0].log_path, PART_RECEIVED, 60)
    victim.processes[0].kill_group(signal.SIGKILL)
    start_workers(storage_target.env, count=1)
    _, stderr = coordinator.communicate(timeout=300)
    assert coordinator.returncode == 0, stderr
    assert "sending it again" in stderr
    restore_and_compare(cluster, storage_target, "b1", tablespace, expected)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_coordinator_killed_mid_backup_leaves_no_listed_backup(
    sig: int,
    big_source: BigSource,
    storage_target: StorageTarget,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    cluster = big_source[0]
    pool = start_workers(storage_target.env, count=2)
    coordinator = start_backup(cluster, storage_target, redis_server.url, "b1")
    assert _wait_for_line(pool.processes[0].log_path, PART_RECEIVED, 60) or \
        _wait_for_line(pool.processes[1].log_path, PART_RECEIVED, 1)
    coordinator.send_signal(sig)
    coordinator.communicate(timeout=120)
    assert coordinator.returncode != 0
    # The last in-flight parts (and a stopped coordinator's abort) land before the checks.
    assert wait_until(lambda: broker_drained(redis_server.url), timeout_s=120, first_s=0.05), (
        "the workers never finished the parts they were sent"
    )
    assert listed(storage_target) == []
    pgdata = fresh_pgdata()
    result = run_cli("restore", "--name", "b1", "--pgdata", str(pgdata), env=storage_target.env)
    assert result.returncode == ExitCode.BACKUP_NOT_FOUND
    if sig == signal.SIGTERM:
        # A stopped coordinator cleans up: no upload, no object, no claim left behind.
        assert storage_target.open().list_multipart_uploads("") == []
        assert list(storage_target.open().list("b1/")) == []
    else:
        # A killed one leaves its claim: the name is taken, and the error says what to delete.
        again = run_cli("backup", "--name", "b1", "--db-url", cluster.replication_url(),
                        "--broker", redis_server.url, env=storage_target.env)
        assert again.returncode == ExitCode.BACKUP_EXISTS, again.stderr
        one_line_error(again.stderr, f"delete '{storage_target.open().url}/b1/backup.claim'")


# --- the backup's passphrase and the WAL archive's -------------------------------------------


@pytest.mark.parametrize("through_workers", [False, True], ids=["embedded", "workers"])
def test_backup_passphrase_that_cannot_open_the_wal_archive_key_is_refused(
    through_workers: bool,
    source: PgCluster,
    tmp_path: Path,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    target = local_target(tmp_path / "store")
    extra = []
    if through_workers:
        start_workers(target.env, count=1, queues="parts")
        extra = ["--broker", redis_server.url]
    for name in ("a", "b"):
        (tmp_path / name).write_text(f"passphrase {name}\n")
    wal_dir = WalDir(tmp_path / "pgdata")
    wal_dir.add(SEG1, make_segment(SYSID_A, 3, SEG1))
    pushed = run_cli("wal-push", str(wal_dir.pg_wal / SEG1), SEG1, "--passphrase-file",
                     str(tmp_path / "a"), env=target.env)
    assert pushed.returncode == 0, pushed.stderr
    result = run_cli("backup", "--name", "b1", "--db-url", source.replication_url(),
                     "--passphrase-file", str(tmp_path / "b"), *extra, env=target.env)
    assert result.returncode == ExitCode.DECRYPTION_FAILED, result.stderr
    one_line_error(result.stderr, "'wal_archive/cloud-dump-archive-key.age'")
    assert list(target.open().list("b1/")) == []
    assert target.open().list_multipart_uploads("") == []
    backup(source, target, "b2", "--passphrase-file", str(tmp_path / "a"), *extra)
    assert listed(target) == ["b2"]


def test_backup_passphrase_is_not_checked_without_a_wal_archive_key(
    source: PgCluster, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    wal_dir = WalDir(tmp_path / "pgdata")
    wal_dir.add(SEG1, make_segment(SYSID_A, 4, SEG1))
    assert run_cli("wal-push", str(wal_dir.pg_wal / SEG1), SEG1, env=target.env).returncode == 0
    (tmp_path / "b").write_text("passphrase b\n")
    backup(source, target, "b1", "--passphrase-file", str(tmp_path / "b"))
    assert listed(target) == ["b1"]


@pytest.mark.parametrize("route", ["embedded", "workers"])
def test_an_upload_that_cannot_be_opened_fails_the_backup_and_stores_nothing(
    route: str, source: PgCluster, tmp_path: Path, start_workers: Callable[..., WorkerPool]
) -> None:
    """An archive's upload is opened while the archive streams (``coordinator.backup.run``):
    when opening fails, the backup fails with the store's error, and no part or archive is
    stored. The store's uploads directory is a file here, so no upload opens in it (a real
    failure of the local backend, not a stub); the clean-up cannot list uploads there either,
    so it keeps the claim and says which file to delete."""
    root = tmp_path / "store"
    target = local_target(root)
    (root / ".cloud-dump-uploads").write_text("not a directory\n")
    extra = []
    if route == "workers":
        extra = ["--broker", start_workers(target.env).broker_url]
    result = run_cli("backup", "--name", "unopened", "--db-url", source.replication_url(),
                     "--no-progress", *extra, env=target.env)  # fmt: skip
    assert result.returncode == ExitCode.STORAGE_ERROR, result.stderr
    one_line_error(result.stderr, "cannot write", ".cloud-dump-uploads")
    assert "backup 'unopened' stays claimed until" in result.stderr
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        ".cloud-dump-uploads", "unopened", "unopened/backup.claim"
    ]
    assert listed(target) == []
