"""wal-push refuses, and stores nothing: other content under an archived name, a changed
``.history`` file, WAL of another cluster, names that are not WAL file names.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget, local_target
from devrig.services import error_line, run_cli
from devrig.walfiles import SEG1, SEG2, SYSID_A, SYSID_B, WalDir, make_segment
from tests.coordinator.wal.push.helpers import stored
from workers.wal import ARCHIVE_INFO_NAME


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
