"""A ``manifest.json`` that does not parse: named in one readable line (its key and what is
wrong, never pydantic's internals or the bytes), and warned about once per command however many
times the command lists the backups."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from coordinator.catalog import find_backups
from devrig.moto import StorageTarget
from devrig.services import run_cli
from storage.base import Storage
from storage.errors import PermanentStorageError
from storage.layout import Layout
from storage.manifest import BackupManifest

ARCHIVE = {
    "name": "base", "key": "b1/base.tar.zst", "compression": "zstd", "compressed_by": "server",
    "encrypted": False, "stored_size": 10, "sha256": "00",
    "parts": [{"number": 1, "size": 10, "sha256": "00"}],
}  # fmt: skip
VALID = {
    "name": "b1", "tool_version": "t", "pg_version": "15.18", "pg_version_num": 150018,
    "system_identifier": "7300000000000000001", "timeline": 1, "start_lsn": "0/2000028",
    "end_lsn": "0/2000100", "start_wal_file": "000000010000000000000002",
    "end_wal_file": "000000010000000000000002", "start_time": "2026-11-30T20:50:40+00:00",
    "end_time": "2026-11-30T20:50:41+00:00", "compression": "zstd", "archives": [ARCHIVE],
    "backup_manifest_key": "b1/backup_manifest", "backup_manifest_size": 5,
    "backup_manifest_sha256": "00",
}  # fmt: skip


def _with(**changes: object) -> bytes:
    return json.dumps({**VALID, **changes}).encode()


@pytest.mark.parametrize(
    ("stored", "said"),
    [
        (b'{"broken\n', "is not valid JSON (control character"),
        (b"", "is not valid JSON (EOF while parsing a value at line 1 column 0)"),
        (b"[]", "is not a JSON object"),
        (_with(format_version=4),
         "has a format_version this cloud-dump does not read (it reads 1, 2 and 3)"),
        (_with(end_time="yesterday"), "field 'end_time': input should be a valid datetime"),
        (_with(archives=[{**ARCHIVE, "parts": [{"number": 0, "size": 1, "sha256": ""}]}]),
         "field 'archives[0].parts[0].number': input should be greater than or equal to 1"),
        (json.dumps({"name": "b1"}).encode(), "field 'tool_version': field required (and 15 more)"),
    ],
    ids=["cut-string", "empty", "array", "format-3", "bad-time", "nested-field", "missing"],
)
def test_an_unparseable_manifest_is_named_in_one_readable_line(stored: bytes, said: str) -> None:
    assert BackupManifest.from_json(_with(), "b1/manifest.json").name == "b1"
    with pytest.raises(PermanentStorageError) as caught:
        BackupManifest.from_json(stored, "b1/manifest.json")
    message = str(caught.value)
    assert message.startswith("manifest 'b1/manifest.json' ") and said in message, message
    assert "\n" not in message and "type=" not in message and "input_value" not in message


def test_find_backups_warns_once_per_stored_version_of_a_damaged_manifest(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    storage.put("bad/manifest.json", b'{"broken\n')
    caplog.set_level(logging.WARNING, logger="coordinator.catalog")
    for _ in range(3):
        assert find_backups(storage, Layout()) == []
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned
    assert warned[0].startswith("skipping backup 'bad': manifest 'bad/manifest.json' is not "
                                "valid JSON (")
    storage.delete("bad/manifest.json")
    storage.put("bad/manifest.json", b"[1, 2]")  # damaged anew: said again
    assert find_backups(storage, Layout()) == []
    assert len(caplog.records) == 2 and "is not a JSON object" in caplog.records[1].getMessage()


@pytest.mark.parametrize("command",
                         [["info"], ["list"], ["restore", "--recovery-target", "latest"]])
def test_each_command_warns_once_about_a_damaged_manifest(
    storage_target: StorageTarget, storage: Storage, tmp_path: Path, command: list[str]
) -> None:
    if storage_target.kind == "s3" and command[0] != "info":
        pytest.skip("the warning comes from the same listing on either store")
    storage.put("bad/manifest.json", b'{"broken\n')
    if command[0] == "restore":
        command = [*command, "--pgdata", str(tmp_path / "pgdata")]
    done = run_cli(*command, env=storage_target.env)
    warnings = [ln for ln in done.stderr.splitlines() if "warning:" in ln]
    assert warnings == ["cloud-dump: warning: skipping backup 'bad': manifest "
                        "'bad/manifest.json' is not valid JSON (control character "
                        "(\\u0000-\\u001F) found while parsing a string at line 2 column 0)"]
