"""``cloud-dump info``: the restorable window it reports is what restores really reach, and its
``--json`` and ``--prometheus`` outputs say the same.

One archiving PG 15 (``archive_command`` = ``cloud-dump wal-push``) into a local store, two
backups, rows of known phases after each, then a final transaction: shared by the module.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget
from devrig.postgres import PgFactory, make_postgres_dir
from devrig.recovery import (
    archive_command,
    archive_store,
    archiving_cluster,
    restore,
    started_as_configured,
    wait_archived,
    wait_promoted,
)
from devrig.restored import chown_postgres, started
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from devrig.walarchive import archive_wal, segment_bytes
from storage.base import sha256_hex
from storage.errors import ConfigError
from storage.layout import Layout
from storage.manifest import BackupManifest
from storage.options import StorageOptions
from storage.verifyresult import VerifyResult
from storage.walnames import Segment, is_segment, parse_lsn
from workers.backup import BackupRef, ClaimRequest, claim_backup


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
    cluster.sql("CREATE TABLE pad (id int)")
    backup_cli(cluster, store, "b1")
    cluster.sql("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 10) g")
    for _ in range(2):  # segments between the backups, for expire to remove behind a pin
        cluster.sql("INSERT INTO pad VALUES (1)")
        cluster.sql("SELECT pg_switch_wal()")
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
                               "pinned_until", "in_window", "replays_to_segment"}  # fmt: skip
        assert backup["stored_bytes"] > 0 and backup["pinned"] is False
        assert backup["in_window"] is True
        assert backup["replays_to_segment"] == info["wal"]["newest_segment"]
    assert info["ok"] is True and info["problems"] == [] and info["incomplete"] == []
    wal = info["wal"]
    assert isinstance(wal, dict) and wal["gaps"] == [] and wal["timelines"] == [1]
    assert wal["gaps_behind_pins"] == [] and window(source)["unreadable_segment"] is None
    newest = max(p.name[:24] for p in (source.root / "wal_archive").iterdir()
                 if p.name.endswith(".zst"))  # fmt: skip
    assert wal["newest_segment"] == newest == window(source)["latest"]["segment"]
    assert 0 <= wal["newest_segment_age_seconds"] < 600
    stored = info["stored_bytes"]
    assert isinstance(stored, dict)
    wal_bytes = sum(p.stat().st_size for p in (source.root / "wal_archive").iterdir())
    assert stored["wal"] == wal_bytes and stored["backups"] > 0 and stored["incomplete"] == 0
    assert [(t["timeline"], t["segment"], t["switched_away"]) for t in wal["newest"]] == [
        (1, newest, False)]
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
    assert value("cloud_dump_info_ok") == 1
    assert {s.labels["kind"]: s.value for s in families["cloud_dump_info_problems"].samples} == {
        "storage": 0, "no_backups": 0, "diverging_histories": 0, "verify_result": 0,
        "wal_history": 0, "wal_segment": 0}
    assert value("cloud_dump_wal_gaps_behind_pins", timeline="1") == 0
    assert value("cloud_dump_backups_outside_window") == 0


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
    assert "Could not read:\n  nothing to restore: no backups in" in empty.stdout
    # Monitoring gets its metrics and the health metric all the same.
    metrics = run_cli("info", "--prometheus", env=env)
    assert metrics.returncode == int(ExitCode.BACKUP_NOT_FOUND), metrics.stderr
    samples = {(s.name, s.labels.get("kind")): s.value
               for f in text_string_to_metric_families(metrics.stdout) for s in f.samples}
    assert samples[("cloud_dump_backups", None)] == 0
    assert samples[("cloud_dump_info_ok", None)] == 0
    assert samples[("cloud_dump_info_problems", "no_backups")] == 1
    assert samples[("cloud_dump_stored_bytes", "backups")] == 0
    # A store that cannot be listed: the health metric alone, and the store's exit code.
    gone = {"CLOUD_DUMP_STORAGE": f"file://{tmp_path}/missing"}
    metrics = run_cli("info", "--prometheus", env=gone)
    assert metrics.returncode == int(ExitCode.STORAGE_ERROR), metrics.stderr
    assert {name for name, _ in metric_values(metrics.stdout)} == {
        "cloud_dump_info_ok", "cloud_dump_info_problems"}
    assert metric_values(metrics.stdout)[("cloud_dump_info_problems", "storage")] == 1
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


# --- what info reports when part of the store cannot be read, and the WAL's harder shapes ---


def copy_of(source: Source, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the source's store (xattrs, so the recorded checksums, included) and its env."""
    root = tmp_path / "store"
    shutil.copytree(source.root, root)
    return root, {"CLOUD_DUMP_STORAGE": f"file://{root}"}


def metric_values(text: str) -> dict[tuple[str, str], float]:
    """Every sample by (name, its timeline, kind or state label, "" when none)."""
    return {(s.name, s.labels.get("timeline") or s.labels.get("kind") or s.labels.get("state")
             or ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_a_damaged_newest_segment_is_named_and_the_window_ends_before_it(
    source: Source, tmp_path: Path
) -> None:
    root, env = copy_of(source, tmp_path)
    newest = source.info["wal"]["newest_segment"]
    damaged = next(p for p in (root / "wal_archive").iterdir() if p.name.startswith(newest))
    os.truncate(damaged, 100)
    done = run_cli("info", "--json", env=env)
    assert done.returncode == int(ExitCode.INTEGRITY), done.stderr
    assert f"ends before '{newest}'" in done.stderr
    info = json.loads(done.stdout)
    assert info["ok"] is False and [p["kind"] for p in info["problems"]] == ["wal_segment"]
    assert [b["name"] for b in info["backups"]] == ["b2", "b1"]
    (w,) = info["windows"]
    assert w["earliest"] == window(source)["earliest"] and w["unreadable_segment"] == newest
    # Recovery stops at the damaged segment: the window ends in the one before, at b2's end
    # (nothing was committed between b2's end and the damaged segment).
    assert w["latest"]["segment"] < newest
    assert parse_lsn(w["latest"]["lsn"]) < Segment.parse(newest).start_lsn()
    b2 = next(b for b in info["backups"] if b["name"] == "b2")
    assert w["latest"]["time"] == b2["end_time"] and w["latest"]["last_transaction_time"] is None
    metrics = run_cli("info", "--prometheus", env=env)
    assert metrics.returncode == int(ExitCode.INTEGRITY), metrics.stderr
    values = metric_values(metrics.stdout)
    assert values[("cloud_dump_info_ok", "")] == 0
    assert values[("cloud_dump_info_problems", "wal_segment")] == 1
    assert values[("cloud_dump_backups", "")] == 2
    assert values[("cloud_dump_restore_window_end_timestamp_seconds", "1")] == (
        datetime.fromisoformat(b2["end_time"]).timestamp())
    text = run_cli("info", env=env)
    assert text.returncode == int(ExitCode.INTEGRITY), text.stderr
    assert f"and no further: '{newest}' could not be read" in text.stdout
    assert "Could not read:\n  the window of timeline 1 ends before" in text.stdout


def test_after_expire_the_hole_behind_a_pinned_backup_shows_and_the_window_starts_after_it(
    source: Source, tmp_path: Path
) -> None:
    root, env = copy_of(source, tmp_path)
    for argv in (("keep", "b1"), ("expire", "--retain", "1")):
        done = run_cli(*argv, env=env)
        assert done.returncode == 0, done.stderr
    done = run_cli("info", "--json", env=env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["wal"]["gaps"] == []  # nothing the window or an unpinned backup needs
    (hole,) = info["wal"]["gaps_behind_pins"]
    assert hole["timeline"] == 1 and hole["segments"] >= 1
    archived = {p.name[:24] for p in (root / "wal_archive").iterdir()}
    assert hole["first"] not in archived and hole["last"] not in archived
    (w,) = info["windows"]
    assert w["earliest"]["backup"] == "b2"
    placed = {b["name"]: (b["in_window"], b["pinned"]) for b in info["backups"]}
    assert placed == {"b1": (False, True), "b2": (True, False)}
    b1 = next(b for b in info["backups"] if b["name"] == "b1")
    assert b1["replays_to_segment"] is None or b1["replays_to_segment"] < hole["first"]
    text = run_cli("info", env=env)
    assert ("outside the window: backup 'b1' (timeline 1, kept until released) restores to its "
            "own end") in text.stdout
    assert f"behind pinned backups on timeline 1: {hole['first']} .. {hole['last']}" in text.stdout
    assert "  no gaps in the window's WAL" in text.stdout
    values = metric_values(run_cli("info", "--prometheus", env=env).stdout)
    assert values[("cloud_dump_wal_gaps", "1")] == 0
    assert values[("cloud_dump_wal_gaps_behind_pins", "1")] == 1
    assert values[("cloud_dump_backups_outside_window", "")] == 1
    assert values[("cloud_dump_info_ok", "")] == 1


def test_what_killed_and_running_backups_hold_is_counted_and_named(
    source: Source, tmp_path: Path
) -> None:
    """The state a SIGKILLed backup leaves (its claim, silent for an hour, and an open upload
    with a part) and that of a running one, written through the backup's own claim function."""
    root, env = copy_of(source, tmp_path)
    store = StorageTarget("local", env["CLOUD_DUMP_STORAGE"], StorageOptions(), env).open()
    now, long_ago = datetime.now(UTC), datetime.now(UTC) - timedelta(hours=1)
    part = os.urandom(1024 * 1024)
    try:
        for name, when in (("b3", long_ago), ("b4", now)):
            claim_backup(store, ClaimRequest(
                backup=BackupRef(name=name), run_id=f"run-{name}", host="db1",
                started_at=when.isoformat(), heartbeat_every_s=60,
                heartbeat_at=when.isoformat()))  # fmt: skip
        upload_id = store.create_multipart("b3/base.tar.zst")
        store.upload_part("b3/base.tar.zst", upload_id, 1, part, sha256=sha256_hex(part))
    finally:
        store.close()
    claims = {n: (root / n / "backup.claim").stat().st_size for n in ("b3", "b4")}
    done = run_cli("info", "--json", env=env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert [(i["name"], i["state"], i["objects"], i["uploads"], i["stored_bytes"], i["run_id"])
            for i in info["incomplete"]] == [
        ("b3", "silent", 1, 1, claims["b3"] + len(part), "run-b3"),
        ("b4", "running", 1, 0, claims["b4"], "run-b4")]  # fmt: skip
    stored = info["stored_bytes"]
    assert stored["incomplete"] == sum(claims.values()) + len(part)
    assert stored["other"] == source.info["stored_bytes"]["other"]
    assert stored["backups"] == source.info["stored_bytes"]["backups"]
    text = run_cli("info", env=env).stdout
    assert ("Incomplete backup 'b3': silent (killed or hung: 'cloud-dump cleanup' removes it), "
            "run run-b3 on db1") in text
    assert "Incomplete backup 'b4': running, run run-b4 on db1" in text
    values = metric_values(run_cli("info", "--prometheus", env=env).stdout)
    assert values[("cloud_dump_incomplete_backups", "silent")] == 1
    assert values[("cloud_dump_incomplete_backups", "running")] == 1
    assert values[("cloud_dump_stored_bytes", "incomplete")] == stored["incomplete"]


@dataclass(frozen=True)
class Branched:
    store: StorageTarget  # its env carries the passphrase
    root: Path
    copy_committed: datetime  # just after the copy's last commit, on timeline 2


@pytest.fixture(scope="module")
def branched(pg_factory: PgFactory) -> Branched:
    """An archive encrypted with a passphrase: backup b1 of timeline 1; a copy restored to b1's
    end that promoted to timeline 2, committed a row and archived its WAL; then the source,
    which went on, three segments past timeline 2's newest."""
    keys = make_postgres_dir("cloud-dump-info-keys-")
    (keys / "passphrase").write_text("info-test-passphrase\n")
    chown_postgres(keys)
    plain = archive_store()
    store = StorageTarget("local", plain.url, StorageOptions(),
                          {**plain.env, "CLOUD_DUMP_PASSPHRASE_FILE": str(keys / "passphrase")})
    source = archiving_cluster(pg_factory, 15, store)
    source.sql("CREATE TABLE t (id int, phase text)")
    backup_cli(source, store, "b1")
    pgdata, restored = restore(store, "b1", "--recovery-target", "immediate")
    assert restored.returncode == 0, restored.stderr
    settings = {"archive_mode": "on", "archive_command": archive_command(store)}
    with started(15, pgdata, settings=settings) as copy:
        wait_promoted(copy)
        copy.sql("INSERT INTO t VALUES (1, 'copy')")
        copy_committed = copy.sql("SELECT clock_timestamp()")[0][0]
        wait_archived(copy)
    for _ in range(3):
        source.sql("INSERT INTO t VALUES (1, 'source')")
        source.sql("SELECT pg_switch_wal()")
    source.sql("INSERT INTO t VALUES (2, 'source')")
    wait_archived(source)
    assert isinstance(copy_committed, datetime)
    return Branched(store, Path(store.url.removeprefix("file://")), copy_committed)


def test_each_timelines_window_and_last_transaction_come_from_its_own_wal(
    branched: Branched,
) -> None:
    done = run_cli("info", "--json", env=branched.store.env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    windows = {w["timeline"]: w for w in info["windows"]}
    assert sorted(windows) == [1, 2] and info["ok"] is True
    archived = {p.name[:24] for p in (branched.root / "wal_archive").iterdir()}
    tl1, tl2 = windows[1]["latest"], windows[2]["latest"]
    # Timeline 2 ends in its own newest segment, which exists, not in timeline 1's later ones.
    newest_tl2 = max(n for n in archived if n.startswith("00000002") and is_segment(n))
    assert tl2["segment"] == newest_tl2
    assert tl1["segment"] == max(n for n in archived if n.startswith("00000001"))
    assert parse_lsn(tl2["lsn"]) < Segment.parse(newest_tl2).start_lsn() + 16 * 1024 * 1024
    # The copy's commit on timeline 2, the source's later ones on timeline 1.
    tl2_last = datetime.fromisoformat(tl2["last_transaction_time"])
    tl1_last = datetime.fromisoformat(tl1["last_transaction_time"])
    assert tl2_last <= branched.copy_committed < tl1_last
    assert [(t["timeline"], t["switched_away"]) for t in info["wal"]["newest"]] == [
        (1, False), (2, False)]  # timeline 1 went on after timeline 2 forked from it


def test_archive_lag_is_per_timeline_so_a_copys_pushes_do_not_hide_a_stalled_source(
    branched: Branched,
) -> None:
    newest_tl1 = max(p for p in (branched.root / "wal_archive").iterdir()
                     if p.name.startswith("00000001") and is_segment(p.name[:24]))  # fmt: skip
    stat = newest_tl1.stat()
    os.utime(newest_tl1, (stat.st_atime, stat.st_mtime - 7200))  # the source stalled 2 h ago
    try:
        done = run_cli("info", "--prometheus", env=branched.store.env)
    finally:
        os.utime(newest_tl1, (stat.st_atime, stat.st_mtime))
    assert done.returncode == 0, done.stderr
    values = metric_values(done.stdout)
    assert values[("cloud_dump_wal_archive_lag_seconds", "1")] >= 7200
    assert values[("cloud_dump_wal_archive_lag_seconds", "2")] < 7200
    assert values[("cloud_dump_wal_newest_segment_timestamp_seconds", "1")] == pytest.approx(
        stat.st_mtime - 7200)


def test_an_encrypted_archive_without_its_key_still_reports_what_it_can(
    branched: Branched,
) -> None:
    env = {"CLOUD_DUMP_STORAGE": branched.store.url}
    done = run_cli("info", "--json", env=env)
    assert done.returncode == int(ExitCode.CONFIG), done.stderr
    assert "passphrase" in done.stderr
    info = json.loads(done.stdout)
    assert info["ok"] is False
    assert [p["kind"] for p in info["problems"]] == ["wal_history", "wal_segment"]
    assert [b["name"] for b in info["backups"]] == ["b1"]
    (w,) = info["windows"]  # timeline 2's path is in its history file, which cannot be read
    assert w["timeline"] == 1 and w["earliest"]["backup"] == "b1" and w["latest"] is None
    assert [t["timeline"] for t in info["wal"]["newest"]] == [1, 2]
    metrics = run_cli("info", "--prometheus", env=env)
    assert metrics.returncode == int(ExitCode.CONFIG), metrics.stderr
    values = metric_values(metrics.stdout)
    assert values[("cloud_dump_info_ok", "")] == 0
    assert values[("cloud_dump_info_problems", "wal_history")] == 1
    assert values[("cloud_dump_info_problems", "wal_segment")] == 1
    assert values[("cloud_dump_backups", "")] == 1
    assert ("cloud_dump_restore_window_start_timestamp_seconds", "1") in values
    assert ("cloud_dump_restore_window_end_timestamp_seconds", "1") not in values
    assert ("cloud_dump_wal_archive_lag_seconds", "2") in values
    text = run_cli("info", env=env)
    assert text.returncode == int(ExitCode.CONFIG), text.stderr
    assert "to: unknown (" in text.stdout and "Could not read:" in text.stdout


def test_a_pinned_prefix_without_its_manifest_is_shown_pinned_and_cleanup_leaves_it(
    source: Source, tmp_path: Path
) -> None:
    root, env = copy_of(source, tmp_path)
    done = run_cli("keep", "b2", env=env)
    assert done.returncode == 0, done.stderr
    (root / "b2" / "manifest.json").rename(tmp_path / "b2-manifest.json")
    held = sorted(p.name for p in (root / "b2").iterdir())
    done = run_cli("info", "--json", env=env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert [(i["name"], i["state"], i["objects"]) for i in info["incomplete"]] == [
        ("b2", "pinned", len(held))]
    assert [b["name"] for b in info["backups"]] == ["b1"] and info["ok"] is True
    text = run_cli("info", env=env).stdout
    assert ("Incomplete backup 'b2': pinned (keep.json) with no manifest.json, so not "
            "restorable as it is: 'cloud-dump cleanup' leaves it alone") in text
    assert "unclaimed" not in text and "removes it" not in text
    values = metric_values(run_cli("info", "--prometheus", env=env).stdout)
    assert values[("cloud_dump_incomplete_backups", "pinned")] == 1
    assert values[("cloud_dump_incomplete_backups", "unclaimed")] == 0
    # What info says is what cleanup does.
    cleaned = run_cli("cleanup", "--older-than", "0", env=env)
    assert cleaned.returncode == 0, cleaned.stderr
    assert sorted(p.name for p in (root / "b2").iterdir()) == held


# --- one store, two histories: what restore without --name and expire refuse ---


def manifest_on(name: str, timeline: int, first: int, last: int, ended: str) -> BackupManifest:
    """A backup of ``timeline`` whose WAL runs from segment ``first`` to ``last`` (16 MiB),
    ended at ``ended`` (an ISO time), as ``backup`` records it."""
    return BackupManifest.model_validate({
        "name": name, "tool_version": "t", "pg_version": "15", "pg_version_num": 150000,
        "system_identifier": "7300000000000000001", "timeline": timeline,
        "start_lsn": f"0/{first:X}000028", "end_lsn": f"0/{last:X}000100",
        "start_wal_file": f"{timeline:08X}00000000{first:08X}",
        "end_wal_file": f"{timeline:08X}00000000{last:08X}",
        "start_time": "2026-11-01T00:00:00+00:00", "end_time": ended,
        "compression": "zstd", "archives": [], "backup_manifest_key": f"{name}/backup_manifest",
        "backup_manifest_size": 1, "backup_manifest_sha256": "0" * 64,
    })  # fmt: skip


def hand_built_store(
    tmp_path: Path, backups: list[BackupManifest], wal: list[str]
) -> StorageTarget:
    """A local store holding ``backups``' manifests (no archives: nothing here reads them) and
    the WAL segments named ``wal``, each stored as wal-push stores it."""
    (tmp_path / "store").mkdir()
    target = StorageTarget("local", f"file://{tmp_path}/store", StorageOptions(),
                           {"CLOUD_DUMP_STORAGE": f"file://{tmp_path}/store"})  # fmt: skip
    store = target.open()
    try:
        for manifest in backups:
            store.put(Layout().manifest_key(manifest.name), manifest.to_json())
        for number, name in enumerate(wal):
            archive_wal(store, Layout(), name, segment_bytes(number))
    finally:
        store.close()
    return target


def test_backups_of_a_timeline_that_began_before_an_older_timelines_backup_ended_are_a_problem(
    tmp_path: Path,
) -> None:
    """The store a restored copy leaves when it archives and is backed up into its source's:
    s1 on timeline 1; timeline 2 began in segment 4 (its first archived segment); copybk on
    timeline 2; s2 on timeline 1 ended in segment 5, after timeline 2 began. Only the WAL says
    where timeline 2 began: its backup starts in segment 6."""
    backups = [manifest_on("s1", 1, 2, 3, "2026-11-01T01:00:00+00:00"),
               manifest_on("copybk", 2, 6, 6, "2026-11-01T03:00:00+00:00"),
               manifest_on("s2", 1, 5, 5, "2026-11-01T04:00:00+00:00")]  # fmt: skip
    store = hand_built_store(tmp_path, backups, ["000000020000000000000004"])
    done = run_cli("info", "--json", env=store.env)
    assert done.returncode == int(ExitCode.CONFIG), done.stderr
    assert "info found a problem: restore without --name and every expire refuse" in done.stderr
    info = json.loads(done.stdout)
    assert info["ok"] is False
    (problem,) = info["problems"]
    assert problem["kind"] == "diverging_histories"
    assert ("backup 's2' (timeline 1) ended after timeline 2 began in 000000020000000000000004, "
            "so it and backup 'copybk' (timeline 2) are of diverging histories"
            ) in problem["message"]  # fmt: skip
    # Everything else is still reported.
    assert [b["name"] for b in info["backups"]] == ["s2", "copybk", "s1"]
    assert info["wal"]["newest_segment"] == "000000020000000000000004"
    assert info["stored_bytes"]["backups"] > 0 and info["stored_bytes"]["wal"] > 0
    text = run_cli("info", env=store.env)
    assert text.returncode == int(ExitCode.CONFIG), text.stderr
    assert ("\nDiverging histories: restore without --name and every expire refuse this store: "
            "backup 's2' (timeline 1) ended after timeline 2 began") in text.stdout
    assert "Could not read:" not in text.stdout and "copybk" in text.stdout
    metrics = run_cli("info", "--prometheus", env=store.env)
    assert metrics.returncode == int(ExitCode.CONFIG), metrics.stderr
    values = metric_values(metrics.stdout)
    assert values[("cloud_dump_info_ok", "")] == 0
    assert values[("cloud_dump_info_problems", "diverging_histories")] == 1
    assert values[("cloud_dump_backups", "")] == 3
    # info fails where the commands it watches over fail.
    expired = run_cli("expire", "--retain", "1", "--dry-run", env=store.env)
    assert expired.returncode == int(ExitCode.CONFIG), expired.stderr
    restored = run_cli("restore", "--pgdata", str(tmp_path / "pgdata"), env=store.env)
    assert restored.returncode == int(ExitCode.CONFIG), restored.stderr
    assert "diverging histories" in expired.stderr and "diverging histories" in restored.stderr
    # Without that WAL timeline 2 begins where its backup does, after s2 ended: one history.
    for segment in (tmp_path / "store" / "wal_archive").iterdir():
        segment.unlink()
    done = run_cli("info", "--json", env=store.env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["problems"] == []
    expired = run_cli("expire", "--retain", "3", "--dry-run", env=store.env)
    assert expired.returncode == 0, expired.stderr


def test_two_servers_writing_one_timeline_are_a_problem_pinned_backups_included(
    tmp_path: Path,
) -> None:
    """x2 ended after x1, at a lower LSN on the same timeline: a copy restored without a
    recovery target and started wrote timeline 1 too. x1 is pinned: it still counts, as it
    does for expire."""
    backups = [manifest_on("x1", 1, 2, 5, "2026-11-01T02:00:00+00:00"),
               manifest_on("x2", 1, 3, 4, "2026-11-01T03:00:00+00:00")]  # fmt: skip
    store = hand_built_store(tmp_path, backups, [])
    done = run_cli("keep", "x1", env=store.env)
    assert done.returncode == 0, done.stderr
    done = run_cli("info", "--json", env=store.env)
    assert done.returncode == int(ExitCode.CONFIG), done.stderr
    info = json.loads(done.stdout)
    assert [p["kind"] for p in info["problems"]] == ["diverging_histories"]
    assert ("backups 'x1' and 'x2' are both of timeline 1, but 'x2' ended later at an earlier "
            "LSN (0/4000100 against 0/5000100)") in info["problems"][0]["message"]
    assert [(b["name"], b["pinned"]) for b in info["backups"]] == [("x2", False), ("x1", True)]
    expired = run_cli("expire", "--retain", "1", "--dry-run", env=store.env)
    assert expired.returncode == int(ExitCode.CONFIG), expired.stderr
