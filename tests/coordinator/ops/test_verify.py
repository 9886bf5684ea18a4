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
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.recovery import archive_store, archiving_cluster, wait_archived
from devrig.restored import started
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


def test_the_archive_copy_of_a_backups_last_segment_is_needed_not_the_wal_it_carries(
    archived: Archived, tmp_path: Path
) -> None:
    # The backup restores to its end with the WAL inside it; replaying past its end needs the
    # archive's copy of its last segment (the backup's holds that one only up to its end).
    store = archived.copy(tmp_path)
    last = archived.manifest(store, "b-lz4").end_wal_file
    for path in wal_objects(store, last):
        if ".backup" not in path.name:  # the segment, not the backup history file
            path.unlink()
    code, out, err = verify(store)
    assert code == INTEGRITY, out + err
    assert f"WAL gap on timeline 1: segment {last} missing" in out
    assert "cannot become consistent" not in out


def test_the_oldest_backups_own_last_segment_missing_is_a_note(
    archived: Archived, tmp_path: Path
) -> None:
    """Archiving began after the oldest backup ended: that backup replays past its end with
    its own whole copy (wal-fetch lets PostgreSQL read it from pg_wal), and no other backup
    needs the segment; the same segment of a later backup is a gap (test above)."""
    store = archived.copy(tmp_path)
    last = archived.manifest(store, "b-zstd").end_wal_file
    for path in wal_objects(store, last):
        if ".backup" not in path.name:
            path.unlink()
    code, out, err = verify(store)
    assert code == 0, out + err
    assert f"{last} is not archived: backup 'b-zstd', the oldest, carries it" in out
    # info agrees: every backup is in the window, and there is no gap to alert on.
    done = run_cli("info", "--json", env={"CLOUD_DUMP_STORAGE": f"file://{store}"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert all(b["in_window"] for b in report["backups"]), done.stdout
    assert report["wal"]["gaps"] == [], done.stdout


def test_backups_in_a_store_without_archived_wal_verify_with_a_note(
    archived: Archived, tmp_path: Path
) -> None:
    """Backups taken without archive_command: each restores to its own end, so verify passes
    and says what is not possible (it used to fail every backup, naming a 'timeline 0')."""
    store = archived.copy(tmp_path)
    shutil.rmtree(store / "wal_archive")
    code, out, err = verify(store)
    assert code == 0, out + err
    assert "no WAL is archived at" in out and "restores to its own end" in out
    assert "timeline 0" not in out and "problem" not in out


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
        manifest = archived.manifest(store, backup["name"])
        if not manifest.encrypted:  # the count is backup_manifest's, as restore reports it
            listed = json.loads((store / manifest.backup_manifest_key).read_bytes())["Files"]
            assert backup["files_checked"] == len(listed), backup
            assert backup["file_bytes_checked"] == sum(f["Size"] for f in listed), backup
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


# --- the passphrase-wrapped key (backup_key.age) -----------------------------------------------


def restore(store: Path, name: str, *flags: str) -> tuple[int, Path, str]:
    """``restore --name name`` from ``store`` into a fresh PGDATA: exit code, PGDATA, stderr."""
    pgdata = make_postgres_dir("cloud-dump-restore-") / "data"
    done = run_cli("restore", "--name", name, "--pgdata", str(pgdata), *flags,
                   env={"CLOUD_DUMP_STORAGE": f"file://{store}"})  # fmt: skip
    return done.returncode, pgdata, done.stderr


def passphrase_flags(archived: Archived) -> list[str]:
    return ["--passphrase-file", str(archived.keys / "passphrase")]


def wrapped_key_recorded_in_v1_form(store: Path, name: str) -> None:
    """Make ``name``'s manifest.json what cloud-dump wrote before it recorded the wrapped
    key's size and SHA-256: format version 1, no such fields."""
    path = store / name / "manifest.json"
    doc = json.loads(path.read_text())
    del doc["encryption"]["wrapped_identity_size"], doc["encryption"]["wrapped_identity_sha256"]
    doc["format_version"] = 1
    path.write_text(json.dumps(doc))


def test_a_passphrase_backup_records_its_wrapped_key_in_format_2_the_others_stay_1(
    archived: Archived,
) -> None:
    """Version 1 readers refuse unknown fields: only a manifest that records the wrapped key
    says version 2, and no other manifest carries the fields, not even as null."""
    store = archived.root
    raw = json.loads((store / "b-passphrase" / "manifest.json").read_text())
    stored = (store / "b-passphrase" / "backup_key.age").read_bytes()
    assert raw["format_version"] == 2
    assert (raw["encryption"]["wrapped_identity_size"],
            raw["encryption"]["wrapped_identity_sha256"]) == (
        len(stored), hashlib.sha256(stored).hexdigest())  # fmt: skip
    for name in ("b-recipients", "b-zstd"):
        text = (store / name / "manifest.json").read_text()
        assert json.loads(text)["format_version"] == 1 and "wrapped_identity_s" not in text


@pytest.mark.parametrize("where", ["middle", "near-end", "cut"])
def test_a_damaged_wrapped_key_is_named_by_verify_restore_and_deep_not_blamed_on_the_passphrase(
    archived: Archived, tmp_path: Path, where: str
) -> None:
    store = archived.copy(tmp_path)
    key = "b-passphrase/backup_key.age"
    path = store / key
    data = bytearray(path.read_bytes())
    if where == "cut":
        del data[-10:]
    else:
        data[len(data) // 2 if where == "middle" else len(data) - 3] ^= 0x01
    path.write_bytes(bytes(data))
    said = (f"object '{key}' is {len(data)} bytes, manifest.json records {len(data) + 10}"
            if where == "cut" else f"object '{key}' does not match its recorded sha256")

    code, out, err = verify(store)
    assert code == INTEGRITY, out + err
    assert f"backup 'b-passphrase': {said}" in out and "backup 'b-zstd': OK" in out, out
    assert err.count("\n") == 1 and said in err, err

    code, pgdata, err = restore(store, "b-passphrase", *passphrase_flags(archived))
    assert code == INTEGRITY, err
    assert err.count("\n") == 1 and said in err and "wrong passphrase" not in err, err
    assert not pgdata.exists()

    # The archives' checks read the key too: they name the same damage (said once), not a
    # passphrase that fails to open it.
    code, out, err = verify(store, "--deep", "--name", "b-passphrase", *archived.key_flags())
    assert code == INTEGRITY, out + err
    assert "backup 'b-passphrase': 1 problem(s)" in out and said in out, out


def test_a_manifest_from_before_the_wrapped_key_was_recorded_verifies_and_restores(
    archived: Archived, tmp_path: Path
) -> None:
    """Of such a key verify checks that it is there, and says that its bytes are unchecked (a
    note, not a problem); restore unwraps it as before."""
    store = archived.copy(tmp_path)
    wrapped_key_recorded_in_v1_form(store, "b-passphrase")
    unchecked = ("its passphrase-wrapped key 'b-passphrase/backup_key.age' is not checked: "
                 "manifest.json (written by an older cloud-dump) records no size or sha256")
    code, out, err = verify(store)
    assert code == 0, out + err
    assert "backup 'b-passphrase': OK (3 objects" in out, out
    assert f"  note: backup 'b-passphrase': {unchecked}" in out, out
    code, out, _ = verify(store, "--json", "--name", "b-passphrase")
    report = json.loads(out)["backups"][0]
    assert code == 0 and report["ok"] and report["problems"] == [], report
    assert [unchecked in n for n in report["notes"]] == [True], report
    code, out, err = verify(store, "--deep", "--name", "b-passphrase", *archived.key_flags())
    assert code == 0, out + err

    code, pgdata, err = restore(store, "b-passphrase", *passphrase_flags(archived))
    assert code == 0, err
    with started(archived.cluster.major, pgdata) as restored:
        assert restored.sql("SELECT count(*) FROM t") == [(25000,)]

    (store / "b-passphrase" / "backup_key.age").unlink()
    code, out, _ = verify(store, "--name", "b-passphrase")
    assert code == INTEGRITY, out
    assert "passphrase-wrapped key 'b-passphrase/backup_key.age' is missing" in out, out


def test_a_damaged_unrecorded_wrapped_key_may_still_be_damage_says_restore(
    archived: Archived, tmp_path: Path
) -> None:
    """Without a recorded checksum restore cannot tell damage from a wrong passphrase: exit 14,
    as before, saying that it may be either."""
    store = archived.copy(tmp_path)
    wrapped_key_recorded_in_v1_form(store, "b-passphrase")
    path = store / "b-passphrase" / "backup_key.age"
    data = bytearray(path.read_bytes())
    data[30] ^= 0x01  # in the scrypt stanza: age reports a passphrase that does not open it
    path.write_bytes(bytes(data))
    code, _, err = restore(store, "b-passphrase", *passphrase_flags(archived))
    assert code == int(ExitCode.DECRYPTION_FAILED), err
    assert err.count("\n") == 1 and "wrong passphrase" in err, err
    assert "or the key is damaged: this backup's manifest.json" in err, err


# --- a truncated encrypted archive -------------------------------------------------------------


@pytest.mark.parametrize("kept", [100, 20_000])
def test_a_truncated_encrypted_archive_is_named_in_one_clean_line(
    archived: Archived, tmp_path: Path, kept: int
) -> None:
    """Cut inside age's header (100 bytes) or its payload: restore says the object is short,
    once, without age's or Python's wording around it; verify (--deep too) names it by its
    size before reading it."""
    store = archived.copy(tmp_path)
    manifest = archived.manifest(store, "b-recipients")
    index, data = base_archive(store, archived, "b-recipients")
    key = manifest.archives[index].key
    (store / key).write_bytes(data[:kept])
    said = (f"object '{key}' is shorter than the backup manifest says: it ends after {kept} "
            f"of {len(data)} bytes")
    identity = ["--identity-key", str(archived.keys / "key.txt")]

    code, pgdata, err = restore(store, "b-recipients", *identity)
    assert code == INTEGRITY, err
    assert err == f"cloud-dump: error: {said}\n", err
    assert "Error" not in err and "does not check" not in err, err
    assert not pgdata.exists()  # what the failed restore wrote is removed
    code, out, err = verify(store, "--deep", "--name", "b-recipients", *identity)
    assert code == INTEGRITY, out + err
    assert (f"backup 'b-recipients': object '{key}' is {kept} bytes, manifest.json records "
            f"{len(data)}") in out, out  # fmt: skip
