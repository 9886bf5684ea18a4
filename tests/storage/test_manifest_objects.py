"""``manifest.json`` for an archive stored as several objects (format version 3), and the
unchanged form of every other archive, which older versions keep reading."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from storage.layout import Layout
from storage.manifest import (
    READ_VERSIONS,
    ArchiveRecord,
    BackupManifest,
    PartRecord,
    StoredObject,
    version_for,
)

KEY = "b1/base.tar.zst"


def archive(objects: list[StoredObject]) -> ArchiveRecord:
    return ArchiveRecord(
        name="base", key=KEY, compression="zstd", compressed_by="server", encrypted=False,
        stored_size=30, sha256="ab" * 32,
        parts=[PartRecord(number=n, size=10, sha256="cd" * 32) for n in (1, 2, 3)],
        objects=objects,
    )  # fmt: skip


def manifest(archives: list[ArchiveRecord]) -> BackupManifest:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    return BackupManifest(
        format_version=version_for(None, archives), name="b1", tool_version="t",
        pg_version="15.4", pg_version_num=150004, system_identifier="1", timeline=1,
        start_lsn="0/2000028", end_lsn="0/2000100", start_wal_file="0" * 23 + "2",
        end_wal_file="0" * 23 + "2", start_time=now, end_time=now, compression="zstd",
        archives=archives, backup_manifest_key="b1/backup_manifest", backup_manifest_size=1,
        backup_manifest_sha256="ef" * 32,
    )  # fmt: skip


def test_one_object_is_written_as_versions_1_and_2_read_it() -> None:
    one = manifest([archive([])])
    raw = json.loads(one.to_json())
    assert raw["format_version"] == 1
    assert "objects" not in raw["archives"][0]
    (stored,) = one.archives[0].stored_objects
    assert (stored.key, stored.size, stored.sha256, stored.parts) == (KEY, 30, "ab" * 32, 3)
    assert one.archives[0].largest_part == 10


def test_several_objects_are_version_3_and_read_back() -> None:
    objects = [
        StoredObject(key=Layout.archive_object_key(KEY, 0), size=20, sha256="01" * 32, parts=2),
        StoredObject(key=Layout.archive_object_key(KEY, 1), size=10, sha256="02" * 32, parts=1),
    ]
    split = manifest([archive(objects)])
    data = split.to_json()
    assert json.loads(data)["format_version"] == 3 == max(READ_VERSIONS)
    back = BackupManifest.from_json(data, "b1/manifest.json")
    assert back == split
    assert [o.key for o in back.archives[0].stored_objects] == [KEY, KEY + ".0002"]


def test_object_keys_count_from_the_second() -> None:
    assert Layout.archive_object_key(KEY, 0) == KEY
    assert Layout.archive_object_key(KEY, 1) == KEY + ".0002"
    assert Layout.archive_object_key(KEY, 10_000) == KEY + ".10001"
    with pytest.raises(ValueError, match="invalid object index"):
        Layout.archive_object_key(KEY, -1)
    later = [Layout.archive_object_key(KEY, i) for i in (1, 2, 10_000)]
    assert [Layout.is_later_object(k) for k in [KEY, *later]] == [False, True, True, True]
    assert not Layout.is_later_object("b1/backup_manifest.age")
    assert not Layout.is_later_object("b1/16384.tar.age")

