"""A ``file://`` storage whose directory is not there is an error, never a new or empty store.

Like an S3 bucket, a local store's root must exist and be a directory: every command, reading or
writing, fails with exit 5 naming it (wal-fetch with 200, which stops recovery), and creates
nothing. A typo in the URL must not start a second archive beside the real one, nor read as an
archive with nothing in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.postgres import PgCluster
from devrig.services import error_line, run_cli
from devrig.walarchive import SEGMENT
from devrig.walfiles import SEG1, SYSID_A, WalDir, make_segment

COMMANDS = ["backup", "restore", "list", "check", "wal-push", "wal-fetch"]


def command_line(command: str, tmp_path: Path, pg15: PgCluster) -> list[str]:
    pgdata = tmp_path / "pgdata"
    if command == "backup":
        return ["backup", "--name", "b1", "--db-url", pg15.replication_url(), "--no-progress"]
    if command == "restore":
        return ["restore", "--name", "b1", "--pgdata", str(tmp_path / "restored")]
    if command == "wal-push":
        wal_dir = WalDir(pgdata)
        wal_dir.add(SEG1, make_segment(SYSID_A, 650, SEG1), ready=True)
        return ["wal-push", str(wal_dir.pg_wal / SEG1), SEG1]
    if command == "wal-fetch":
        (pgdata / "pg_wal").mkdir(parents=True)
        return ["wal-fetch", SEGMENT, str(pgdata / "pg_wal" / "RECOVERYXLOG"), "--prefetch", "0"]
    return [command]


@pytest.mark.parametrize("root", ["missing", "a-file", "missing-parent"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_local_storage_root_that_is_not_a_directory_fails_every_command_naming_it(
    command: str, root: str, tmp_path: Path, pg15: PgCluster
) -> None:
    store = tmp_path / "store"
    if root == "a-file":
        store.write_text("not a store\n")
    elif root == "missing-parent":
        store = tmp_path / "no" / "such" / "dir"
    argv = command_line(command, tmp_path, pg15)
    before = sorted(tmp_path.rglob("*"))
    done = run_cli(*argv, "--storage", f"file://{store}",
                   env={"CLOUD_DUMP_WAL_FETCH_RETRIES": "1"})  # fmt: skip
    expected = ExitCode.WAL_FETCH_FAILED if command == "wal-fetch" else ExitCode.STORAGE_ERROR
    assert done.returncode == expected, done.stderr
    what = "is not a directory" if root == "a-file" else "does not exist"
    assert f"storage directory '{store}' {what}" in error_line(done.stderr)
    # Nothing created: not the store, not a restore target (wal-push keeps its look-ahead
    # state in its spool in pg_wal, as on any failure).
    spool = tmp_path / "pgdata" / "pg_wal" / "cloud-dump"
    after = [p for p in sorted(tmp_path.rglob("*")) if not p.is_relative_to(spool)]
    assert after == before, set(after) - set(before)
