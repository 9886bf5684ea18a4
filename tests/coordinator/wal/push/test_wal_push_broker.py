"""wal-push through Redis and Celery workers: no marker unless a worker confirmed the store,
conflicts and encryption reported through the workers, and a real archive_command.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
from collections.abc import Callable
from pathlib import Path

import zstandard

from coordinator.cli.exitcodes import ExitCode
from coordinator.crypto import decrypt_bytes, unwrap_identity
from coordinator.wait import wait_until
from devrig.launcher import postgres_cloud_dump
from devrig.moto import StorageTarget, local_target
from devrig.postgres import OS_USER, PgFactory, make_postgres_dir
from devrig.procs import free_port
from devrig.services import WorkerPool
from devrig.walfiles import SEG1, SEG2, SEG3, SYSID_A, WalDir, make_segment
from tests.coordinator.wal.push.helpers import stored
from workers.wal import ARCHIVE_INFO_NAME, WalArchiveInfo


def test_broker_down_fails_without_a_marker(wal_dir: WalDir, tmp_path: Path) -> None:
    wal_dir.add(SEG1, make_segment(SYSID_A, 30, SEG1))
    env = {
        **local_target(tmp_path / "store").env,
        "CLOUD_DUMP_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    result = wal_dir.push(SEG1, env=env)
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    assert not wal_dir.marker(SEG1).exists()


def test_storage_down_on_the_workers_fails_without_a_marker(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], aws_env: dict[str, str]
) -> None:
    dead = {
        "CLOUD_DUMP_STORAGE": "s3://nowhere/wal",
        "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS": "1",
        "CLOUD_DUMP_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        **aws_env,
    }
    pool = start_workers(dead, count=1, queues="wal")
    wal_dir.add(SEG1, make_segment(SYSID_A, 31, SEG1))
    result = wal_dir.push(SEG1, env={"CLOUD_DUMP_BROKER_URL": pool.broker_url})
    assert result.returncode == ExitCode.STORAGE_UNREACHABLE, result.stderr
    assert not wal_dir.marker(SEG1).exists()


def test_push_through_workers_reports_conflicts_and_encrypts(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    pool = start_workers(target.env, count=2, queues="wal")
    env = {"CLOUD_DUMP_BROKER_URL": pool.broker_url}
    (tmp_path / "pass").write_text("s3cret\n")
    flags = ("--passphrase-file", str(tmp_path / "pass"))
    names = [SEG1, SEG2, SEG3]
    segments = {name: make_segment(SYSID_A, 40 + i, name) for i, name in enumerate(names)}
    for name, data in segments.items():
        wal_dir.add(name, data, ready=True)
    result = wal_dir.push(SEG1, *flags, env=env)
    assert result.returncode == 0, result.stderr
    storage = target.open()
    info = WalArchiveInfo.model_validate_json(storage.get(f"wal_archive/{ARCHIVE_INFO_NAME}"))
    assert info.encryption is not None
    identity = unwrap_identity(storage.get(info.encryption.wrapped_identity_key), "s3cret")
    for name, data in segments.items():
        plain = decrypt_bytes(storage.get(f"wal_archive/{name}.zst.age"), [identity], name)
        assert zstandard.ZstdDecompressor().decompress(plain) == data
    wal_dir.add(SEG2, make_segment(SYSID_A, 99, SEG2))
    wal_dir.marker(SEG2).unlink()
    result = wal_dir.push(SEG2, *flags, env=env)
    assert result.returncode == ExitCode.WAL_CONFLICT, result.stderr


def test_archive_command_through_two_workers(
    pg_factory: PgFactory,
    start_workers: Callable[..., WorkerPool],
    s3_store: StorageTarget,
) -> None:
    pool = start_workers(s3_store.env, count=2, queues="wal")
    home = make_postgres_dir("cloud-dump-walpush-")
    home.chmod(0o755)
    config = home / "cloud-dump.conf"
    config.write_text(
        f"CLOUD_DUMP_BROKER_URL={pool.broker_url}\n"
        f"CLOUD_DUMP_STORAGE={s3_store.url}\nCLOUD_DUMP_WAL_PUSH_TIMEOUT=60\n"
    )
    entry = pwd.getpwnam(OS_USER)
    os.chown(config, entry.pw_uid, entry.pw_gid)
    config.chmod(0o600)
    command = f"{postgres_cloud_dump()} wal-push %p %f --config {config}"
    try:
        cluster = pg_factory(15, archive_command=command)
        cluster.sql("CREATE TABLE t (x int)")
        for i in range(3):
            cluster.sql(f"INSERT INTO t SELECT generate_series(1, {1000 * (i + 1)})")
            cluster.sql("SELECT pg_switch_wal()")
        last: list[object] = []

        def three_archived() -> bool:
            archived = cluster.sql(
                "SELECT archived_count, failed_count, last_failed_wal FROM pg_stat_archiver"
            )[0]
            last[:] = [archived]
            return bool(archived[0] >= 3)

        assert wait_until(three_archived, timeout_s=60, first_s=0.2), (
            f"archiving stalled: {last[-1]}")
        storage = s3_store.open()
        keys = [k for k in stored(storage) if k.endswith(".zst")]
        assert len(keys) >= 3
        for key in keys:
            name = key.removeprefix("wal_archive/").removesuffix(".zst")
            local = cluster.datadir / "pg_wal" / name
            if local.exists():
                assert (
                    zstandard.ZstdDecompressor().decompress(storage.get(key)) == local.read_bytes()
                )
        info = json.loads(storage.get(f"wal_archive/{ARCHIVE_INFO_NAME}"))
        assert info["system_identifier"] == str(cluster.system_identifier())
    finally:
        shutil.rmtree(home, ignore_errors=True)
