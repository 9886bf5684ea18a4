"""wal-push: what is stored, that it is stored once, and that nothing but a confirmed store
returns 0 — through the installed command, against real storage, Redis, workers and PostgreSQL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from coordinator.background import helper_pid
from coordinator.cli import fastpath
from coordinator.cli.exitcodes import ExitCode
from coordinator.cli.main import build_parser
from coordinator.crypto import decrypt_bytes, generate_identity, unwrap_identity
from coordinator.wal.push.spool import (
    PUSHER_LOCK,
    LookAhead,
    Spool,
    archive_location,
    file_identity,
    select_look_ahead,
)
from coordinator.walheader import segment_system_identifier
from devrig.launcher import postgres_cloud_dump
from devrig.moto import StorageTarget, local_target
from devrig.postgres import OS_USER, PgCluster, PgFactory, make_postgres_dir
from devrig.procs import free_port
from devrig.services import PUSH_RECEIVED, WorkerPool, error_line, run_cli, wait_for_log
from devrig.tcpproxy import TcpProxy
from devrig.walfiles import SEG1, SEG2, SEG3, SEG4, SYSID_A, SYSID_B, WalDir, make_segment
from storage.base import Storage
from workers.wal import ARCHIVE_INFO_NAME, ARCHIVE_KEY_NAME, RAW_SHA256, WalArchiveInfo

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def stored(storage: Storage, prefix: str = "wal_archive/") -> dict[str, str]:
    return {info.key: info.etag for info in storage.list(prefix)}


# --- the seed's tests, on both backends ----------------------------------------------------


def test_wal_push_uncompressed_stores_the_file_unchanged(
    wal_dir: WalDir, storage_target: StorageTarget
) -> None:
    segment = make_segment(SYSID_A, 1, SEG1)
    wal_dir.add(SEG1, segment)
    result = wal_dir.push(SEG1, "--compression", "none", env=storage_target.env)
    assert result.returncode == 0, result.stderr
    storage = storage_target.open()
    assert storage.get(f"wal_archive/{SEG1}") == segment
    assert storage.head(f"wal_archive/{SEG1}").metadata == {
        RAW_SHA256: hashlib.sha256(segment).hexdigest(),
        "system-identifier": str(SYSID_A),
    }
    info = WalArchiveInfo.model_validate_json(storage.get(f"wal_archive/{ARCHIVE_INFO_NAME}"))
    assert info.system_identifier == str(SYSID_A) and info.encryption is None
    assert wal_dir.marker(SEG1).exists()


def test_wal_push_compressed_is_readable_with_zstd(
    wal_dir: WalDir, storage_target: StorageTarget, tmp_path: Path
) -> None:
    segment = make_segment(SYSID_A, 2, SEG1)
    wal_dir.add(SEG1, segment)
    result = wal_dir.push(SEG1, "--compress", env=storage_target.env)
    assert result.returncode == 0, result.stderr
    blob = storage_target.open().get(f"wal_archive/{SEG1}.zst")
    assert len(blob) < len(segment) // 10
    (tmp_path / "seg.zst").write_bytes(blob)
    unpacked = subprocess.run(
        ["zstd", "-dc", str(tmp_path / "seg.zst")], capture_output=True, check=True
    ).stdout
    assert unpacked == segment


def test_wal_push_passphrase_encrypted_uses_one_archive_key(
    wal_dir: WalDir, storage_target: StorageTarget, tmp_path: Path
) -> None:
    passphrase_file = tmp_path / "pass"
    passphrase_file.write_text("correct horse\n")
    flags = ("--encrypt", "--passphrase-file", str(passphrase_file))
    first, second = make_segment(SYSID_A, 3, SEG1), make_segment(SYSID_A, 4, SEG2)
    wal_dir.add(SEG1, first)
    wal_dir.add(SEG2, second)
    debug = ("--log-level", "debug")
    result = wal_dir.push(SEG1, *flags, *debug, env=storage_target.env)
    assert result.returncode == 0, result.stderr
    assert "one scrypt" in result.stderr
    result = wal_dir.push(SEG2, *flags, *debug, env=storage_target.env)
    assert result.returncode == 0, result.stderr
    # The archive key is read from the spool's cache: no scrypt (~1.7 s) for later segments.
    assert "one scrypt" not in result.stderr

    storage = storage_target.open()
    blob = storage.get(f"wal_archive/{SEG2}.zst.age")
    assert not blob.startswith(ZSTD_MAGIC)
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(blob)
    info = WalArchiveInfo.model_validate_json(storage.get(f"wal_archive/{ARCHIVE_INFO_NAME}"))
    assert info.encryption is not None
    assert info.encryption.wrapped_identity_key == f"wal_archive/{ARCHIVE_KEY_NAME}"
    identity = unwrap_identity(storage.get(info.encryption.wrapped_identity_key), "correct horse")
    for name, segment in ((SEG1, first), (SEG2, second)):
        plain = decrypt_bytes(storage.get(f"wal_archive/{name}.zst.age"), [identity], name)
        assert zstandard.ZstdDecompressor().decompress(plain) == segment

    # Another host with the wrong passphrase is refused before it encrypts anything.
    wal_dir.add(SEG3, make_segment(SYSID_A, 5, SEG3))
    passphrase_file.write_text("wrong\n")
    result = wal_dir.push(
        SEG3, *flags, "--spool-dir", str(tmp_path / "other-spool"), env=storage_target.env
    )
    assert result.returncode == ExitCode.DECRYPTION_FAILED, result.stderr
    assert f"wal_archive/{SEG3}.zst.age" not in stored(storage)


def test_wal_push_key_pair_encrypted_is_readable_with_age(
    wal_dir: WalDir, storage_target: StorageTarget, tmp_path: Path
) -> None:
    identity, recipient = generate_identity()
    (tmp_path / "key.txt").write_text(identity + "\n")
    (tmp_path / "key.pub").write_text(recipient + "\n")
    segment = make_segment(SYSID_A, 6, SEG1)
    wal_dir.add(SEG1, segment)
    result = wal_dir.push(
        SEG1, "--recipient-key", str(tmp_path / "key.pub"), env=storage_target.env
    )
    assert result.returncode == 0, result.stderr
    (tmp_path / "seg.zst.age").write_bytes(storage_target.open().get(f"wal_archive/{SEG1}.zst.age"))
    compressed = subprocess.run(
        ["age", "-d", "-i", str(tmp_path / "key.txt"), str(tmp_path / "seg.zst.age")],
        capture_output=True,
        check=True,
    ).stdout
    plain = subprocess.run(
        ["zstd", "-dc"], input=compressed, capture_output=True, check=True
    ).stdout
    assert plain == segment


def test_wal_push_twice_is_a_noop_whatever_the_settings(
    wal_dir: WalDir, storage_target: StorageTarget
) -> None:
    wal_dir.add(SEG1, make_segment(SYSID_A, 7, SEG1))
    assert wal_dir.push(SEG1, env=storage_target.env).returncode == 0
    storage = storage_target.open()
    before = stored(storage)
    assert wal_dir.push(SEG1, env=storage_target.env).returncode == 0  # spool marker
    wal_dir.marker(SEG1).unlink()
    # Without the marker the archive answers, and other settings do not make a second copy.
    result = wal_dir.push(SEG1, "--compression", "gzip", env=storage_target.env)
    assert result.returncode == 0, result.stderr
    assert "already archived" in result.stderr
    assert stored(storage) == before
    assert wal_dir.marker(SEG1).exists()


# --- conflicts ----------------------------------------------------------------------------


def test_different_content_under_an_archived_name_fails_and_changes_nothing(
    wal_dir: WalDir, storage_target: StorageTarget, tmp_path: Path
) -> None:
    wal_dir.add(SEG1, make_segment(SYSID_A, 8, SEG1))
    assert wal_dir.push(SEG1, env=storage_target.env).returncode == 0
    storage = storage_target.open()
    before = {key: storage.get(key) for key in stored(storage)}
    wal_dir.add(SEG1, make_segment(SYSID_A, 9, SEG1))
    result = wal_dir.push(
        SEG1, "--compression", "none", "--spool-dir", str(tmp_path / "s2"), env=storage_target.env
    )
    assert result.returncode == ExitCode.WAL_CONFLICT
    assert "already archived with different content" in error_line(result.stderr)
    assert {key: storage.get(key) for key in stored(storage)} == before
    assert not (tmp_path / "s2" / "archived" / SEG1).exists()


def test_history_file_is_never_overwritten(wal_dir: WalDir, tmp_path: Path) -> None:
    target = local_target(tmp_path / "store")
    (wal_dir.root / "global").mkdir()
    (wal_dir.root / "global" / "pg_control").write_bytes(struct.pack("<Q", SYSID_A) + bytes(100))
    wal_dir.add("00000002.history", b"1\t0/3000000\tno recovery target specified\n")
    assert wal_dir.push("00000002.history", env=target.env).returncode == 0
    meta = target.open().head("wal_archive/00000002.history.zst").metadata or {}
    assert meta["system-identifier"] == str(SYSID_A)
    wal_dir.add("00000002.history", b"1\t0/4000000\tno recovery target specified\n")
    wal_dir.marker("00000002.history").unlink()
    result = wal_dir.push("00000002.history", env=target.env)
    assert result.returncode == ExitCode.WAL_CONFLICT
    assert "'00000002.history' is already archived" in error_line(result.stderr)


def test_wal_of_another_cluster_is_refused(wal_dir: WalDir, tmp_path: Path) -> None:
    target = local_target(tmp_path / "store")
    wal_dir.add(SEG1, make_segment(SYSID_A, 10, SEG1))
    assert wal_dir.push(SEG1, env=target.env).returncode == 0
    wal_dir.add(SEG2, make_segment(SYSID_B, 11, SEG2))
    # Refused from the spool's cached identity, and by the store itself without it.
    for spool in ([], ["--spool-dir", str(tmp_path / "fresh-spool")]):
        result = wal_dir.push(SEG2, *spool, env=target.env)
        assert result.returncode == ExitCode.WAL_CONFLICT
        assert (
            f"WAL of system {SYSID_B} cannot go into the archive of system {SYSID_A}"
            in error_line(result.stderr)
        )
    assert list(stored(target.open())) == [
        f"wal_archive/{SEG1}.zst",
        "wal_archive/" + ARCHIVE_INFO_NAME,
    ]


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "000000010000000000000001.zst",
        "RECOVERYXLOG",
        "00000001.history.bak",
        "0000000100000000000000G1",
        "00000001000000000000001/",
    ],
)
def test_invalid_wal_names_are_refused(wal_dir: WalDir, tmp_path: Path, name: str) -> None:
    target = local_target(tmp_path / "store")
    path = wal_dir.pg_wal / "file"
    path.write_bytes(make_segment(SYSID_A, 12, SEG1))
    result = run_cli("wal-push", str(path), name, env=target.env)
    assert result.returncode == ExitCode.CONFIG
    assert "invalid WAL file name" in error_line(result.stderr)
    assert not list((tmp_path / "store").iterdir())  # nothing stored


# --- look-ahead and the fast path --------------------------------------------------------


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
    answered = fastpath.wal_push_already_archived
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


# --- through the broker ------------------------------------------------------------------


def test_broker_down_fails_without_a_marker(wal_dir: WalDir, tmp_path: Path) -> None:
    wal_dir.add(SEG1, make_segment(SYSID_A, 30, SEG1))
    env = {
        **local_target(tmp_path / "store").env,
        "CLOUD_DUMP_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    result = wal_dir.push(SEG1, env=env)
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    assert not wal_dir.marker(SEG1).exists()


def test_storage_down_on_the_workers_fails_without_a_marker(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], aws_env: dict[str, str]
) -> None:
    dead = {
        "CLOUD_DUMP_STORAGE": "s3://nowhere/wal",
        "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS": "1",
        "CLOUD_DUMP_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        **aws_env,
    }
    pool = start_workers(dead, count=1, queues="wal")
    wal_dir.add(SEG1, make_segment(SYSID_A, 31, SEG1))
    result = wal_dir.push(SEG1, env={"CLOUD_DUMP_BROKER_URL": pool.broker_url})
    assert result.returncode == ExitCode.STORAGE_UNREACHABLE, result.stderr
    assert not wal_dir.marker(SEG1).exists()


def test_push_through_workers_reports_conflicts_and_encrypts(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    pool = start_workers(target.env, count=2, queues="wal")
    env = {"CLOUD_DUMP_BROKER_URL": pool.broker_url}
    (tmp_path / "pass").write_text("s3cret\n")
    flags = ("--passphrase-file", str(tmp_path / "pass"))
    names = [SEG1, SEG2, SEG3]
    segments = {name: make_segment(SYSID_A, 40 + i, name) for i, name in enumerate(names)}
    for name, data in segments.items():
        wal_dir.add(name, data, ready=True)
    result = wal_dir.push(SEG1, *flags, env=env)
    assert result.returncode == 0, result.stderr
    storage = target.open()
    info = WalArchiveInfo.model_validate_json(storage.get(f"wal_archive/{ARCHIVE_INFO_NAME}"))
    assert info.encryption is not None
    identity = unwrap_identity(storage.get(info.encryption.wrapped_identity_key), "s3cret")
    for name, data in segments.items():
        plain = decrypt_bytes(storage.get(f"wal_archive/{name}.zst.age"), [identity], name)
        assert zstandard.ZstdDecompressor().decompress(plain) == data
    wal_dir.add(SEG2, make_segment(SYSID_A, 99, SEG2))
    wal_dir.marker(SEG2).unlink()
    result = wal_dir.push(SEG2, *flags, env=env)
    assert result.returncode == ExitCode.WAL_CONFLICT, result.stderr


# --- the detached WAL pusher ---------------------------------------------------------------


def test_pusher_pushes_ready_files_ahead_and_later_calls_need_no_broker(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    pool = start_workers(target.env, count=2, queues="wal")
    names = [f"0000000100000000000000{i:02X}" for i in range(1, 7)]
    segments = {name: make_segment(SYSID_A, 60 + i, name) for i, name in enumerate(names)}
    for name, data in segments.items():
        wal_dir.add(name, data, ready=True)
    env = {"CLOUD_DUMP_BROKER_URL": pool.broker_url}
    result = wal_dir.push(names[0], "--look-ahead", "3", env=env)
    assert result.returncode == 0, result.stderr
    wal_dir.wait_for_pusher()
    storage = target.open()
    for name, data in segments.items():
        blob = storage.get(f"wal_archive/{name}.zst")
        assert zstandard.ZstdDecompressor().decompress(blob) == data
        assert wal_dir.marker(name).exists()
    assert not list((wal_dir.spool / "requests").iterdir())
    # PostgreSQL's own status files are left alone: it marks .done after each 0.
    assert len(list((wal_dir.pg_wal / "archive_status").glob("*.ready"))) == len(names)
    # The later calls answer from their markers: no broker needed, none contacted.
    dead = {"CLOUD_DUMP_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    for name in names[1:]:
        assert wal_dir.push(name, env=dead).returncode == 0


def test_pusher_failure_of_a_look_ahead_file_is_reported_by_its_own_call(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    other = WalDir(tmp_path / "other")
    other.add(SEG2, make_segment(SYSID_A, 70, SEG2))
    assert other.push(SEG2, env=target.env).returncode == 0  # SEG2 archived, other content
    pool = start_workers(target.env, count=1, queues="wal")
    env = {"CLOUD_DUMP_BROKER_URL": pool.broker_url}
    wal_dir.add(SEG1, make_segment(SYSID_A, 71, SEG1), ready=True)
    wal_dir.add(SEG2, make_segment(SYSID_A, 72, SEG2), ready=True)
    assert wal_dir.push(SEG1, env=env).returncode == 0
    wal_dir.wait_for_pusher()
    assert not wal_dir.marker(SEG2).exists()
    assert (wal_dir.spool / "errors" / SEG2).exists()  # kept for SEG2's own call
    stored_before = target.open().get(f"wal_archive/{SEG2}.zst")
    result = wal_dir.push(SEG2, env=env)
    assert result.returncode == ExitCode.WAL_CONFLICT, result.stderr
    assert "already archived with different content" in error_line(result.stderr)
    assert target.open().get(f"wal_archive/{SEG2}.zst") == stored_before
    wal_dir.wait_for_pusher()
    assert not (wal_dir.spool / "errors" / SEG2).exists()
    assert not (wal_dir.spool / "requests" / SEG2).exists()


def test_pusher_gets_its_settings_off_its_command_line(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    pool = start_workers(target.env, count=1, queues="wal")
    wal_dir.add(SEG1, make_segment(SYSID_A, 80, SEG1), ready=True)
    secret = "pusher-secret-passphrase"
    env = {"CLOUD_DUMP_BROKER_URL": pool.broker_url}
    result = wal_dir.push(SEG1, "--passphrase", secret, env=env)
    assert result.returncode == 0, result.stderr
    pid = helper_pid(wal_dir.spool / PUSHER_LOCK)  # idle, it lingers a moment before exiting
    assert pid is not None, "no pusher running right after the push"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"-m", b"coordinator.wal.push.helper"], cmdline
    assert secret.encode() not in b" ".join(cmdline)
    wal_dir.wait_for_pusher()
    assert secret not in wal_dir.pusher_log()
    assert target.open().get(f"wal_archive/{SEG1}.zst.age")


@dataclass
class StuckPush:
    """A wal-push of SEG1 whose one worker is inside its push, held there by the proxy."""

    proxy: TcpProxy
    pool: WorkerPool
    segment: bytes
    call: subprocess.Popen[str]

    def finish(self) -> str:
        """Wait for the call; its stderr (it must have succeeded)."""
        _, stderr = self.call.communicate(timeout=60)
        assert self.call.returncode == 0, stderr
        return stderr


@pytest.fixture
def stuck_push(
    wal_dir: WalDir,
    start_workers: Callable[..., WorkerPool],
    s3_store: StorageTarget,
    s3_proxy: TcpProxy,
) -> StuckPush:
    s3_proxy.hold()
    pool = start_workers(
        {**s3_store.env, "CLOUD_DUMP_S3_ENDPOINT": s3_proxy.endpoint}, count=1, queues="wal"
    )
    segment = make_segment(SYSID_A, 50, SEG1)
    wal_dir.add(SEG1, segment, ready=True)
    call = wal_dir.start_push(
        SEG1, env={"CLOUD_DUMP_BROKER_URL": pool.broker_url, "CLOUD_DUMP_WAL_RETRY_S": "3"}
    )
    wait_for_log([pool.processes[0].log_path], PUSH_RECEIVED, timeout_s=30)
    return StuckPush(s3_proxy, pool, segment, call)


def assert_archived(s3_store: StorageTarget, segment: bytes) -> None:
    blob = s3_store.open().get(f"wal_archive/{SEG1}.zst")
    assert zstandard.ZstdDecompressor().decompress(blob) == segment


def test_a_worker_killed_mid_push_does_not_lose_the_segment(
    wal_dir: WalDir,
    stuck_push: StuckPush,
    start_workers: Callable[..., WorkerPool],
    s3_store: StorageTarget,
) -> None:
    stuck_push.pool.processes[0].kill_group(signal.SIGKILL)
    start_workers(s3_store.env, count=1, queues="wal")
    stuck_push.finish()
    assert "sending it again" in wal_dir.pusher_log()
    assert_archived(s3_store, stuck_push.segment)


def test_a_pusher_killed_mid_push_is_replaced_and_nothing_is_lost(
    wal_dir: WalDir, stuck_push: StuckPush, s3_store: StorageTarget
) -> None:
    first = helper_pid(wal_dir.spool / PUSHER_LOCK)
    assert first is not None
    os.kill(first, signal.SIGKILL)  # with the push in flight, its answer still to come
    stuck_push.proxy.release()
    stuck_push.finish()
    assert wal_dir.marker(SEG1).exists()
    assert_archived(s3_store, stuck_push.segment)
    assert wal_dir.pusher_log().count("WAL pusher started") == 2  # the call started another


# --- a real archive_command --------------------------------------------------------------


def test_archive_command_through_two_workers(
    pg_factory: PgFactory,
    start_workers: Callable[..., WorkerPool],
    s3_store: StorageTarget,
) -> None:
    pool = start_workers(s3_store.env, count=2, queues="wal")
    home = make_postgres_dir("cloud-dump-walpush-")
    home.chmod(0o755)
    config = home / "cloud-dump.conf"
    config.write_text(
        f"CLOUD_DUMP_BROKER_URL={pool.broker_url}\n"
        f"CLOUD_DUMP_STORAGE={s3_store.url}\nCLOUD_DUMP_WAL_PUSH_TIMEOUT=60\n"
    )
    entry = pwd.getpwnam(OS_USER)
    os.chown(config, entry.pw_uid, entry.pw_gid)
    config.chmod(0o600)
    command = f"{postgres_cloud_dump()} wal-push %p %f --config {config}"
    try:
        cluster = pg_factory(15, archive_command=command)
        cluster.sql("CREATE TABLE t (x int)")
        for i in range(3):
            cluster.sql(f"INSERT INTO t SELECT generate_series(1, {1000 * (i + 1)})")
            cluster.sql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 60
        while (
            archived := cluster.sql(
                "SELECT archived_count, failed_count, last_failed_wal FROM pg_stat_archiver"
            )[0]
        )[0] < 3:
            assert time.monotonic() < deadline, f"archiving stalled: {archived}"
            time.sleep(0.2)
        storage = s3_store.open()
        keys = [k for k in stored(storage) if k.endswith(".zst")]
        assert len(keys) >= 3
        for key in keys:
            name = key.removeprefix("wal_archive/").removesuffix(".zst")
            local = cluster.datadir / "pg_wal" / name
            if local.exists():
                assert (
                    zstandard.ZstdDecompressor().decompress(storage.get(key)) == local.read_bytes()
                )
        info = json.loads(storage.get(f"wal_archive/{ARCHIVE_INFO_NAME}"))
        assert info["system_identifier"] == str(cluster.system_identifier())
    finally:
        shutil.rmtree(home, ignore_errors=True)
