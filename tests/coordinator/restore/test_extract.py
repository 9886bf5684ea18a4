"""Safe tar extraction and backup_manifest verification.

Hostile archives are built with ``tarfile``; checksums are checked against a real
``pg_basebackup`` manifest (the ``raw_backup`` fixture of this package's conftest.py).
"""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from coordinator.restore.extract import (
    FileFacts,
    extract_archive,
    load_backup_manifest,
    verify_against_manifest,
)
from coordinator.wait import wait_until
from storage.errors import IntegrityError
from tests.coordinator.restore.rawbackup import RawBackup


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> BinaryIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    out.seek(0)
    return out


def file_member(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def link_member(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([file_member("../x", b"evil")], "'..' component"),
        ([file_member("/etc/x", b"evil")], "absolute name"),
        ([file_member("a/../../x", b"evil")], "'..' component"),
        ([link_member("esc", "../outside", tarfile.SYMTYPE)], "leading outside"),
        ([link_member("esc", "/etc", tarfile.SYMTYPE)], "leading outside"),
        (
            [link_member("d", "sub", tarfile.SYMTYPE), file_member("d/x", b"via link")],
            "under a symbolic link",
        ),
        ([link_member("hl", "../outside", tarfile.LNKTYPE)], "'..' component"),
        ([link_member("hl", "/etc/passwd", tarfile.LNKTYPE)], "absolute name"),
        ([link_member("dev", "", tarfile.CHRTYPE)], "device file"),
        ([link_member("fifo", "", tarfile.FIFOTYPE)], "device file"),
        ([link_member("pg_tblspc/16385", "/elsewhere", tarfile.SYMTYPE)], "leading outside"),
    ],
    ids=[
        "dotdot", "absolute", "inner-dotdot", "symlink-up", "symlink-absolute",
        "write-through-symlink", "hardlink-up", "hardlink-absolute", "device", "fifo",
        "tblspc-link-outside-base",
    ],
)  # fmt: skip
def test_extract_rejects_unsafe_member_and_writes_nothing_outside(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], reason: str
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "outside").write_text("untouched")
    before = snapshot(tmp_path)
    with pytest.raises(IntegrityError, match=reason):
        extract_archive(tar_of(*members), target, tablespace_links=None)
    assert (tmp_path / "outside").read_text() == "untouched"
    assert {p for p in snapshot(tmp_path) - before if not p.startswith("target/")} == set()


def test_extract_writes_files_dirs_links_keeping_owner_and_group_read_modes(tmp_path: Path) -> None:
    ts = tmp_path / "ts"
    directory = tarfile.TarInfo("./base/")
    directory.type = tarfile.DIRTYPE
    directory.mode = 0o755
    stream = tar_of(
        (directory, None),
        file_member("./base/1", b"page", mode=0o664),
        file_member("global/pg_control", b"control"),
        link_member("base/2", "base/1", tarfile.LNKTYPE),
        link_member("base/rel", "1", tarfile.SYMTYPE),
        link_member("pg_tblspc/16385", "/old/location", tarfile.SYMTYPE),
    )
    target = tmp_path / "pgdata"
    target.mkdir()
    result = extract_archive(
        stream, target, tablespace_links={"16385": ts}, held_back={"global/pg_control"}
    )
    # Owner and group read bits kept, never group write nor world bits.
    assert (target / "base").stat().st_mode & 0o777 == 0o750
    assert (target / "base" / "1").stat().st_mode & 0o777 == 0o640
    assert (target / "base" / "2").read_bytes() == b"page"
    assert (target / "pg_tblspc" / "16385").readlink() == ts
    assert not (target / "global" / "pg_control").exists()
    assert result.held_back["global/pg_control"].read_bytes() == b"control"
    assert set(result.files) == {"base/1", "base/2", "global/pg_control"}
    assert result.files["base/1"] == FileFacts(4, "CRC32C", result.files["base/2"].checksum)
    assert result.bytes_written == len(b"page") + len(b"control")


def test_extract_truncated_tar_is_integrity_error(tmp_path: Path) -> None:
    data = tar_of(file_member("big", b"x" * 100_000)).read()[:50_000]
    with pytest.raises(IntegrityError, match=r"not a readable tar|truncated"):
        extract_archive(io.BytesIO(data), tmp_path, tablespace_links=None)


class Trickle(io.RawIOBase):
    """A decoder that returns fewer bytes than asked, as zstd's does at a frame's end."""

    def __init__(self, data: bytes, most: int) -> None:
        self._data = memoryview(data)
        self._most = most

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        take = self._most if size < 0 else min(size, self._most)
        chunk, self._data = bytes(self._data[:take]), self._data[take:]
        return chunk


@pytest.mark.parametrize("most", [1, 511, 513, 70_000])
def test_extract_reads_the_same_bytes_from_a_decoder_that_stops_short(
    tmp_path: Path, most: int
) -> None:
    # Sizes around the 512-byte blocks and the 512 KiB chunks: headers, data and padding all
    # come in pieces, and the member after a large one still starts where it should.
    big = bytes(range(256)) * 4099
    archive = tar_of(
        file_member("base/big", big), file_member("base/small", b"abc"), file_member("empty", b"")
    ).read()
    target = tmp_path / "t"
    target.mkdir()
    result = extract_archive(Trickle(archive, most), target, tablespace_links=None)  # type: ignore[arg-type]
    assert (target / "base" / "big").read_bytes() == big
    assert (target / "base" / "small").read_bytes() == b"abc"
    assert (target / "empty").read_bytes() == b""
    assert result.bytes_written == len(big) + 3


class FailsAfter(io.RawIOBase):
    """A decoder that finds damage after ``good`` bytes (raised on the read-ahead thread)."""

    def __init__(self, data: bytes, good: int) -> None:
        self._data = io.BytesIO(data[:good])

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._data.read(size)
        if not chunk:
            raise IntegrityError("archive 'x' is damaged: frame checksum mismatch")
        return chunk


def test_a_decoder_error_on_the_read_ahead_thread_is_raised_by_the_extraction(
    tmp_path: Path,
) -> None:
    archive = tar_of(file_member("base/big", b"y" * 3_000_000), file_member("b", b"z")).read()
    with pytest.raises(IntegrityError, match="frame checksum mismatch"):
        extract_archive(FailsAfter(archive, 2_000_000), tmp_path, tablespace_links=None)  # type: ignore[arg-type]
    assert wait_until(lambda: not _read_ahead_threads(), timeout_s=10, first_s=0.01)


def test_a_refused_member_stops_the_read_ahead_thread(tmp_path: Path) -> None:
    # Megabytes follow the refused member: the thread must not stay blocked with chunks to hand.
    archive = tar_of(
        file_member("../evil", b"x"), *(file_member(f"f{i}", b"x" * 1_000_000) for i in range(20))
    )
    with pytest.raises(IntegrityError, match=r"'\.\.' component"):
        extract_archive(archive, tmp_path, tablespace_links=None)
    assert wait_until(lambda: not _read_ahead_threads(), timeout_s=10, first_s=0.01)


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tar-read-ahead"]


def test_extract_refuses_a_sparse_member(tmp_path: Path) -> None:
    # PostgreSQL never writes one; restoring it would need holes, which restore does not make.
    info = tarfile.TarInfo("base/sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    out = io.BytesIO(info.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(IntegrityError, match="'base/sparse' is a sparse file"):
        extract_archive(out, tmp_path, tablespace_links=None)
    assert snapshot(tmp_path) == set()


def test_extract_member_cut_short_is_named_truncated(tmp_path: Path) -> None:
    # The header promises 100,000 bytes; the stream ends after 50,000 of them.
    archive = tar_of(file_member("base/big", b"x" * 100_000)).read()
    with pytest.raises(IntegrityError, match="member 'base/big' is truncated"):
        extract_archive(io.BytesIO(archive[: 512 + 50_000]), tmp_path, tablespace_links=None)


# --- backup_manifest ----------------------------------------------------------------------------


def extract_raw(raw: RawBackup, root: Path) -> dict[str, FileFacts]:
    observed: dict[str, FileFacts] = {}
    (root / "data").mkdir()
    (root / "ts").mkdir()
    with (raw.directory / "base.tar").open("rb") as f:
        links = {str(raw.tablespace_oid): root / "ts"}
        observed.update(extract_archive(f, root / "data", tablespace_links=links).files)
    with (raw.directory / f"{raw.tablespace_oid}.tar").open("rb") as f:
        prefix = f"pg_tblspc/{raw.tablespace_oid}/"
        result = extract_archive(f, root / "ts", tablespace_links=None, manifest_prefix=prefix)
        observed.update(result.files)
    return observed


def test_crc32c_matches_postgres_notation_on_a_real_backup(
    raw_backup: RawBackup,
    tmp_path: Path,
) -> None:
    observed = extract_raw(raw_backup, tmp_path)
    manifest = (raw_backup.directory / "backup_manifest").read_bytes()
    verify_against_manifest(manifest, observed)
    entries = {e.path: e for e in load_backup_manifest(manifest)}
    # WAL travels in base.tar but is not listed; tablespace files are, under pg_tblspc/<oid>/.
    assert any(p.startswith("pg_wal/0000") for p in observed if p not in entries)
    assert any(p.startswith(f"pg_tblspc/{raw_backup.tablespace_oid}/") for p in entries)
    assert observed["PG_VERSION"].checksum == entries["PG_VERSION"].checksum


@pytest.mark.parametrize("damage", ["flip", "missing", "extra", "size"])
def test_verify_against_manifest_names_the_bad_file(
    raw_backup: RawBackup,
    tmp_path: Path,
    damage: str,
) -> None:
    observed = extract_raw(raw_backup, tmp_path)
    facts = observed["global/1262"]
    if damage == "flip":
        flipped = f"{int(facts.checksum, 16) ^ 1:08x}"
        observed["global/1262"] = FileFacts(facts.size, facts.algorithm, flipped)
    elif damage == "missing":
        del observed["global/1262"]
    elif damage == "extra":
        observed["global/9999"] = facts
    else:
        observed["global/1262"] = FileFacts(facts.size + 1, facts.algorithm, facts.checksum)
    name = "global/9999" if damage == "extra" else "global/1262"
    manifest = (raw_backup.directory / "backup_manifest").read_bytes()
    with pytest.raises(IntegrityError, match=f"file '{name}'"):
        verify_against_manifest(manifest, observed)


def test_backup_manifest_with_broken_own_checksum_is_refused(
    raw_backup: RawBackup,
) -> None:
    manifest = (raw_backup.directory / "backup_manifest").read_bytes()
    with pytest.raises(IntegrityError, match="Manifest-Checksum"):
        load_backup_manifest(manifest.replace(b'"Size": 3,', b'"Size": 4,', 1))
