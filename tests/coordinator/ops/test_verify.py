"""``cloud-dump verify`` against real backups and a real WAL archive: intact backups of every
compression and both encryption modes pass; a deleted or damaged object, a segment a backup
needs, a gap in the archived WAL and a missing history file are each named, with exit 15."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.crypto import generate_identity
from devrig.postgres import PgCluster, PgFactory
from devrig.recovery import archive_store, archiving_cluster, wait_archived
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from storage.manifest import BackupManifest
from storage.walnames import Segment

INTEGRITY = int(ExitCode.INTEGRITY)


@pytest.fixture(scope="module")
def archived(pg_factory: PgFactory, tmp_path_factory: pytest.TempPathFactory) -> Archived:
    """One archiving cluster with a backup of every compression and both encryption modes,
    WAL archived after the last; each test works on its own copy of the store."""
    target = archive_store()
    cluster = archiving_cluster(pg_factory, 15, target)
    cluster.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
    keys = tmp_path_factory.mktemp("keys")
    _, recipient = generate_identity()
    (keys / "key.pub").write_text(recipient + "\n")
    (keys / "passphrase").write_text("verify-test-passphrase\n")
    variants = {
        "b-zstd": ["--compression", "zstd"],
        "b-gzip": ["--compression", "gzip"],
        "b-lz4": ["--compression", "lz4"],
        "b-none": ["--compression", "none"],
        "b-recipients": ["--recipient-key", str(keys / "key.pub")],
        "b-passphrase": ["--passphrase-file", str(keys / "passphrase")],
    }
    for name, flags in variants.items():
        backup_cli(cluster, target, name, *flags)
        cluster.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
    for _ in range(3):  # segments after the last backup, for a gap to fall between
        cluster.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
        cluster.sql("SELECT pg_switch_wal()")
    wait_archived(cluster)
    root = Path(target.url.removeprefix("file://"))
    return Archived(cluster, root)


class Archived:
    def __init__(self, cluster: PgCluster, root: Path) -> None:
        self.cluster = cluster
        self.root = root

    def copy(self, tmp_path: Path) -> Path:
        """A copy of the store to damage."""
        store = tmp_path / "store"
        shutil.copytree(self.root, store, symlinks=True)
        return store

    def manifest(self, store: Path, name: str) -> BackupManifest:
        path = store / name / "manifest.json"
        return BackupManifest.from_json(path.read_bytes(), str(path))


def verify(store: Path, *flags: str) -> tuple[int, str, str]:
    done = run_cli("verify", *flags, env={"CLOUD_DUMP_STORAGE": f"file://{store}"})
    return done.returncode, done.stdout, done.stderr


def wal_objects(store: Path, name: str) -> list[Path]:
    return sorted((store / "wal_archive").glob(f"{name}*"))


def test_intact_backups_of_every_kind_pass(archived: Archived, tmp_path: Path) -> None:
    store = archived.copy(tmp_path)
    code, out, err = verify(store)
    assert code == 0, out + err
    for name in ("b-zstd", "b-gzip", "b-lz4", "b-none", "b-recipients", "b-passphrase"):
        assert f"backup '{name}': OK" in out
    assert any(
        line.startswith("WAL archive '") and line.endswith(": OK") for line in out.splitlines()
    )
    code, out, _ = verify(store, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and len(report["backups"]) == 6
    assert all(b["bytes_read"] > 0 for b in report["backups"])


def test_a_deleted_archive_is_named(archived: Archived, tmp_path: Path) -> None:
    store = archived.copy(tmp_path)
    key = archived.manifest(store, "b-gzip").archives[0].key
    (store / key).unlink()
    code, out, err = verify(store)
    assert code == INTEGRITY, out + err
    assert f"object '{key}' is missing" in out
    assert "backup 'b-zstd': OK" in out  # the others still check out
    assert err.count("\n") == 1 and "verify found 1 problem" in err


def test_a_flipped_byte_is_found_by_reading_the_object_back(
    archived: Archived, tmp_path: Path
) -> None:
    store = archived.copy(tmp_path)
    key = archived.manifest(store, "b-none").archives[0].key
    path = store / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the SHA-256 can tell
    path.write_bytes(bytes(data))
    code, out, err = verify(store, "--name", "b-none")
    assert code == INTEGRITY, out + err
    assert key in out and "sha256" in out
    assert "b-zstd" not in out  # --name: that backup only


def test_a_segment_a_backup_needs_is_named(archived: Archived, tmp_path: Path) -> None:
    store = archived.copy(tmp_path)
    needed = archived.manifest(store, "b-lz4").start_wal_file
    for path in wal_objects(store, needed):
        if ".backup" not in path.name:  # the segment, not the backup history file
            path.unlink()
    code, out, err = verify(store)
    assert code == INTEGRITY, out + err
    assert f"backup 'b-lz4' cannot become consistent: WAL segment {needed} missing" in out


def test_a_gap_in_the_archive_names_its_first_and_last_segment(
    archived: Archived, tmp_path: Path
) -> None:
    store = archived.copy(tmp_path)
    last = archived.manifest(store, "b-passphrase").end_wal_file
    after = [Segment.parse(last).next().name(), Segment.parse(last).next().next().name()]
    newest = max(p.name[:24] for p in (store / "wal_archive").iterdir() if p.name[:1] == "0")
    assert newest > after[1], "the fixture archives WAL past the last backup"
    for name in after:
        for path in wal_objects(store, name):
            path.unlink()
    code, out, _ = verify(store)
    assert code == INTEGRITY, out
    assert f"WAL gap on timeline 1: segments {after[0]} .. {after[1]} (2 segments) missing" in out


def test_a_timeline_without_its_history_file_is_named(archived: Archived, tmp_path: Path) -> None:
    """A timeline-2 segment with no 00000002.history (fabricated by copying a stored segment
    under timeline 2's name: verify reads names, not contents)."""
    store = archived.copy(tmp_path)
    wal = store / "wal_archive"
    source = sorted(p for p in wal.iterdir() if p.name.startswith("00000001") and
                    len(p.name.split(".")[0]) == 24)[-1]  # fmt: skip
    shutil.copy(source, wal / ("00000002" + source.name[8:]))
    code, out, _ = verify(store)
    assert code == INTEGRITY, out
    assert "timeline 2 has WAL but no history file '00000002.history'" in out


def test_an_unknown_backup_name_is_not_found(archived: Archived, tmp_path: Path) -> None:
    code, _, err = verify(archived.root, "--name", "nope")
    assert code == int(ExitCode.BACKUP_NOT_FOUND) and "'nope' not found" in err


def test_name_and_all_are_exclusive(archived: Archived) -> None:
    code, _, err = verify(archived.root, "--name", "b-zstd", "--all")
    assert code == int(ExitCode.USAGE) and err.count("\n") == 1, err


def test_an_archive_missing_its_last_part_is_named_by_its_size(
    archived: Archived, tmp_path: Path
) -> None:
    store = archived.copy(tmp_path)
    archive = archived.manifest(store, "b-none").archives[0]
    assert len(archive.parts) > 1, "5 MiB parts: the uncompressed archive has several"
    path = store / archive.key
    with path.open("r+b") as f:
        f.truncate(archive.stored_size - archive.parts[-1].size)
    code, out, _ = verify(store)
    assert code == INTEGRITY, out
    assert (f"object '{archive.key}' is {archive.stored_size - archive.parts[-1].size} bytes, "
            f"manifest.json records {archive.stored_size}") in out  # fmt: skip


def test_an_unreadable_manifest_and_a_prefix_without_one_are_named(
    archived: Archived, tmp_path: Path
) -> None:
    """list and restore skip a manifest.json that does not parse: verify must not."""
    store = archived.copy(tmp_path)
    (store / "b-gzip" / "manifest.json").write_text("{garbage")
    (store / "b-lz4" / "manifest.json").unlink()
    code, out, _ = verify(store)
    assert code == INTEGRITY, out
    assert "backup 'b-gzip': manifest 'b-gzip/manifest.json' is not a valid" in out
    assert "'b-lz4/' holds" in out and "no manifest.json" in out


def test_nothing_to_verify_is_not_success(tmp_path: Path) -> None:
    """A mistyped location or --cluster must not look like a healthy store."""
    code, _, err = verify(tmp_path)
    assert code == int(ExitCode.BACKUP_NOT_FOUND) and "nothing to verify" in err, err
