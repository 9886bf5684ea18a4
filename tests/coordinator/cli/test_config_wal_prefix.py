"""``--wal-prefix`` with ``--cluster`` is refused, never silently ignored.

The seed documents ``--wal-prefix`` as "flat layout only" and ``--cluster`` as deriving the WAL
prefix (``<cluster>/wal_archive/``). Ignoring a prefix given with a cluster sends WAL to, or
reads it from, another archive than the one the operator named; so every command that builds a
key layout refuses the combination (exit 3; wal-fetch 200, which stops recovery) naming both,
before it touches storage. The prefix comes from the flag or ``CLOUD_DUMP_WAL_PREFIX`` (the only
way for ``backup`` and ``list``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import fastpath
from coordinator.cli.exitcodes import ExitCode
from devrig.moto import local_target
from devrig.postgres import PgCluster
from devrig.services import error_line, run_cli
from devrig.walarchive import SEGMENT
from devrig.walfiles import SEG1, SYSID_A, WalDir, make_segment

REFUSED = "WAL prefix 'pg/wal' cannot be used with cluster 'prod'"


def command_line(command: str, tmp_path: Path, pg15: PgCluster) -> list[str]:
    pgdata = tmp_path / "pgdata"
    restore = ["restore", "--name", "b1", "--pgdata", str(tmp_path / "restored")]
    lines = {
        "backup": ["backup", "--name", "b1", "--db-url", pg15.replication_url(), "--no-progress"],
        "list": ["list"],
        "restore": restore,
        "restore-with-target": [*restore, "--recovery-target", "latest"],
        "wal-push": ["wal-push", str(pgdata / "pg_wal" / SEG1), SEG1],
        "wal-fetch": ["wal-fetch", SEGMENT, str(pgdata / "pg_wal" / "RECOVERYXLOG")],
    }
    return lines[command]


# backup and list have no --wal-prefix flag: only the environment gives them one.
CASES = [("backup", "environment"), ("list", "environment")] + [
    (command, given)
    for command in ("restore", "restore-with-target", "wal-push", "wal-fetch")
    for given in ("flag", "environment")
]


@pytest.mark.parametrize(("command", "given"), CASES)
def test_a_wal_prefix_with_a_cluster_is_refused_naming_both(
    command: str, given: str, tmp_path: Path, pg15: PgCluster
) -> None:
    target = local_target(tmp_path / "store")
    wal_dir = WalDir(tmp_path / "pgdata")
    wal_dir.add(SEG1, make_segment(SYSID_A, 660, SEG1), ready=True)
    argv = [*command_line(command, tmp_path, pg15), "--cluster", "prod"]
    env = {**target.env, "CLOUD_DUMP_WAL_FETCH_RETRIES": "1"}
    if given == "flag":
        argv += ["--wal-prefix", "pg/wal"]
    else:
        env["CLOUD_DUMP_WAL_PREFIX"] = "pg/wal"
    done = run_cli(*argv, env=env)
    expected = ExitCode.WAL_FETCH_FAILED if command == "wal-fetch" else ExitCode.CONFIG
    assert done.returncode == expected, done.stderr
    assert REFUSED in error_line(done.stderr)
    assert not list((tmp_path / "store").iterdir()), "storage was written"
    assert not (tmp_path / "restored").exists()
    assert not list(tmp_path.glob("*.conf")), "a restore config was written"
    assert not wal_dir.marker(SEG1).exists()


def test_the_default_wal_prefix_spelt_out_with_a_cluster_is_accepted(tmp_path: Path) -> None:
    target = local_target(tmp_path / "store")
    wal_dir = WalDir(tmp_path / "pgdata")
    wal_dir.add(SEG1, make_segment(SYSID_A, 661, SEG1))
    done = wal_dir.push(SEG1, "--cluster", "prod", "--wal-prefix", "wal_archive", env=target.env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "store" / "prod" / "wal_archive" / f"{SEG1}.zst").exists()


def test_the_fast_paths_leave_a_wal_prefix_with_a_cluster_to_the_full_cli(tmp_path: Path) -> None:
    # The full CLI refuses it; the fast path must not answer it from a spool.
    for args, value_flags, switches in (
        ([str(tmp_path / "pg_wal" / SEG1), SEG1], fastpath.WAL_PUSH_VALUE_FLAGS,
         fastpath.WAL_PUSH_SWITCHES),
        ([SEG1, "pg_wal/RECOVERYXLOG"], fastpath.WAL_FETCH_VALUE_FLAGS,
         fastpath.WAL_FETCH_SWITCHES),
    ):  # fmt: skip
        flags = ["--storage", "file:///s", "--cluster", "prod"]
        assert fastpath._parse([*args, *flags, "--wal-prefix", "x"], value_flags, switches) is None
        assert fastpath._parse([*args, *flags], value_flags, switches) is not None
