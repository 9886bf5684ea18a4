"""``cloud-dump info``: the restorable window it reports is what restores really reach, and its
``--json`` and ``--prometheus`` outputs say the same.

One archiving PG 15 (``archive_command`` = ``cloud-dump wal-push``) into a local store, two
backups, rows of known phases after each, then a final transaction: shared by the module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget
from devrig.postgres import PgFactory
from devrig.recovery import (
    archive_store,
    archiving_cluster,
    restore,
    started_as_configured,
    wait_archived,
    wait_promoted,
)
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from storage.errors import ConfigError
from storage.layout import Layout
from storage.verifyresult import VerifyResult
from storage.walnames import parse_lsn


@dataclass(frozen=True)
class Source:
    store: StorageTarget
    root: Path  # the store's directory
    info: dict[str, Any]  # `info --json`, once everything is archived


@pytest.fixture(scope="module")
def source(pg_factory: PgFactory) -> Iterator[Source]:
    store = archive_store()
    cluster = archiving_cluster(pg_factory, 15, store)
    cluster.sql("CREATE TABLE t (id int, phase text)")
    backup_cli(cluster, store, "b1")
    cluster.sql("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 10) g")
    backup_cli(cluster, store, "b2")
    cluster.sql("INSERT INTO t SELECT g, 'b' FROM generate_series(1, 20) g")
    cluster.sql("INSERT INTO t VALUES (0, 'last')")
    wait_archived(cluster)
    done = run_cli("info", "--json", env=store.env)
    assert done.returncode == 0, done.stderr
    yield Source(store, Path(store.url.removeprefix("file://")), json.loads(done.stdout))


def window(source: Source) -> dict[str, Any]:
    windows = source.info["windows"]
    assert len(windows) == 1 and windows[0]["timeline"] == 1, windows
    return dict(windows[0])


def phases_after(source: Source, *flags: str) -> list[tuple[object, ...]]:
    """Restore (restore chooses the backup) with ``flags``, start, wait for promotion."""
    pgdata, done = restore(source.store, "latest", "--archive-mode", "off", *flags)
    assert done.returncode == 0, done.stderr
    with started_as_configured(15, pgdata) as copy:
        wait_promoted(copy)
        return copy.sql("SELECT phase, count(*) FROM t GROUP BY phase ORDER BY phase")


def test_the_earliest_point_is_the_oldest_backups_end_and_nothing_before_it_restores(
    source: Source,
) -> None:
    earliest = window(source)["earliest"]
    b1 = next(b for b in source.info["backups"] if b["name"] == "b1")
    assert earliest == {"time": b1["end_time"], "lsn": b1["end_lsn"], "backup": "b1"}
    assert phases_after(source, "--recovery-target-time", earliest["time"]) == []
    before = datetime.fromisoformat(earliest["time"]) - timedelta(microseconds=1)
    pgdata, done = restore(source.store, "latest", "--recovery-target-time", before.isoformat())
    assert done.returncode == int(ExitCode.CONFIG), done.stderr
    assert "no backup can reach target time" in done.stderr and not pgdata.exists()


def test_the_latest_time_reaches_every_transaction_before_the_archives_last(
    source: Source,
) -> None:
    latest = window(source)["latest"]
    last = datetime.fromisoformat(latest["last_transaction_time"])
    assert datetime.fromisoformat(latest["time"]) == last - timedelta(microseconds=1)
    # PostgreSQL stops before the first transaction later than the target: the final one.
    assert phases_after(source, "--recovery-target-time", latest["time"]) == [
        ("a", 10), ("b", 20)]


def test_the_latest_lsn_reaches_the_last_committed_row(source: Source) -> None:
    latest = window(source)["latest"]
    assert parse_lsn(latest["lsn"]) > parse_lsn(window(source)["earliest"]["lsn"])
    assert phases_after(source, "--recovery-target-lsn", latest["lsn"]) == [
        ("a", 10), ("b", 20), ("last", 1)]


def test_json_describes_backups_wal_and_storage(source: Source) -> None:
    info = source.info
    assert [b["name"] for b in info["backups"]] == ["b2", "b1"]
    for backup in info["backups"]:
        assert set(backup) == {"name", "start_time", "end_time", "timeline", "start_lsn",
                               "end_lsn", "stored_bytes", "database_bytes", "pinned",
                               "pinned_until"}  # fmt: skip
        assert backup["stored_bytes"] > 0 and backup["pinned"] is False
    wal = info["wal"]
    assert isinstance(wal, dict) and wal["gaps"] == [] and wal["timelines"] == [1]
    newest = max(p.name[:24] for p in (source.root / "wal_archive").iterdir()
                 if p.name.endswith(".zst"))  # fmt: skip
    assert wal["newest_segment"] == newest == window(source)["latest"]["segment"]
    assert 0 <= wal["newest_segment_age_seconds"] < 600
    stored = info["stored_bytes"]
    assert isinstance(stored, dict)
    wal_bytes = sum(p.stat().st_size for p in (source.root / "wal_archive").iterdir())
    assert stored["wal"] == wal_bytes and stored["backups"] > 0
    assert info["verify"] is None


def test_prometheus_output_parses_and_agrees_with_json(source: Source) -> None:
    done = run_cli("info", "--prometheus", env=source.store.env)
    assert done.returncode == 0, done.stderr
    families = {f.name: f for f in text_string_to_metric_families(done.stdout)}
    assert all(name.startswith("cloud_dump_") for name in families)
    assert "cloud_dump_verify_ok" not in families  # verify recorded nothing yet

    def value(name: str, **labels: str) -> float:
        samples = [s for s in families[name].samples
                   if all(s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip
        assert len(samples) == 1, (name, families[name].samples)
        assert samples[0].labels["location"] == source.info["location"]
        return samples[0].value

    w = window(source)
    assert value("cloud_dump_backups") == 2
    assert value("cloud_dump_restore_window_start_timestamp_seconds", timeline="1") == (
        datetime.fromisoformat(w["earliest"]["time"]).timestamp())
    assert value("cloud_dump_restore_window_end_timestamp_seconds", timeline="1") == (
        datetime.fromisoformat(w["latest"]["time"]).timestamp())
    assert value("cloud_dump_restore_window_end_lsn_bytes", timeline="1") == parse_lsn(
        w["latest"]["lsn"])
    assert value("cloud_dump_wal_gaps", timeline="1") == 0
    assert 0 <= value("cloud_dump_wal_archive_lag_seconds") < 600
    assert value("cloud_dump_stored_bytes", kind="wal") == source.info["stored_bytes"]["wal"]
    assert value("cloud_dump_newest_backup_age_seconds") >= 0


def test_verify_result_is_read_and_not_taken_for_a_backup(source: Source) -> None:
    finished = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    result = VerifyResult(finished=finished, ok=False, deep=True, backups_checked=2, problems=3)
    key = source.root / Layout().verify_result_key()
    key.write_bytes(result.to_json())
    try:
        done = run_cli("info", "--prometheus", env=source.store.env)
        assert done.returncode == 0, done.stderr
        families = {f.name: f.samples[0].value for f in text_string_to_metric_families(done.stdout)}
        assert families["cloud_dump_verify_ok"] == 0
        assert families["cloud_dump_verify_problems"] == 3
        assert families["cloud_dump_verify_last_timestamp_seconds"] == finished.timestamp()
        text = run_cli("info", env=source.store.env)
        assert "Verify: 3 problem(s), 2 backup(s), deep" in text.stdout, text.stderr
        # The other commands see two backups and nothing else.
        listed = run_cli("list", "--json", env=source.store.env)
        assert [b["name"] for b in json.loads(listed.stdout)] == ["b2", "b1"], listed.stderr
        verified = run_cli("verify", env=source.store.env)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        cleaned = run_cli("cleanup", "--dry-run", "--older-than", "0", env=source.store.env)
        assert "nothing to clean up" in cleaned.stdout, cleaned.stdout + cleaned.stderr
        expired = run_cli("expire", "--retain", "2", "--dry-run", env=source.store.env)
        assert "would remove backup" not in expired.stdout, expired.stdout + expired.stderr
        assert key.exists()
    finally:
        key.unlink()


def test_an_empty_location_is_no_backups_and_bad_options_are_config_errors(
    tmp_path: Path,
) -> None:
    env = {"CLOUD_DUMP_STORAGE": f"file://{tmp_path}"}
    empty = run_cli("info", env=env)
    assert empty.returncode == int(ExitCode.BACKUP_NOT_FOUND), empty.stderr
    assert "no backups in" in empty.stderr
    both = run_cli("info", "--cluster", "c1", "--wal-prefix", "elsewhere", env=env)
    assert both.returncode == int(ExitCode.CONFIG), both.stderr
    no_store = run_cli("info", env={"CLOUD_DUMP_STORAGE": ""})
    assert no_store.returncode == int(ExitCode.CONFIG), no_store.stderr


def test_an_s3_copy_of_the_store_reports_the_same_window(
    source: Source, s3_store: StorageTarget
) -> None:
    local, s3 = source.store.open(), s3_store.open()
    try:
        for item in local.list(""):  # with each object's metadata (raw-sha256 for WAL)
            s3.put(item.key, local.get(item.key), metadata=local.head(item.key).metadata)
    finally:
        local.close()
        s3.close()
    done = run_cli("info", "--json", env=s3_store.env)
    assert done.returncode == 0, done.stderr
    copy = json.loads(done.stdout)
    assert copy["windows"] == source.info["windows"]
    assert copy["stored_bytes"] == source.info["stored_bytes"]
    assert copy["wal"]["newest_segment"] == source.info["wal"]["newest_segment"]
    assert 0 <= copy["wal"]["newest_segment_age_seconds"] < 600  # S3's LastModified


def test_no_backup_may_take_the_verify_results_name() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        Layout().backup_prefix(Layout().verify_result_key())
