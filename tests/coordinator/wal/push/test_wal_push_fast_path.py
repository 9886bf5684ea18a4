"""wal-push's look-ahead (ready segments pushed ahead of their calls) and its fast path (a
later call answered from its spool marker, without storage, broker or the full CLI).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coordinator.cli import fastpath
from coordinator.cli.main import build_parser
from coordinator.wal.push.spool import (
    LookAhead,
    Spool,
    archive_location,
    file_identity,
    select_look_ahead,
)
from coordinator.walheader import segment_system_identifier
from devrig.moto import local_target
from devrig.postgres import PgCluster
from devrig.walfiles import SEG1, SEG2, SEG3, SEG4, SYSID_A, WalDir, make_segment
from tests.coordinator.wal.push.helpers import stored


def test_look_ahead_takes_the_next_ready_segments_only() -> None:
    ready = [
        SEG4,
        SEG2,
        "00000002.history",
        SEG1,
        SEG3,
        "junk",
        f"{SEG3}.partial",
        "000000010000000000000000",
    ]
    open_ = LookAhead(True, None)
    assert select_look_ahead(SEG1, ready, 8, lambda n: False, open_) == [SEG2, SEG3, SEG4]
    assert select_look_ahead(SEG1, ready, 2, lambda n: n == SEG2, open_) == [SEG3, SEG4]
    assert select_look_ahead(SEG1, ready, 0, lambda n: False, open_) == []
    assert select_look_ahead(SEG4, ready, 8, lambda n: False, open_) == []
    # Closed (after a failure, until an asked-for file is confirmed): nothing ahead at all.
    assert select_look_ahead(SEG1, ready, 8, lambda n: False, LookAhead(False, None)) == []
    # Never at or past the earliest file whose push failed.
    assert select_look_ahead(SEG1, ready, 8, lambda n: False, LookAhead(True, SEG3)) == [SEG2]


def test_ready_segments_are_pushed_ahead_and_later_calls_return_at_once(
    wal_dir: WalDir, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    names = [SEG1, SEG2, SEG3]
    segments = {name: make_segment(SYSID_A, 20 + i, name) for i, name in enumerate(names)}
    for name, data in segments.items():
        wal_dir.add(name, data, ready=True)
    result = wal_dir.push(SEG1, "--compression", "none", env=target.env)
    assert result.returncode == 0, result.stderr
    storage = target.open()
    for name, data in segments.items():
        assert storage.get(f"wal_archive/{name}") == data
        assert wal_dir.marker(name).exists()
    # .ready files belong to PostgreSQL: untouched.
    assert len(list((wal_dir.pg_wal / "archive_status").iterdir())) == 3
    # The later call trusts its marker and touches no storage: the object deleted behind its
    # back is not re-created (this is what makes it fast).
    storage.delete(f"wal_archive/{SEG2}")
    assert wal_dir.push(SEG2, "--compression", "none", env=target.env).returncode == 0
    assert f"wal_archive/{SEG2}" not in stored(storage)


@pytest.mark.parametrize(
    ("command", "value_flags", "switches"),
    [
        ("wal-push", fastpath.WAL_PUSH_VALUE_FLAGS, fastpath.WAL_PUSH_SWITCHES),
        ("wal-fetch", fastpath.WAL_FETCH_VALUE_FLAGS, fastpath.WAL_FETCH_SWITCHES),
    ],
)
def test_fast_path_knows_exactly_the_flags_of_the_wal_commands(
    command: str, value_flags: frozenset[str], switches: frozenset[str]
) -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[command]
    options = [a for a in sub._actions if a.option_strings and "--help" not in a.option_strings]
    assert {o for a in options if a.nargs != 0 for o in a.option_strings} == value_flags
    assert {o for a in options if a.nargs == 0 for o in a.option_strings} == switches


def test_fast_path_answers_only_for_a_marker_of_the_same_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("CLOUD_DUMP_STORAGE", "CLOUD_DUMP_CLUSTER", "CLOUD_DUMP_WAL_PREFIX",
                "CLOUD_DUMP_SPOOL_DIR", "CLOUD_DUMP_CONFIG"):  # fmt: skip
        # setenv first, so that teardown puts back what was there before the test: the config
        # file below loads into os.environ, and a later delenv alone would restore its value
        # for every test after this one (and the servers they start).
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    wal_dir = WalDir(tmp_path / "pgdata")
    path = str(wal_dir.pg_wal / SEG1)
    location = archive_location("file:///store", "c1", None)
    wal_dir.add(SEG1, make_segment(SYSID_A, 1, SEG1))
    Spool(wal_dir.spool).confirm(SEG1, "0" * 64, file_identity(Path(path).stat()), location)
    config = tmp_path / "cloud-dump.conf"
    config.write_text("CLOUD_DUMP_STORAGE=file:///store\n")
    answered = fastpath.wal_push_confirmed
    assert answered([path, SEG1, "--storage", "file:///store", "--cluster", "c1"])
    assert answered([path, SEG1, "--cluster=c1", "--look-ahead", "8", "--config", str(config)])
    monkeypatch.delenv("CLOUD_DUMP_STORAGE")
    # Another archive, an abbreviated or unknown flag, help, no marker: the full CLI decides.
    assert not answered([path, SEG1, "--storage", "file:///other", "--cluster", "c1"])
    assert not answered([path, SEG1, "--storage", "file:///store", "--clust", "c1"])
    assert not answered([path, SEG1, "--storage", "file:///store", "--cluster", "c1", "-h"])
    assert not answered([path, SEG2, "--storage", "file:///store", "--cluster", "c1"])
    assert not answered([path, SEG1, "--storage", "file:///store", "--cluster"])
    assert not answered([SEG1, "--storage", "file:///store"])


def test_segment_header_system_identifier_matches_pg_control(pg15: PgCluster) -> None:
    name = pg15.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
    data = (pg15.datadir / "pg_wal" / name).read_bytes()
    assert segment_system_identifier(data, name) == pg15.system_identifier()


# Loaded by nothing PostgreSQL's archiver needs for a file already archived: each costs the
# call 1-10 ms, and archive_command runs once per segment.
EXPENSIVE_MODULES = {
    "collections", "typing", "dataclasses", "argparse", "logging", "json", "re", "pathlib",
    "pydantic", "celery", "kombu", "redis", "boto3", "zstandard", "pyrage", "psycopg",
}  # fmt: skip


def test_an_already_archived_file_is_answered_without_expensive_imports(
    wal_dir: WalDir, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    wal_dir.add(SEG1, make_segment(SYSID_A, 40, SEG1), ready=True)
    first = wal_dir.push(SEG1, "--compression", "none", env=target.env)
    assert first.returncode == 0, first.stderr
    # PYTHONPROFILEIMPORTTIME: every module the call imports, one stderr line each.
    again = wal_dir.push(SEG1, "--compression", "none",
                         env={**target.env, "PYTHONPROFILEIMPORTTIME": "1"})  # fmt: skip
    assert again.returncode == 0, again.stderr
    imported = {
        line.rpartition("|")[2].strip()
        for line in again.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "coordinator.cli.fastpath" in imported  # answered by the fast path
    assert "coordinator.cli.main" not in imported
    assert not imported & EXPENSIVE_MODULES, sorted(imported & EXPENSIVE_MODULES)


def test_the_quick_wait_asks_the_pusher_for_segments_only(tmp_path: Path) -> None:
    """Another name (a history file, a typo) goes to the full CLI, which validates it: no
    request is left behind for the pusher to look for."""
    import fcntl

    from coordinator.wal.push.quickwait import wait_for_pusher

    spool = tmp_path / "cloud-dump"
    (spool / "requests").mkdir(parents=True)
    (tmp_path / "foo").write_bytes(b"x")
    with (spool / "pusher.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a pusher runs
        for name in ("foo", "00000002.history", f"{SEG1}.partial", "0000000100000000000000ab"):
            assert not wait_for_pusher(str(spool), name, str(tmp_path / "foo"), "loc")
    assert not list((spool / "requests").iterdir())
