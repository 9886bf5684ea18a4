"""Helpers for the replication tests: a sink that writes each archive to a file, a cluster with
a tablespace and data in two databases, and archive readers that use the standard CLI tools."""

from __future__ import annotations

import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from coordinator.backup.replication import ArchiveInfo
from devrig.postgres import PgCluster, make_postgres_dir

SUFFIXES = {"none": "", "zstd": ".zst", "gzip": ".gz", "lz4": ".lz4"}
DECOMPRESS = {"zstd": ["zstd", "-dc"], "gzip": ["gzip", "-dc"], "lz4": ["lz4", "-dc"]}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
LZ4_MAGIC = b"\x04\x22\x4d\x18"
SECOND_DATABASE = "app2"


# Python 3.11.4+ (and Debian's 3.11.2 lacks it): the "data" filter refuses unsafe members.
SAFE_EXTRACT: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


@dataclass
class FileSink:
    """Writes each archive to ``<directory>/<name>.tar[.zst|.gz|.lz4]`` and records the events."""

    directory: Path
    archives: list[ArchiveInfo] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    progress_calls: list[tuple[int, int | None]] = field(default_factory=list)
    manifest_bytes: bytes | None = None
    _file: BinaryIO | None = None

    def begin_archive(self, archive: ArchiveInfo) -> None:
        path = self.directory / f"{archive.name}.tar{SUFFIXES[archive.compression]}"
        self.archives.append(archive)
        self.paths[archive.name] = path
        self.events.append(f"begin {archive.name}")
        self._file = path.open("wb")

    def write(self, data: memoryview) -> None:
        assert self._file is not None, "write outside an archive"
        self._file.write(data)

    def end_archive(self) -> None:
        assert self._file is not None, "end_archive without begin_archive"
        self._file.close()
        self._file = None
        self.events.append("end")

    def manifest(self, data: bytes) -> None:
        self.events.append("manifest")
        self.manifest_bytes = data

    def progress(self, done_bytes: int, total_bytes: int | None) -> None:
        self.progress_calls.append((done_bytes, total_bytes))


def prepare_cluster(cluster: PgCluster) -> int:
    """Give ``cluster`` a tablespace holding a table, and rows in two databases; the oid."""
    location = make_postgres_dir(f"cloud-dump-ts{cluster.major}-")
    cluster.sql(f"CREATE TABLESPACE extra LOCATION '{location}'")
    cluster.sql("CREATE TABLE in_extra TABLESPACE extra AS SELECT generate_series(1, 5000) AS n")
    cluster.sql("CREATE TABLE in_base AS SELECT generate_series(1, 5000) AS n")
    cluster.sql(f"CREATE DATABASE {SECOND_DATABASE}")
    cluster.sql("CREATE TABLE t AS SELECT 'second' AS what", dbname=SECOND_DATABASE)
    return int(cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")[0][0])


def tar_bytes(path: Path, compression: str) -> bytes:
    """The archive as a plain tar, decompressed by the standard CLI tool."""
    if compression == "none":
        return path.read_bytes()
    return subprocess.run(
        [*DECOMPRESS[compression], str(path)], capture_output=True, check=True
    ).stdout


def tar_members(path: Path, compression: str) -> list[str]:
    """``tar -tf`` of the archive (fails the test when tar rejects it), "./" stripped."""
    done = subprocess.run(
        ["tar", "-tf", "-"], input=tar_bytes(path, compression), capture_output=True, check=False
    )
    assert done.returncode == 0 and not done.stderr, done.stderr.decode()
    return [line.removeprefix("./") for line in done.stdout.decode().splitlines()]


def extract(path: Path, compression: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    tar_path = target.parent / f"{path.name}.plain.tar"
    tar_path.write_bytes(tar_bytes(path, compression))
    with tarfile.open(tar_path) as archive:
        archive.extractall(target, **SAFE_EXTRACT)  # noqa: S202 - our own test archive
    tar_path.unlink()
