"""A ``--config`` file beats the environment; a flag beats both.

A file named on the command line is deliberate (archive_command and restore_command name one);
an inherited environment is not: a server started from a shell that had ``CLOUD_DUMP_STORAGE``
set must still archive to, and recover from, the storage its command's file names. The same
order holds in the full CLI and in the fast paths that answer from the spool
(``coordinator.cli.fastpath``), checked here on real local stores, and setting by setting.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from coordinator.cli import fastpath
from coordinator.cli.configfile import load_config_file
from coordinator.cli.limits import DEFAULT_PREFETCH
from coordinator.cli.main import build_parser
from devrig.moto import StorageTarget, local_target
from devrig.services import error_line
from devrig.walarchive import archive_wal, segment_name, wait_for_prefetcher
from devrig.walarchive import wal_fetch as run_wal_fetch
from devrig.walfiles import SEG1, SEG2, SYSID_A, WalDir, make_segment
from storage.layout import Layout

SETTINGS = ("CLOUD_DUMP_STORAGE", "CLOUD_DUMP_CLUSTER", "CLOUD_DUMP_WAL_PREFIX",
            "CLOUD_DUMP_SPOOL_DIR", "CLOUD_DUMP_WAL_PREFETCH", "CLOUD_DUMP_CONFIG")  # fmt: skip


def stores(tmp_path: Path) -> tuple[StorageTarget, StorageTarget, StorageTarget]:
    """The environment's store, the config file's, and the flag's: all real directories."""
    return tuple(local_target(tmp_path / name) for name in ("env", "file", "flag"))  # type: ignore[return-value]


def config_file(tmp_path: Path, target: StorageTarget) -> Path:
    config = tmp_path / "cloud-dump.conf"
    config.write_text(f"CLOUD_DUMP_STORAGE={target.url}\n")
    return config


def wal_keys(target: StorageTarget) -> list[str]:
    return [info.key for info in target.open().list("wal_archive/") if "cloud-dump" not in info.key]


# --- wal-push --------------------------------------------------------------------------------


@pytest.mark.parametrize("named", ["flag", "variable"])
def test_wal_push_stores_where_its_config_file_says_not_where_the_environment_says(
    wal_dir: WalDir, tmp_path: Path, named: str
) -> None:
    env_store, file_store, flag_store = stores(tmp_path)
    config = config_file(tmp_path, file_store)
    # The file named by --config, or by CLOUD_DUMP_CONFIG: either way a file chosen for it.
    by_flag = named == "flag"
    how = ["--config", str(config)] if by_flag else []
    env = {**env_store.env, **({} if by_flag else {"CLOUD_DUMP_CONFIG": str(config)})}
    wal_dir.add(SEG1, make_segment(SYSID_A, 600, SEG1))
    done = wal_dir.push(SEG1, *how, env=env)
    assert done.returncode == 0, done.stderr
    assert wal_keys(file_store) == [f"wal_archive/{SEG1}.zst"]
    assert not list(env_store.open().list(""))
    # Again: answered from the spool's marker (the fast path), for the same archive.
    done = wal_dir.push(SEG1, *how, env=env)
    assert done.returncode == 0, done.stderr
    assert not list(env_store.open().list(""))
    # A flag beats the file.
    wal_dir.add(SEG2, make_segment(SYSID_A, 601, SEG2))
    done = wal_dir.push(SEG2, *how, "--storage", flag_store.url, env=env)
    assert done.returncode == 0, done.stderr
    assert wal_keys(flag_store) == [f"wal_archive/{SEG2}.zst"]
    assert wal_keys(file_store) == [f"wal_archive/{SEG1}.zst"]


# --- wal-fetch -------------------------------------------------------------------------------


def test_wal_fetch_reads_the_archive_its_config_file_names_not_the_environments(
    pgdata: Path, tmp_path: Path
) -> None:
    env_store, file_store, flag_store = stores(tmp_path)
    config = config_file(tmp_path, file_store)
    names = [segment_name(n) for n in (5, 6, 7)]
    wanted = {}
    for n, name in enumerate(names):
        wanted[name] = make_segment(SYSID_A, 700 + n, name)
        archive_wal(file_store.open(), Layout(), name, wanted[name])
        # The environment's store has an archive too, with other bytes under the same names.
        archive_wal(env_store.open(), Layout(), name, make_segment(SYSID_A, 800 + n, name))
    flag_bytes = make_segment(SYSID_A, 900, names[2])
    archive_wal(flag_store.open(), Layout(), names[2], flag_bytes)
    # The first call fetches directly and starts the prefetcher, which spools the next one.
    done = run_wal_fetch(env_store, pgdata, names[0], "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == wanted[names[0]]
    assert wait_for_prefetcher(pgdata)
    # The second is served from the spool (the fast path): only if it names the same archive.
    done = run_wal_fetch(env_store, pgdata, names[1], "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "discarding spooled" not in done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == wanted[names[1]]
    # A flag beats the file.
    done = run_wal_fetch(env_store, pgdata, names[2], "--config", str(config), "--prefetch", "0",
                         "--storage", flag_store.url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256((pgdata / "pg_wal/RECOVERYXLOG").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(flag_bytes).hexdigest()
    assert wait_for_prefetcher(pgdata)


# --- the fast path resolves every setting as the full CLI does --------------------------------

CASES = {
    "environment only": ({"CLOUD_DUMP_STORAGE": "file:///env"}, {}, []),
    "file over environment": (
        {"CLOUD_DUMP_STORAGE": "file:///env", "CLOUD_DUMP_CLUSTER": "envc"},
        {"CLOUD_DUMP_STORAGE": "file:///file", "CLOUD_DUMP_CLUSTER": "filec",
         "CLOUD_DUMP_SPOOL_DIR": "/file/spool", "CLOUD_DUMP_WAL_PREFETCH": "3"},
        [],
    ),
    "flag over file and environment": (
        {"CLOUD_DUMP_STORAGE": "file:///env", "CLOUD_DUMP_WAL_PREFIX": "envp"},
        {"CLOUD_DUMP_STORAGE": "file:///file", "CLOUD_DUMP_WAL_PREFIX": "filep"},
        ["--storage", "file:///flag", "--wal-prefix", "flagp", "--spool-dir", "/flag/spool"],
    ),
    "file only": ({}, {"CLOUD_DUMP_STORAGE": "file:///file", "CLOUD_DUMP_WAL_PREFIX": "p"}, []),
}  # fmt: skip
ATTRIBUTES = {"--storage": "storage", "--cluster": "cluster", "--wal-prefix": "wal_prefix",
              "--spool-dir": "spool_dir", "--prefetch": "prefetch"}  # fmt: skip


@pytest.mark.parametrize("command", ["wal-push", "wal-fetch"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_and_full_cli_resolve_settings_alike(
    command: str, case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment, file_values, flags = CASES[case]
    for name in SETTINGS:
        # setenv first, so that teardown puts back what was there: the config file loads into
        # os.environ, where a later delenv alone would leave its values for later tests.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "cloud-dump.conf"
    config.write_text("".join(f"{k}={v}\n" for k, v in file_values.items()))
    positional = ["pg_wal/" + SEG1, SEG1] if command == "wal-push" else [SEG1, "pg_wal/X"]
    value_flags = (fastpath.WAL_PUSH_VALUE_FLAGS if command == "wal-push"
                   else fastpath.WAL_FETCH_VALUE_FLAGS)  # fmt: skip
    switches = (fastpath.WAL_PUSH_SWITCHES if command == "wal-push"
                else fastpath.WAL_FETCH_SWITCHES)  # fmt: skip
    argv = [*positional, *flags, "--config", str(config)]
    parsed = fastpath._parse(argv, value_flags, switches)
    assert parsed is not None
    fast = parsed[1]
    load_config_file([command, *argv])
    full = vars(build_parser().parse_args([command, *argv]))
    for flag, attribute in ATTRIBUTES.items():
        if flag == "--prefetch":
            if command == "wal-fetch":  # the fast path applies the default itself
                assert int(fast[flag] or DEFAULT_PREFETCH) == full[attribute]
            continue
        assert fast[flag] == full[attribute], (flag, fast[flag], full[attribute])
    winner = next(v for v in (_flag(flags, "--storage"), file_values.get("CLOUD_DUMP_STORAGE"),
                              environment.get("CLOUD_DUMP_STORAGE")) if v)  # fmt: skip
    assert fast["--storage"] == full["storage"] == winner


def _flag(flags: list[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None


# --- a comment after a value -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["{url} # prod", "{url}#prod", "{url}/pg ?"])
def test_storage_with_a_comment_after_it_is_refused_not_taken_as_a_prefix(
    wal_dir: WalDir, tmp_path: Path, value: str
) -> None:
    """Found by an operator: ``CLOUD_DUMP_STORAGE=s3://b/pg # prod`` archived under the prefix
    'pg # prod' with exit 0; the storage URL now refuses spaces, '#' and '?'."""
    store = local_target(tmp_path / "store")
    config = tmp_path / "archive.conf"
    config.write_text("CLOUD_DUMP_STORAGE=" + value.format(url=store.url) + "\n")
    wal_dir.add(SEG1, make_segment(SYSID_A, 601, SEG1))
    done = wal_dir.push(SEG1, "--config", str(config), env={})
    assert done.returncode == 3, done.stderr
    assert "storage URL" in error_line(done.stderr), done.stderr
    assert wal_keys(store) == []
