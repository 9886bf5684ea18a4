"""The command line's contract: commands listed, one-line errors, documented exit codes."""

from __future__ import annotations

from pathlib import Path

from coordinator.cli.exitcodes import ExitCode
from devrig.procs import free_port
from devrig.services import RedisServer, run_cli


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith("cloud-dump: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_the_seed_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("backup", "restore", "list", "wal-push", "wal-fetch", "check"):
        assert command in result.stdout


def test_version_names_the_installed_release() -> None:
    from importlib.metadata import version

    for flag in ("--version", "-V"):  # -V: as PostgreSQL's own tools spell it
        result = run_cli(flag)
        assert (result.returncode, result.stdout.strip()) == (
            0, f"cloud-dump {version('cloud-dump')}"
        )


def test_wal_fetch_usage_error_stops_recovery() -> None:
    # PostgreSQL takes an exit status up to 125 from restore_command as "not in the archive".
    result = run_cli("wal-fetch", "000000010000000000000001")
    assert result.returncode == ExitCode.WAL_FETCH_FAILED


def test_config_file_supplies_settings(tmp_path: Path) -> None:
    config = tmp_path / "cloud-dump.conf"
    config.write_text(f"# settings\nexport CLOUD_DUMP_STORAGE='file://{tmp_path}/repo'\n")
    (tmp_path / "repo").mkdir()
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"storage file://{tmp_path}/repo: ok" in result.stdout


def test_check_storage_round_trip_on_local_directory(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    result = run_cli("check", "--storage", f"file://{tmp_path}/repo")
    assert result.returncode == 0, result.stderr
    assert f"storage file://{tmp_path}/repo: ok" in result.stdout
    # The probe object is gone again: nothing but empty directories left behind.
    assert not [p for p in (tmp_path / "repo").rglob("*") if p.is_file()]


def test_unsupported_storage_url_is_a_config_error() -> None:
    result = run_cli("check", "--storage", "ftp://somewhere/x")
    assert result.returncode == ExitCode.CONFIG
    assert_one_line_error(result.stderr, "unsupported storage URL 'ftp://somewhere/x'")


def test_invalid_environment_value_is_a_config_error() -> None:
    result = run_cli("check", "--storage", "file:///tmp/x", env={"CLOUD_DUMP_S3_MAX_PARTS": "lots"})
    assert result.returncode == ExitCode.CONFIG
    assert_one_line_error(result.stderr, "CLOUD_DUMP_S3_MAX_PARTS='lots'")


def test_flag_wins_over_environment(tmp_path: Path) -> None:
    result = run_cli(
        "check", "--storage", f"file://{tmp_path}", env={"CLOUD_DUMP_STORAGE": "ftp://wrong/"}
    )
    assert result.returncode == 0, result.stderr


def test_unreachable_s3_endpoint_names_it_and_exits_storage_unreachable() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        "check",
        "--storage",
        "s3://bucket/prefix",
        "--s3-endpoint",
        endpoint,
        env={
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "secret-value",
            "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS": "2",
        },
    )
    assert result.returncode == ExitCode.STORAGE_UNREACHABLE
    assert_one_line_error(result.stderr, endpoint)
    assert "secret-value" not in result.stderr + result.stdout


def test_local_storage_that_is_a_file_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = run_cli("check", "--storage", f"file://{blocker}")
    assert result.returncode == ExitCode.STORAGE_ERROR
    assert_one_line_error(result.stderr, str(blocker))


def test_unreachable_broker_names_it_and_hides_its_password() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = run_cli("check", "--broker", url)
    assert result.returncode == ExitCode.BROKER_UNREACHABLE
    assert_one_line_error(result.stderr, "cannot reach broker", "127.0.0.1")
    assert "hunter2" not in result.stderr + result.stdout


def test_broker_without_workers_exits_no_worker(redis_server: RedisServer) -> None:
    result = run_cli("check", "--broker", redis_server.url)
    assert result.returncode == ExitCode.NO_WORKER
    assert_one_line_error(result.stderr, "no worker answered")
