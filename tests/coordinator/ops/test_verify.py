"""``cloud-dump verify`` against real backups and a real WAL archive: intact backups of every
compression and both encryption modes pass, plain and ``--deep`` (in threads and on Celery
workers); a deleted or damaged object, a segment a backup needs, a gap in the archived WAL and a
missing history file are each named, with exit 15; ``--deep`` also finds what only the contents
show: an archive damaged before its checksums were recorded, a part cut out with the records
made to match, a damaged WAL segment, a key that is missing."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.crypto import generate_identity
from devrig.postgres import PgCluster, PgFactory
from devrig.recovery import archive_store, archiving_cluster, wait_archived
from devrig.roundtrip import backup_cli
from devrig.services import RedisServer, WorkerPool, run_cli
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
    identity, recipient = generate_identity()
    (keys / "key.pub").write_text(recipient + "\n")
    (keys / "key.txt").write_text(identity + "\n")
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
    return Archived(cluster, root, keys)


class Archived:
    def __init__(self, cluster: PgCluster, root: Path, keys: Path) -> None:
        self.cluster = cluster
        self.root = root
        self.keys = keys

    def key_flags(self) -> list[str]:
        """Both keys: the identity of b-recipients, the passphrase of b-passphrase."""
        return ["--identity-key", str(self.keys / "key.txt"),
                "--passphrase-file", str(self.keys / "passphrase")]  # fmt: skip

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
    # A run over every backup records its outcome for `info`.
    recorded = json.loads((store / "cloud-dump-verify.json").read_text())
    assert (recorded["ok"], recorded["deep"], recorded["backups_checked"],
            recorded["problems"]) == (True, False, 6, 0)
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
    recorded = json.loads((store / "cloud-dump-verify.json").read_text())
    assert (recorded["ok"], recorded["problems"]) == (False, 1)


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
    assert not (store / "cloud-dump-verify.json").exists()  # one backup says nothing of all
    # The mismatch is known at the object's end: every byte of it was read back.
    code, out, _ = verify(store, "--name", "b-none", "--json")
    report = json.loads(out)["backups"][0]
    assert code == INTEGRITY and not report["ok"], out
    assert report["bytes_read"] == archived.manifest(store, "b-none").stored_size


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
    assert "backup 'b-gzip': manifest 'b-gzip/manifest.json' is not valid JSON (" in out
    assert "type=" not in out and "input_value" not in out  # pydantic's internals
    assert "'b-lz4/' holds" in out and "no manifest.json" in out


def test_nothing_to_verify_is_not_success(tmp_path: Path) -> None:
    """A mistyped location or --cluster must not look like a healthy store."""
    code, _, err = verify(tmp_path)
    assert code == int(ExitCode.BACKUP_NOT_FOUND) and "nothing to verify" in err, err


# --- --deep ------------------------------------------------------------------------------------


def rewrite(store: Path, name: str, index: int, data: bytes) -> str:
    """Replace archive ``index`` of backup ``name`` with ``data`` and make manifest.json agree
    (size, SHA-256, parts): damage done before the checksums were recorded, which only reading
    the contents can find. The archive's key."""
    path = store / name / "manifest.json"
    doc = json.loads(path.read_text())
    record = doc["archives"][index]
    (store / record["key"]).write_bytes(data)
    record["stored_size"] = len(data)
    record["sha256"] = hashlib.sha256(data).hexdigest()
    part = 5 * 1024 * 1024
    record["parts"] = [
        {"number": i + 1, "size": len(data[o:o + part]),
         "sha256": hashlib.sha256(data[o:o + part]).hexdigest()}
        for i, o in enumerate(range(0, len(data), part))
    ]  # fmt: skip
    path.write_text(json.dumps(doc))
    return str(record["key"])


def base_archive(store: Path, archived: Archived, name: str) -> tuple[int, bytes]:
    manifest = archived.manifest(store, name)
    index = next(i for i, a in enumerate(manifest.archives) if a.tablespace_oid is None)
    return index, (store / manifest.archives[index].key).read_bytes()


def test_deep_passes_intact_backups_of_every_kind(archived: Archived, tmp_path: Path) -> None:
    store = archived.copy(tmp_path)
    code, out, err = verify(store, "--deep", "--json", *archived.key_flags())
    assert code == 0, out + err
    report = json.loads(out)
    assert report["ok"] is True and len(report["backups"]) == 6
    for backup in report["backups"]:
        assert backup["ok"] and backup["files_checked"] > 900, backup  # a whole PGDATA each
        assert backup["file_bytes_checked"] > 20 * 1024 * 1024
    assert report["wal"]["ok"] and report["wal"]["segments_read"] >= 6, report["wal"]
    code, out, err = verify(store, "--deep", "--parallel", "2", *archived.key_flags())
    assert code == 0 and "files (" in out and "checked against backup_manifest" in out, out + err


def test_deep_without_the_key_fails_naming_what_to_give(archived: Archived, tmp_path: Path) -> None:
    store = archived.copy(tmp_path)
    code, out, err = verify(store, "--deep", "--name", "b-recipients")
    assert code == INTEGRITY, out + err
    assert "cannot decrypt it" in out and "--identity-key" in out, out
    code, out, _ = verify(store, "--name", "b-recipients")  # the plain check needs no key
    assert code == 0, out


def test_deep_finds_a_file_damaged_before_its_checksums_were_recorded(
    archived: Archived, tmp_path: Path
) -> None:
    store = archived.copy(tmp_path)
    index, data = base_archive(store, archived, "b-none")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next(m for m in tar if m.isfile() and m.name.startswith("base/")
                      and m.size > 8192)  # fmt: skip
    damaged = bytearray(data)
    damaged[member.offset_data + 100] ^= 0x01
    key = rewrite(store, "b-none", index, bytes(damaged))
    code, out, _ = verify(store, "--name", "b-none")
    assert code == 0, out  # the stored bytes match their records: only the contents tell
    code, out, err = verify(store, "--deep", "--name", "b-none")
    assert code == INTEGRITY, out + err
    assert (f"backup 'b-none': archive '{key}': file '{member.name.removeprefix('./')}' does "
            "not match its CRC32C checksum in backup_manifest") in out, out


def test_deep_finds_a_part_cut_out_with_the_records_made_to_match(
    archived: Archived, tmp_path: Path
) -> None:
    store = archived.copy(tmp_path)
    index, data = base_archive(store, archived, "b-none")
    part = 5 * 1024 * 1024
    assert len(data) > 3 * part
    rewrite(store, "b-none", index, data[:part] + data[2 * part:])
    assert verify(store, "--name", "b-none")[0] == 0
    code, out, err = verify(store, "--deep", "--name", "b-none")
    assert code == INTEGRITY, out + err
    assert "backup 'b-none': OK" not in out and "backup 'b-none': archive '" in out, out
    assert err.startswith("cloud-dump: error: verify found"), err


def test_deep_names_a_byte_changed_in_an_encrypted_archive_as_damage(
    archived: Archived, tmp_path: Path
) -> None:
    """age's verdict on a changed ciphertext is damage (exit 15, named), not a key problem nor
    a crash of the check; the bytes read up to it are counted (here the whole archive: one
    range)."""
    store = archived.copy(tmp_path)
    manifest = archived.manifest(store, "b-recipients")
    index, data = base_archive(store, archived, "b-recipients")
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x01
    (store / manifest.archives[index].key).write_bytes(bytes(damaged))
    code, out, err = verify(store, "--deep", "--json", "--name", "b-recipients",
                            *archived.key_flags())
    assert code == INTEGRITY, out + err
    report = json.loads(out)["backups"][0]
    key = manifest.archives[index].key
    assert (f"archive '{key}' is damaged: a chunk of its age payload fails authentication"
            in report["problems"][0]), report
    assert report["bytes_read"] >= len(data) // 2, report


def test_deep_finds_a_damaged_wal_segment(archived: Archived, tmp_path: Path) -> None:
    store = archived.copy(tmp_path)
    needed = archived.manifest(store, "b-passphrase").end_wal_file
    path = next(p for p in wal_objects(store, needed) if ".backup" not in p.name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify(store)[0] == 0  # names only
    code, out, err = verify(store, "--deep", *archived.key_flags())
    assert code == INTEGRITY, out + err
    assert f"archived WAL 'wal_archive/{path.name}'" in out, out


def test_deep_runs_on_celery_workers_with_the_workers_keys(
    archived: Archived, tmp_path: Path, start_workers: Callable[..., WorkerPool],
    redis_server: RedisServer,
) -> None:
    """The workers decrypt with their own passphrase; one without the identity of a recipient
    backup names itself and fails the check of that backup."""
    store = archived.copy(tmp_path)
    start_workers({"CLOUD_DUMP_STORAGE": f"file://{store}",
                   "CLOUD_DUMP_PASSPHRASE_FILE": str(archived.keys / "passphrase")},
                  count=2, queues="parts")  # fmt: skip
    broker = ["--broker", redis_server.url]
    code, out, err = verify(store, "--deep", "--name", "b-passphrase", *broker)
    assert code == 0 and "checked against backup_manifest" in out, out + err
    code, out, err = verify(store, "--deep", "--name", "b-recipients", *broker)
    assert code == INTEGRITY, out + err
    assert "worker 'w" in out and "cannot decrypt it" in out, out
    assert "CLOUD_DUMP_IDENTITY_KEY" in out, out
