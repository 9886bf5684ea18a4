"""Work sent to the workers goes to the storage the command was told, or is refused.

With a broker the coordinator needs no storage: the workers hold it. A command that *was* told a
storage (``--storage``, ``CLOUD_DUMP_STORAGE`` or a ``--config`` file) must not have its backup
or WAL land in the workers' storage elsewhere while it exits 0: every task carries the location,
a worker storing elsewhere refuses it (exit 3, naming both), and ``check`` reports it. Locations
are compared as the stores report them, not by endpoint: here the workers reach moto through
127.0.0.1 and the commands name it as localhost.

One worker fleet (S3 on moto) for the module; real PostgreSQL, Redis and Celery workers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import S3_PREFIX, MotoServer, StorageTarget, local_target, s3_target
from devrig.postgres import PgCluster
from devrig.services import RedisServer, WorkerPool, error_line, run_cli, start_worker_pool
from devrig.walfiles import SEG1, SEG2, SEG3, SYSID_A, WalDir, make_segment
from storage.base import Storage

# Whatever the environment running the tests holds: these commands are told no storage.
NO_STORAGE = {"CLOUD_DUMP_STORAGE": ""}


@dataclass(frozen=True)
class Fleet:
    """Workers storing in ``target``; ``broker`` is their Redis."""

    pool: WorkerPool
    target: StorageTarget
    broker: str
    localhost_endpoint: str  # the same moto server, spelt as another endpoint

    def store(self) -> Storage:
        return self.target.open()

    def keys(self, prefix: str = "") -> list[str]:
        return [info.key for info in self.store().list(prefix)]


@pytest.fixture(scope="module")
def fleet(
    redis_server: RedisServer,
    moto_server: MotoServer,
    moto_admin_client: Any,
    aws_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    bucket = f"cd-fleet-{uuid.uuid4().hex[:12]}"
    moto_admin_client.create_bucket(Bucket=bucket)
    target = s3_target(moto_server.endpoint, bucket, aws_env)
    pool = start_worker_pool(redis_server.url, target.env, count=1, queues="parts,wal",
                             log_dir=tmp_path_factory.mktemp("fleet"))  # fmt: skip
    port = moto_server.endpoint.rsplit(":", 1)[1]
    try:
        yield Fleet(pool, target, redis_server.url, f"http://localhost:{port}")
    finally:
        pool.stop()
        redis_server.flush()


def elsewhere(fleet: Fleet, tmp_path: Path, how: str) -> tuple[list[str], dict[str, str], str]:
    """Flags and environment telling a command a storage other than the workers'; that
    storage's URL. The same bucket under a mistyped prefix, or a local directory."""
    typo = f"s3://{fleet.target.url.split('/')[2]}/{S3_PREFIX}-typo"
    endpoint = fleet.localhost_endpoint
    if how == "flag":
        return ["--storage", typo, "--s3-endpoint", endpoint], {}, typo
    if how == "environment":
        local = local_target(tmp_path / "other-store").url
        return [], {"CLOUD_DUMP_STORAGE": local}, local
    config = tmp_path / "cloud-dump.conf"
    config.write_text(f"CLOUD_DUMP_STORAGE={typo}\nCLOUD_DUMP_S3_ENDPOINT={endpoint}\n")
    return ["--config", str(config)], {}, typo


def assert_refused_naming_both(fleet: Fleet, returncode: int, stderr: str, told: str) -> None:
    assert returncode == ExitCode.CONFIG, stderr
    line = error_line(stderr)
    assert f"'{fleet.target.url}'" in line and f"'{told}'" in line, line
    assert fleet.pool.names[0] in line, line


def assert_nothing_stored_in(tmp_path: Path) -> None:
    other = tmp_path / "other-store"
    assert not other.exists() or not [p for p in other.rglob("*") if p.is_file()]


# --- backup ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "environment", "config-file"])
def test_backup_through_workers_storing_elsewhere_is_refused_naming_both(
    fleet: Fleet, pg15: PgCluster, tmp_path: Path, how: str
) -> None:
    flags, env, told = elsewhere(fleet, tmp_path, how)
    name = f"mismatch-{how}"
    done = run_cli("backup", "--name", name, "--db-url", pg15.replication_url(),
                   "--broker", fleet.broker, "--no-progress", *flags, env=env)  # fmt: skip
    assert_refused_naming_both(fleet, done.returncode, done.stderr, told)
    assert not fleet.keys(f"{name}/"), "the backup went to the workers' storage"
    assert_nothing_stored_in(tmp_path)


def test_backup_through_workers_told_their_storage_or_none_is_stored_there(
    fleet: Fleet, pg15: PgCluster
) -> None:
    # The workers' storage through another endpoint and spelling: the same location.
    told = ["--storage", fleet.target.url + "/", "--s3-endpoint", fleet.localhost_endpoint]
    for name, flags in (("told-theirs", told), ("told-none", [])):
        done = run_cli("backup", "--name", name, "--db-url", pg15.replication_url(),
                       "--broker", fleet.broker, "--part-size-mib", "5", "--no-progress",
                       *flags, env=NO_STORAGE)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"{name}/manifest.json" in fleet.keys(f"{name}/")
    listed = run_cli("list", "--json", env=fleet.target.env)
    assert listed.returncode == 0, listed.stderr
    assert {"told-theirs", "told-none"} <= {row["name"] for row in _json(listed.stdout)}


def _json(text: str) -> list[dict[str, Any]]:
    import json

    rows: list[dict[str, Any]] = json.loads(text)
    return rows


# --- wal-push ----------------------------------------------------------------------------------

ROUTES = {"pusher": [], "synchronous": ["--look-ahead", "0"]}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("how", ["flag", "environment", "config-file"])
def test_wal_push_through_workers_storing_elsewhere_is_refused_and_pushes_nothing_ahead(
    fleet: Fleet, tmp_path: Path, route: str, how: str
) -> None:
    wal_dir = WalDir(tmp_path / "pgdata")
    for seed, name in enumerate((SEG1, SEG2, SEG3)):
        wal_dir.add(name, make_segment(SYSID_A, 500 + seed, name), ready=True)
    flags, env, told = elsewhere(fleet, tmp_path, how)
    prefix = f"wal-{route}-{how}"
    done = wal_dir.push(SEG1, "--broker", fleet.broker, "--wal-prefix", prefix, *ROUTES[route],
                        *flags, env=env)  # fmt: skip
    assert_refused_naming_both(fleet, done.returncode, done.stderr, told)
    assert not wal_dir.marker(SEG1).exists()
    if route == "pusher":
        wal_dir.wait_for_pusher()
    assert fleet.keys(f"{prefix}/") == [], "WAL went to the workers' storage"
    assert_nothing_stored_in(tmp_path)


@pytest.mark.parametrize("route", list(ROUTES))
def test_wal_push_through_workers_told_their_storage_or_none_is_stored_there(
    fleet: Fleet, tmp_path: Path, route: str
) -> None:
    told = ["--storage", fleet.target.url, "--s3-endpoint", fleet.localhost_endpoint]
    for n, flags in enumerate((told, [])):
        wal_dir = WalDir(tmp_path / f"pgdata{n}")
        wal_dir.add(SEG1, make_segment(SYSID_A, 510 + n, SEG1), ready=True)
        prefix = f"wal-ok-{route}-{n}"
        done = wal_dir.push(SEG1, "--broker", fleet.broker, "--wal-prefix", prefix,
                            *ROUTES[route], *flags, env=NO_STORAGE)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"{prefix}/{SEG1}.zst" in fleet.keys(f"{prefix}/")
        if route == "pusher":
            wal_dir.wait_for_pusher()


# --- check -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_check_reports_workers_storing_elsewhere_naming_both(
    fleet: Fleet, tmp_path: Path, how: str
) -> None:
    flags, env, told = elsewhere(fleet, tmp_path, how)
    done = run_cli("check", "--broker", fleet.broker, *flags, env=env)
    assert_refused_naming_both(fleet, done.returncode, done.stderr, told)
    worker = fleet.pool.names[0]
    assert f"storage {told}: ok" in done.stdout  # the command's own storage works
    assert f"worker {worker} (queues parts,wal): storage mismatch" in done.stdout


def test_check_of_workers_told_their_storage_through_another_endpoint_passes(
    fleet: Fleet,
) -> None:
    for flags in (["--storage", fleet.target.url, "--s3-endpoint", fleet.localhost_endpoint],
                  []):  # fmt: skip
        done = run_cli("check", "--broker", fleet.broker, *flags, env=NO_STORAGE)
        assert done.returncode == 0, done.stderr
        assert f"worker {fleet.pool.names[0]} (queues parts,wal): storage " \
               f"{fleet.target.url} ok" in done.stdout
