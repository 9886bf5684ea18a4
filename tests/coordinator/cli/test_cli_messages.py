"""Small things an operator reads: each error names what the operator gave, ``--help`` says
what works, and the backup's progress line never shows more streamed than its total.

- ``wal-fetch NAME PATH`` that cannot write PATH names PATH, not the temporary file beside it;
- ``restore --help`` lists ``current`` for ``--recovery-target-timeline``;
- a usage error, of the top command or of any command, is one line on stderr naming the --help
  to read (not argparse's usage block), with the documented exit code: 2, wal-fetch 200;
- ``restore --recovery-target immediate`` where no WAL archive exists (exit 18) adds that a
  copy of the backup alone needs no target, and a plain restore of that backup works;
- the live progress line of ``backup`` (on a terminal) shows the server's estimate as what it is:
  the data directories, with the WAL in base.tar on top ("of ~N MiB + WAL"), never less
  streamed than sent on, and ends on the final count.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster
from devrig.roundtrip import backup_cli
from devrig.services import VENV_BIN, error_line, run_cli
from devrig.walarchive import archive_wal, segment_bytes, segment_name
from storage.layout import Layout

SEGMENT = segment_name(5)


@pytest.fixture
def archive(tmp_path: Path) -> StorageTarget:
    """A local WAL archive holding ``SEGMENT``."""
    target = local_target(tmp_path / "store")
    archive_wal(target.open(), Layout(), SEGMENT, segment_bytes(5))
    return target


@pytest.mark.parametrize("case", ["missing-directory", "under-a-file", "a-directory"])
def test_wal_fetch_that_cannot_write_its_path_names_that_path(
    archive: StorageTarget, tmp_path: Path, case: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (tmp_path / "a-dir").mkdir()
    path, reason = {
        "missing-directory": (Path(f"/nonexistent-{uuid.uuid4().hex}/dir/f5"),
                              "no such file or directory"),
        "under-a-file": (blocker / "f5", "not a directory"),
        "a-directory": (tmp_path / "a-dir", "is a directory"),
    }[case]  # fmt: skip
    done = run_cli("wal-fetch", SEGMENT, str(path), env=archive.env)
    assert done.returncode == ExitCode.WAL_FETCH_FAILED, done.stderr
    assert error_line(done.stderr) == f"cloud-dump: error: {reason} '{path}'"
    leftovers = [p.name for p in tmp_path.rglob("*") if ".cloud-dump-tmp" in p.name]
    assert leftovers == []


def test_restore_help_lists_every_timeline_it_accepts() -> None:
    done = run_cli("restore", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--recovery-target-timeline latest|current|N" in text
    assert "current (the backup's)" in text


USAGE_ERRORS = [
    (["restore", "--archive-mode", "maybe"], "restore",
     "argument --archive-mode: invalid choice: 'maybe'"),
    (["restore", "--recovery-target", "IMMEDIATE"], "restore",
     "argument --recovery-target: invalid choice: 'IMMEDIATE'"),
    (["restore", "--recovery-target-lsn", "0/1", "--recovery-target-xid", "5"], "restore",
     "argument --recovery-target-xid: not allowed with argument --recovery-target-lsn"),
    (["restore", "--no-such-flag"], "restore", "unrecognized arguments: --no-such-flag"),
    (["restore", "--rec", "x"], "restore", "ambiguous option: --rec could match"),
    (["wal-fetch", SEGMENT], "wal-fetch", "the following arguments are required: PATH"),
    (["wal-fetch", SEGMENT, "pg_wal/RECOVERYXLOG", "--no-such-flag"], "wal-fetch",
     "unrecognized arguments: --no-such-flag"),
    (["wal-push", "pg_wal/" + SEGMENT], "wal-push", "the following arguments are required: NAME"),
    (["check", "--timeout"], "check", "argument --timeout: expected one argument"),
    (["backup", "--compression", "xz"], "backup", "argument --compression: invalid choice"),
    (["restroe"], "", "argument COMMAND: invalid choice: 'restroe'"),
    ([], "", "the following arguments are required: COMMAND"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "command", "what"), USAGE_ERRORS)
def test_a_usage_error_is_one_line_with_the_documented_exit_code(
    argv: list[str], command: str, what: str
) -> None:
    done = run_cli(*argv, env={"CLOUD_DUMP_CONFIG": ""})
    expected = ExitCode.WAL_FETCH_FAILED if command == "wal-fetch" else ExitCode.USAGE
    assert done.returncode == expected, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    line = error_line(done.stderr)
    assert line.startswith(f"cloud-dump: error: {what}"), line
    help_command = " ".join(["cloud-dump", command]).strip()
    assert line.endswith(f" (see '{help_command} --help')"), line
    assert done.stdout == ""


def test_help_is_still_argparse_help_on_stdout() -> None:
    done = run_cli("restore", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: cloud-dump restore [-h]")
    assert "--archive-mode {preserve,off}" in done.stdout
    assert done.stderr == ""
    # Ending with the exit codes, as the top-level help does.
    assert " ".join(done.stdout.split()).endswith(
        "200 wal-fetch: any failure (1: not in the archive). See README.md.")
    assert "19 check: WAL did not reach the archive" in " ".join(done.stdout.split())


@pytest.fixture(scope="module")
def backup_without_archive(
    pg15: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> StorageTarget:
    """Backup "b" of the session's PG 15 cluster, in a store where nothing archives WAL."""
    target = local_target(tmp_path_factory.mktemp("no-archive-store"))
    backup_cli(pg15, target, "b")
    return target


def test_immediate_target_without_an_archive_says_a_plain_restore_needs_none(
    backup_without_archive: StorageTarget, tmp_path: Path
) -> None:
    parent = tmp_path
    done = run_cli("restore", "--name", "b", "--pgdata", str(parent / "data"),
                   "--recovery-target", "immediate", env=backup_without_archive.env)
    assert done.returncode == ExitCode.WAL_ARCHIVE_NOT_FOUND, done.stderr
    line = error_line(done.stderr)
    assert "no WAL archive at" in line
    assert "a copy of the backup alone needs no target (restore without one" in line
    assert list(parent.iterdir()) == []
    # Another target: the archive is what it needs, and nothing else is suggested.
    done = run_cli("restore", "--name", "b", "--pgdata", str(parent / "data"),
                   "--recovery-target", "latest", env=backup_without_archive.env)
    assert done.returncode == ExitCode.WAL_ARCHIVE_NOT_FOUND, done.stderr
    assert "needs no target" not in error_line(done.stderr)
    # What the hint says works.
    done = run_cli("restore", "--name", "b", "--pgdata", str(parent / "data"),
                   env=backup_without_archive.env)
    assert done.returncode == 0, done.stderr
    assert (parent / "data" / "PG_VERSION").exists()


# --- the backup's progress line --------------------------------------------------------------

PROGRESS = re.compile(r"streamed ([\d,]+) MiB(?: of ~([\d,]+) MiB( \+ WAL)?)?, sent ([\d,]+) MiB")
SUMMARY = re.compile(r"streamed ([\d,]+) MiB in ")


def on_a_terminal(argv: list[str], env: dict[str, str], timeout_s: float = 120) -> tuple[int, str]:
    """Run ``argv`` with stderr on a pseudo-terminal; its exit status and what it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave, env={**os.environ, **env})  # fmt: skip
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), seen.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def mib(text: str) -> int:
    return int(text.replace(",", ""))


def test_backup_progress_line_shows_the_estimate_with_the_wal_on_top(
    pg15: PgCluster, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    code, output = on_a_terminal(
        [str(VENV_BIN / "cloud-dump"), "backup", "--name", "progress", "--db-url",
         pg15.replication_url(), "--compression", "none"], target.env)  # fmt: skip
    assert code == 0, output
    lines = [PROGRESS.search(part) for part in re.split(r"[\r\n]", output)]
    shown = [match for match in lines if match is not None]
    assert shown, output
    for match in shown:
        # Never less streamed than already sent on (the server reports once a second).
        assert mib(match[1]) >= mib(match[4]), match[0]
        # The server's estimate leaves out the WAL in base.tar: never shown as the total.
        assert match[2] is None or match[3] == " + WAL", match[0]
    summary = SUMMARY.search(output)
    assert summary is not None, output
    # The last line drawn is the final count, which passed the estimate by the WAL.
    final = shown[-1]
    assert final[2] is not None, output
    assert mib(final[1]) == mib(summary[1]) > mib(final[2]), output
