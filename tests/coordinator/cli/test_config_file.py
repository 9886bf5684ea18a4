"""What the installed command says about its ``--config`` file, found in an operator trial.

- a value the file set is blamed on the file and its line, not on an environment variable the
  operator never set (the file loads into the environment);
- a key set twice is warned about once, naming the file, both lines and the one that wins (the
  last, as systemd has it), on the WAL fast path too, which hands over to the full CLI to say it;
- a UTF-8 byte order mark (an editor's) is not part of the first key;
- a line that is not KEY=VALUE is named by file and line, without echoing what may be a secret.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import fastpath
from coordinator.cli.exitcodes import ExitCode
from devrig.moto import local_target
from devrig.services import error_line, run_cli
from devrig.walfiles import SEG1, SYSID_A, WalDir, make_segment

# Set by the tests' config files: the inherited environment must not supply them instead.
CLEAN = {"CLOUD_DUMP_CONFIG": "", "CLOUD_DUMP_PARALLEL": "", "CLOUD_DUMP_CLUSTER": "",
         "CLOUD_DUMP_S3_PATH_STYLE": "", "CLOUD_DUMP_WAL_FETCH_RETRIES": ""}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_leak_from_in_process_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fastpath._parse`` loads the config file into this process's environment: put back
    what was there (setenv first, so that teardown restores rather than leaves it)."""
    for name in ("CLOUD_DUMP_STORAGE", "CLOUD_DUMP_CONFIG", *CLEAN):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def write_config(tmp_path: Path, *lines: str) -> Path:
    config = tmp_path / "cloud-dump.conf"
    config.write_text("".join(line + "\n" for line in lines))
    return config


def warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("cloud-dump: warning: ")]


# --- a value from the file is blamed on the file ----------------------------------------------

BAD_VALUES = [
    ("restore", "CLOUD_DUMP_PARALLEL=999", "CLOUD_DUMP_PARALLEL='999'",
     "is out of range: expected a whole number from 1 to 64 (--parallel)"),
    ("restore", "CLOUD_DUMP_S3_PATH_STYLE=maybe", "CLOUD_DUMP_S3_PATH_STYLE='maybe'",
     "is not true or false (restore --s3-path-style)"),
    ("wal-fetch", "CLOUD_DUMP_WAL_FETCH_RETRIES=0", "CLOUD_DUMP_WAL_FETCH_RETRIES='0'",
     "is out of range: expected a whole number from 1 to 20"),
]  # fmt: skip


def command_line(command: str, tmp_path: Path) -> list[str]:
    store = local_target(tmp_path / "store")
    if command == "restore":
        return ["restore", "--name", "b", "--pgdata", str(tmp_path / "data"), "--storage",
                store.url]  # fmt: skip
    return ["wal-fetch", SEG1, str(tmp_path / "pg_wal" / "RECOVERYXLOG"), "--storage", store.url]


@pytest.mark.parametrize(("command", "line", "value", "problem"), BAD_VALUES)
def test_a_bad_value_from_the_config_file_names_the_file_and_line_not_the_environment(
    tmp_path: Path, command: str, line: str, value: str, problem: str
) -> None:
    config = write_config(tmp_path, "# archive settings", "CLOUD_DUMP_CLUSTER=c1", line)
    done = run_cli(*command_line(command, tmp_path), "--config", str(config), env=CLEAN)
    expected = ExitCode.WAL_FETCH_FAILED if command == "wal-fetch" else ExitCode.CONFIG
    assert done.returncode == expected, done.stderr
    assert error_line(done.stderr) == (
        f"cloud-dump: error: {value} (config file '{config}' line 3) {problem}"
    )
    assert len(done.stderr.splitlines()) == 1, done.stderr
    # The same value from the environment is the environment's.
    name, _, raw = line.partition("=")
    done = run_cli(*command_line(command, tmp_path), env={**CLEAN, name: raw})
    assert done.returncode == expected, done.stderr
    assert error_line(done.stderr) == f"cloud-dump: error: environment variable {value} {problem}"


# --- a key set twice --------------------------------------------------------------------------


def test_a_key_set_twice_is_warned_about_once_and_the_last_line_wins(tmp_path: Path) -> None:
    store = local_target(tmp_path / "store")
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    config = write_config(tmp_path, "CLOUD_DUMP_CLUSTER=first", f"AWS_SECRET_ACCESS_KEY={secret}",
                          "", "export CLOUD_DUMP_CLUSTER='second'",
                          f"AWS_SECRET_ACCESS_KEY={secret}x")  # fmt: skip
    done = run_cli("list", "--storage", store.url, "--config", str(config), env=CLEAN)
    assert done.returncode == 0, done.stderr
    assert "Cluster: second" in done.stdout
    assert warnings(done.stderr) == [
        f"cloud-dump: warning: config file '{config}' sets CLOUD_DUMP_CLUSTER on lines 1 and 4: "
        "the value on line 4 is used",
        f"cloud-dump: warning: config file '{config}' sets AWS_SECRET_ACCESS_KEY on lines 2 "
        "and 5: the value on line 5 is used",
    ]
    assert secret[:8] not in done.stderr


def test_the_wal_fast_path_hands_a_key_set_twice_to_the_full_cli_to_warn(
    wal_dir: WalDir, tmp_path: Path
) -> None:
    store = local_target(tmp_path / "store")
    config = write_config(tmp_path, f"CLOUD_DUMP_STORAGE={store.url}")
    wal_dir.add(SEG1, make_segment(SYSID_A, 600, SEG1))
    done = wal_dir.push(SEG1, "--config", str(config), env=CLEAN)
    assert done.returncode == 0, done.stderr
    assert not warnings(done.stderr)
    # Already archived: the answer is the spool's marker, which the fast path gives alone...
    flags = ["--config", str(config)]
    assert fastpath._parse([str(wal_dir.pg_wal / SEG1), SEG1, *flags],
                           fastpath.WAL_PUSH_VALUE_FLAGS, fastpath.WAL_PUSH_SWITCHES)  # fmt: skip
    # ...but not when the file has something to warn about: the full CLI answers and warns.
    write_config(tmp_path, f"CLOUD_DUMP_STORAGE={store.url}", f"CLOUD_DUMP_STORAGE={store.url}")
    parsed = fastpath._parse([str(wal_dir.pg_wal / SEG1), SEG1, *flags],
                             fastpath.WAL_PUSH_VALUE_FLAGS, fastpath.WAL_PUSH_SWITCHES)  # fmt: skip
    assert parsed is None
    done = wal_dir.push(SEG1, *flags, env=CLEAN)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"cloud-dump: warning: config file '{config}' sets CLOUD_DUMP_STORAGE on lines 1 and 2: "
        "the value on line 2 is used"
    ]


# --- a byte order mark ------------------------------------------------------------------------


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_key(tmp_path: Path) -> None:
    store = local_target(tmp_path / "store")
    config = tmp_path / "cloud-dump.conf"
    config.write_bytes(b"\xef\xbb\xbfCLOUD_DUMP_CLUSTER=bom\n")
    done = run_cli("list", "--storage", store.url, "--config", str(config), env=CLEAN)
    assert done.returncode == 0, done.stderr
    assert "Cluster: bom" in done.stdout
    assert done.stderr == ""


# --- a line that is not KEY=VALUE -------------------------------------------------------------

NOT_SHOWN = "(the line is not shown: it may hold a secret)"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY=="
MALFORMED = {
    # The key is shown (a name), the value never.
    "space for '='": (f"CLOUD_DUMP_PASSPHRASE {SECRET}",
                      "'CLOUD_DUMP_PASSPHRASE' is not followed by '='"),
    "colon for '='": (f"AWS_SECRET_ACCESS_KEY: {SECRET}",
                      "'AWS_SECRET_ACCESS_KEY' is not followed by '='"),
    "no value": ("CLOUD_DUMP_PASSPHRASE", "'CLOUD_DUMP_PASSPHRASE' is not followed by '='"),
    "dashes in the key": (f"CLOUD-DUMP-PASSPHRASE={SECRET}",
                          "'CLOUD-DUMP-PASSPHRASE' is not a variable name"),
    # A secret alone on a line (a value continued, a pasted key): nothing of it is shown.
    "base64 alone": (SECRET, NOT_SHOWN),
    "base32 alone": ("JBSWY3DPEHPK3PXPJBSWY3DP", NOT_SHOWN),
    "words alone": ("correct horse battery staple", NOT_SHOWN),
    "words with '='": ("correct horse=battery staple", NOT_SHOWN),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_line_is_named_by_file_and_line_without_echoing_a_secret(
    tmp_path: Path, case: str
) -> None:
    line, what = MALFORMED[case]
    store = local_target(tmp_path / "store")
    config = write_config(tmp_path, "# credentials", f"CLOUD_DUMP_STORAGE={store.url}", line)
    done = run_cli("list", "--config", str(config), env=CLEAN)
    assert done.returncode == ExitCode.CONFIG, done.stderr
    message = error_line(done.stderr)
    assert message.startswith(
        f"cloud-dump: error: config file '{config}' line 3: expected KEY=VALUE"
    ), message
    assert what in message
    assert len(done.stderr.splitlines()) == 1, done.stderr
    for secret in (SECRET[:8], "JBSWY3DP", "horse"):
        assert secret not in done.stderr


def test_a_key_cloud_dump_does_not_read_is_warned_about_with_a_guess(tmp_path: Path) -> None:
    """A typo in archive.conf would otherwise be a setting silently unset: the cluster's WAL
    archived into the flat layout, nobody told. Other libraries' keys pass silently."""
    store = local_target(tmp_path / "store")
    config = write_config(tmp_path, "CLOUD_DUMP_CLUSTR=prod", "storage=elsewhere",
                          "AWS_ACCESS_KEY_ID=AKIAEXAMPLE", "PGSSLMODE=require",
                          "CLOUD_DUMP_LOG_LEVEL=info")  # fmt: skip
    done = run_cli("list", "--storage", store.url, "--config", str(config), env=CLEAN)
    assert done.returncode == 0, done.stderr
    assert warnings(done.stderr) == [
        f"cloud-dump: warning: config file '{config}' line 1: CLOUD_DUMP_CLUSTR is not a "
        "cloud-dump setting (did you mean CLOUD_DUMP_CLUSTER?)",
        f"cloud-dump: warning: config file '{config}' line 2: storage is not a cloud-dump "
        "setting (did you mean CLOUD_DUMP_STORAGE?)",
    ]


def test_the_wal_fast_path_hands_an_unknown_key_to_the_full_cli_to_warn(
    tmp_path: Path, wal_dir: WalDir
) -> None:
    store = local_target(tmp_path / "store")
    config = write_config(tmp_path, f"CLOUD_DUMP_STORAGE={store.url}")
    wal_dir.add(SEG1, make_segment(SYSID_A, 601, SEG1))
    assert wal_dir.push(SEG1, "--config", str(config), env=CLEAN).returncode == 0
    args = [str(wal_dir.pg_wal / SEG1), SEG1, "--config", str(config)]
    assert fastpath._parse(args, fastpath.WAL_PUSH_VALUE_FLAGS, fastpath.WAL_PUSH_SWITCHES)
    write_config(tmp_path, f"CLOUD_DUMP_STORAGE={store.url}", "CLOUD_DUMP_CLUSTR=a")
    assert fastpath._parse(args, fastpath.WAL_PUSH_VALUE_FLAGS,
                           fastpath.WAL_PUSH_SWITCHES) is None  # fmt: skip
    done = wal_dir.push(SEG1, "--config", str(config), env=CLEAN)
    assert done.returncode == 0, done.stderr
    assert "CLOUD_DUMP_CLUSTR is not a cloud-dump setting" in done.stderr


@pytest.mark.parametrize(("name", "value", "owner"), [
    ("CLOUD_DUMP_COMPRESSION", "bogus", "backup --compression"),
    ("CLOUD_DUMP_WAL_COMPRESSION", "bogus", "wal-push --compression"),
    ("CLOUD_DUMP_ENCRYPT", "perhaps", "backup --encrypt"),
])  # fmt: skip
def test_a_bad_variable_stops_only_the_command_that_reads_it(
    tmp_path: Path, name: str, value: str, owner: str
) -> None:
    """A backup's variable left in a server's environment must not stop wal-fetch (200 would
    stop recovery) nor list; the command that reads it refuses it, naming which flag it is."""
    store = local_target(tmp_path / "store")
    env = {**CLEAN, name: value}
    assert run_cli("list", "--storage", store.url, env=env).returncode == 0
    fetched = run_cli(*command_line("wal-fetch", tmp_path), env=env)
    assert "no WAL archive" in error_line(fetched.stderr), fetched.stderr  # not the variable
    command = owner.split()[0]
    argv = {"backup": ["backup", "--name", "b", "--db-url", "postgres://x", "--storage", store.url],
            "wal-push": ["wal-push", str(tmp_path / "pg_wal" / SEG1), SEG1, "--storage",
                         store.url]}[command]  # fmt: skip
    done = run_cli(*argv, env=env)
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert error_line(done.stderr).endswith(f"({owner})"), done.stderr
