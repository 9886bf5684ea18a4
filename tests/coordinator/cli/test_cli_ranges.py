"""Every numeric setting is range-checked at the edge: a value out of range, from a flag, from its
environment variable or from a ``--config`` file, ends the command with exit 3 (wal-fetch: 200,
so that recovery stops) and one line naming the flag or the variable and the allowed range,
before anything is opened, connected or created.

The commands get settings that would reach a server (a database or an S3 endpoint on a port
nothing listens on, a local store, a data directory): had the check come later, the exit code
would be another one, and the directories would exist.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import local_target
from devrig.procs import free_port
from devrig.services import error_line, run_cli
from devrig.walarchive import (
    archive_wal,
    segment_bytes,
    segment_name,
    spool_dir,
    wait_for_prefetcher,
    wal_fetch,
)
from devrig.walfiles import SEG1, SYSID_A, WalDir, make_segment
from storage.base import MIN_CONFIGURABLE_PART_COUNT, S3_MAX_PART_COUNT, S3_MIN_PART_SIZE_BYTES
from storage.layout import Layout

# The range each flag's error line gives.
RANGES = {
    "--parallel": "a whole number from 1 to 64",
    "--part-size-mib": "a whole number from 5 to 512",
    "--part-timeout": "a number above 0, at most 86400",
    "--task-timeout": "a number above 0, at most 86400",
    "--timeout": "a number above 0, at most 86400",
    "--look-ahead": "a whole number from 0 to 64",
    "--prefetch": "a whole number from 0 to 64",
    "--s3-max-parts": "a whole number from 1 to 10000",
    "--storage-max-attempts": "a whole number from 1 to 20",
    "--compression-level": "a whole number from 1 to 22",
}
BAD_FLAG_VALUES = [
    ("backup", "--parallel", ["0", "-3", "65", "two"]),
    ("backup", "--part-size-mib", ["4", "0", "513"]),
    ("backup", "--part-timeout", ["0", "-1", "nan", "inf", "86401"]),
    ("backup", "--task-timeout", ["0", "-600"]),
    ("backup", "--compression-level", ["0", "23", "-1"]),
    ("backup", "--s3-max-parts", ["0", "10001"]),
    ("backup", "--storage-max-attempts", ["0", "21"]),
    ("restore", "--parallel", ["0", "-3", "65", "1.5"]),
    ("restore", "--s3-max-parts", ["0"]),
    ("restore", "--storage-max-attempts", ["-1"]),
    ("wal-push", "--timeout", ["0", "-5", "86401", "soon"]),
    ("wal-push", "--look-ahead", ["-1", "65"]),
    ("wal-fetch", "--prefetch", ["-1", "65"]),
    ("wal-fetch", "--storage-max-attempts", ["0"]),
    ("check", "--timeout", ["0", "-1"]),
    ("list", "--s3-max-parts", ["-1"]),
]
# (command, variable, value, what the line must name besides the variable)
BAD_ENV_VALUES = [
    ("backup", "CLOUD_DUMP_PARALLEL", "0", "a whole number from 1 to 64"),
    ("backup", "CLOUD_DUMP_PART_SIZE_MIB", "1", "a whole number from 5 to 512"),
    ("backup", "CLOUD_DUMP_PART_TIMEOUT", "0", "a number above 0, at most 86400"),
    ("backup", "CLOUD_DUMP_TASK_TIMEOUT", "-1", "a number above 0, at most 86400"),
    ("backup", "CLOUD_DUMP_COMPRESSION_LEVEL", "99", "a whole number from 1 to 22"),
    ("restore", "CLOUD_DUMP_PARALLEL", "-3", "a whole number from 1 to 64"),
    ("restore", "CLOUD_DUMP_S3_MAX_PARTS", "0", "a whole number from 1 to 10000"),
    ("restore", "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS", "0", "a whole number from 1 to 20"),
    ("wal-push", "CLOUD_DUMP_WAL_PUSH_TIMEOUT", "0", "a number above 0, at most 86400"),
    ("wal-push", "CLOUD_DUMP_WAL_LOOK_AHEAD", "-2", "a whole number from 0 to 64"),
    ("wal-push", "CLOUD_DUMP_WAL_RETRY_S", "0", "a number above 0, at most 3600"),
    ("wal-fetch", "CLOUD_DUMP_WAL_PREFETCH", "1000", "a whole number from 0 to 64"),
    ("wal-fetch", "CLOUD_DUMP_WAL_FETCH_RETRIES", "0", "a whole number from 1 to 20"),
    ("wal-fetch", "CLOUD_DUMP_WAL_PREFETCH_WAIT", "-1", "a number from 0 to 3600"),
]


def command_line(command: str, tmp_path: Path) -> list[str]:
    """``command`` with settings that would reach a server or create something if the
    numbers were not checked first."""
    closed = f"127.0.0.1:{free_port()}"
    s3 = ["--storage", "s3://bucket/prefix", "--s3-endpoint", f"http://{closed}"]
    lines = {
        "backup": ["backup", "--name", "b", "--db-url", f"postgres://repl@{closed}/postgres",
                   "--storage", f"file://{tmp_path}/repo"],
        "restore": ["restore", "--name", "b", "--pgdata", str(tmp_path / "data"), *s3],
        "wal-push": ["wal-push", str(tmp_path / "pgdata/pg_wal" / SEG1), SEG1,
                     "--storage", f"file://{tmp_path}/repo"],
        "wal-fetch": ["wal-fetch", SEG1, str(tmp_path / "pgdata/pg_wal/RECOVERYXLOG"), *s3],
        "check": ["check", "--broker", f"redis://{closed}/0"],
        "list": ["list", *s3],
    }  # fmt: skip
    return lines[command]


def is_number(text: str, whole: bool) -> bool:
    try:
        return math.isfinite(int(text) if whole else float(text))
    except ValueError:
        return False


def expected_exit(command: str) -> int:
    return ExitCode.WAL_FETCH_FAILED if command == "wal-fetch" else ExitCode.CONFIG


def assert_refused_first(
    command: str, tmp_path: Path, done_returncode: int, stderr: str, *fragments: str
) -> None:
    assert done_returncode == expected_exit(command), stderr
    line = error_line(stderr)
    assert len(stderr.strip().splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was created"


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [(command, flag, value) for command, flag, values in BAD_FLAG_VALUES for value in values],
)
def test_numeric_flag_out_of_range_is_refused_first_naming_flag_and_range(
    tmp_path: Path, command: str, flag: str, value: str
) -> None:
    argv = [*command_line(command, tmp_path), f"{flag}={value}"]
    done = run_cli(*argv)
    whole = RANGES[flag].startswith("a whole number")
    what = RANGES[flag] if is_number(value, whole) else "is not a"
    assert_refused_first(command, tmp_path, done.returncode, done.stderr, flag, f"'{value}'", what)


@pytest.mark.parametrize(("command", "variable", "value", "allowed"), BAD_ENV_VALUES)
def test_numeric_environment_variable_out_of_range_is_refused_first_naming_it(
    tmp_path: Path, command: str, variable: str, value: str, allowed: str
) -> None:
    done = run_cli(*command_line(command, tmp_path), env={variable: value})
    assert_refused_first(command, tmp_path, done.returncode, done.stderr,
                         f"environment variable {variable}='{value}'", allowed)  # fmt: skip


def test_value_from_a_config_file_is_checked_like_the_environment(tmp_path: Path) -> None:
    config = tmp_path.parent / f"{tmp_path.name}.conf"
    config.write_text("CLOUD_DUMP_PARALLEL=0\n")
    done = run_cli(*command_line("restore", tmp_path), "--config", str(config))
    assert_refused_first("restore", tmp_path, done.returncode, done.stderr,
                         "CLOUD_DUMP_PARALLEL='0'", "a whole number from 1 to 64")  # fmt: skip


@pytest.mark.parametrize(("compression", "level", "allowed"), [
    ("gzip", "10", "from 1 to 9"),
    ("lz4", "13", "from 1 to 12"),
    ("zstd", "0", "from 1 to 22"),
    ("none", "1", "'none' has no levels"),
])  # fmt: skip
def test_compression_level_is_checked_against_its_algorithm_first(
    tmp_path: Path, compression: str, level: str, allowed: str
) -> None:
    argv = [*command_line("backup", tmp_path), "--compression", compression]
    done = run_cli(*argv, env={"CLOUD_DUMP_COMPRESSION_LEVEL": level})
    assert_refused_first("backup", tmp_path, done.returncode, done.stderr,
                         "CLOUD_DUMP_COMPRESSION_LEVEL", allowed)  # fmt: skip


def test_a_flag_in_range_wins_over_an_environment_value_out_of_range(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    done = run_cli("check", "--storage", f"file://{tmp_path}/repo", "--s3-max-parts", "1000",
                   "--storage-max-attempts", "20", "--timeout", "0.5",
                   env={"CLOUD_DUMP_S3_MAX_PARTS": "0", "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS": "0"})
    assert done.returncode == 0, done.stderr


def test_the_ends_of_the_ranges_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    ends = ((MIN_CONFIGURABLE_PART_COUNT, 1, "0.001"), (S3_MAX_PART_COUNT, 20, "86400"))
    for parts, attempts, timeout in ends:
        done = run_cli("check", "--storage", f"file://{tmp_path}/repo", "--timeout", timeout,
                       env={"CLOUD_DUMP_S3_MAX_PARTS": str(parts),
                            "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS": str(attempts)})  # fmt: skip
        assert done.returncode == 0, done.stderr


def test_ranges_agree_with_the_storage_limits() -> None:
    from options.declared import option_for

    max_parts = option_for("backup", "--s3-max-parts")
    part_size = option_for("backup", "--part-size-mib")
    assert max_parts is not None and max_parts.limit is not None
    assert part_size is not None and part_size.limit is not None
    assert max_parts.limit.low == MIN_CONFIGURABLE_PART_COUNT
    assert max_parts.limit.high == S3_MAX_PART_COUNT
    assert part_size.limit.low * 1024 * 1024 == S3_MIN_PART_SIZE_BYTES


def test_wal_push_answered_from_its_marker_still_refuses_a_timeout_out_of_range(
    wal_dir: WalDir, tmp_path: Path
) -> None:
    """The fast path (a confirmation marker, no full CLI) accepts what the full CLI accepts."""
    (tmp_path / "repo").mkdir()
    env = {"CLOUD_DUMP_STORAGE": f"file://{tmp_path}/repo"}
    wal_dir.add(SEG1, make_segment(SYSID_A, 300, SEG1))
    assert wal_dir.push(SEG1, env=env).returncode == 0
    assert wal_dir.marker(SEG1).exists()
    assert wal_dir.push(SEG1, env=env).returncode == 0  # answered from the marker
    for flags, extra_env in ((["--timeout", "0"], {}), ([], {"CLOUD_DUMP_WAL_LOOK_AHEAD": "-1"})):
        done = wal_dir.push(SEG1, *flags, env={**env, **extra_env})
        assert done.returncode == ExitCode.CONFIG, done.stderr
        assert "is out of range" in error_line(done.stderr)


def test_wal_fetch_served_from_its_spool_still_refuses_a_prefetch_out_of_range(
    pgdata: Path, tmp_path: Path
) -> None:
    """The fast path (a spooled segment, no full CLI) accepts what the full CLI accepts; the
    refusal stops recovery (200) and leaves the spooled segment where it was."""
    target = local_target(tmp_path / "store")
    first, second = segment_name(1), segment_name(2)
    for n, name in enumerate((first, second)):
        archive_wal(target.open(), Layout(), name, segment_bytes(500 + n))
    assert wal_fetch(target, pgdata, first, "--prefetch", "1").returncode == 0
    assert wait_for_prefetcher(pgdata)
    spooled = spool_dir(pgdata) / "prefetch" / second
    assert spooled.exists()
    for flags, env in ((["--prefetch", "65"], {}), ([], {"CLOUD_DUMP_WAL_PREFETCH": "-1"})):
        done = wal_fetch(target, pgdata, second, *flags, env=env)
        assert done.returncode == ExitCode.WAL_FETCH_FAILED, done.stderr
        assert "is out of range" in error_line(done.stderr)
        assert spooled.exists()  # not served: %p still holds the first segment
        assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(500)
    done = wal_fetch(target, pgdata, second, "--prefetch", "0")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(501)


def test_help_gives_each_numeric_flag_its_range() -> None:
    for command, flag, text in (("wal-fetch", "--prefetch", "0-64"),
                                ("restore", "--parallel", "1-64"),
                                ("wal-push", "--timeout", "default 60; above 0, up to 86400")):
        done = run_cli(command, "--help")
        assert done.returncode == 0
        help_text = " ".join(done.stdout.split())
        assert text in help_text[help_text.rindex(f"{flag} "):], (flag, help_text)
