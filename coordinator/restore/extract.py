"""Safe streaming extraction of one tablespace tar into a directory, checksumming as it writes.

``extract_archive`` reads a tar stream once, front to back, and refuses anything that
could write outside the target: absolute names, ``..`` components, symbolic or hard links leading
outside, members under a symbolic link, device files and FIFOs. The one exception is
``pg_tblspc/<oid>`` in the base archive: a symbolic link to the tablespace's location on the
source server, replaced by a link to where this restore puts that tablespace.

The pass over the tar and the checksums are ``coordinator.tarwalk``'s, shared with ``verify
--deep``: this module is the sink that writes. Every regular file's checksum is computed from the
bytes as they are written (in the algorithm PostgreSQL's ``backup_manifest`` uses), so
``verify_against_manifest`` checks the restored files without re-reading any.

Files and directories keep the owner and group bits the archive gives them, never world bits
and never group write: a cluster initialised with ``--allow-group-access`` comes back
0750/0640, any other 0700/0600 (PostgreSQL never sets anything else). The owner always keeps
read and write (and search, on directories), so the restore can finish its work.

A failed write names the file it was writing: ``OSError`` from a write on a file descriptor
(``ENOSPC``, ``EFBIG``) carries no file name, so the CLI's one-line error could not say where
the disk filled up.

Names in ``held_back`` are written under a temporary name (``<name>.cloud-dump-partial``) and
reported in the result; the caller renames them once everything is verified. Restore holds back
``global/pg_control``: PostgreSQL refuses to start without it, so a restore interrupted at any
point (even by SIGKILL) never leaves a data directory that looks usable.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from coordinator.restore.writebehind import WriteBehind
from coordinator.tarwalk import FileFacts as FileFacts  # restore's tests import these from here
from coordinator.tarwalk import load_backup_manifest as load_backup_manifest
from coordinator.tarwalk import refuse, walk_tar
from coordinator.tarwalk import verify_against_manifest as verify_against_manifest
from storage.errors import IntegrityError
from storage.fsutil import naming as naming  # also run.py's and targetdirs.py's, for now

PARTIAL_SUFFIX = ".cloud-dump-partial"
# Chunks handed to the writer thread. Each one is a hand-over of the GIL and a queue entry:
# 512 KiB took a 1.2 GB restore from 2.55 s to 2.1 s against 64 KiB. The restoring process
# leaves glibc's mmap threshold dynamic (it rises to the chunk size after the first free), so
# chunks this large come from the heap, not from a mapping each.
CHUNK_BYTES = 512 * 1024
# Chunks decompressed ahead of the walk, on their own thread (``tarwalk._ReadAhead``).
READ_AHEAD_CHUNKS = 4
_DIR_MODE = 0o700
_TBLSPC_DIR = "pg_tblspc"
# Owner bits and group read/search: what PostgreSQL itself creates with group access on.
_KEPT_MODE_BITS = 0o750


@dataclass
class ExtractResult:
    """What one archive put on disk.

    ``files`` maps manifest paths (``manifest_prefix`` + member name) to what was written;
    ``held_back`` maps member names to the temporary path they were written to.
    """

    files: dict[str, FileFacts] = field(default_factory=dict)
    held_back: dict[str, Path] = field(default_factory=dict)
    bytes_written: int = 0
    tablespace_links: dict[str, Path] = field(default_factory=dict)
    # Mode given to the ``global`` directory, when the archive has one (the base archive):
    # PostgreSQL creates every directory with the data directory's mode.
    global_dir_mode: int | None = None


def dir_mode(archived: int) -> int:
    """The mode a restored directory gets for the mode it had in the archive."""
    return (archived & _KEPT_MODE_BITS) | 0o700


def file_mode(archived: int) -> int:
    """The mode a restored regular file gets for the mode it had in the archive."""
    return (archived & _KEPT_MODE_BITS) | 0o600


def extract_archive(
    stream: BinaryIO,
    target: Path,
    *,
    tablespace_links: Mapping[str, Path] | None,
    algorithm: str | None = "CRC32C",
    manifest_prefix: str = "",
    held_back: Collection[str] = (),
    what: str = "archive",
) -> ExtractResult:
    """Extract the tar read from ``stream`` into the existing directory ``target``.

    ``tablespace_links`` (oid → directory) is given for the base archive only: its
    ``pg_tblspc/<oid>`` links are re-pointed there. ``algorithm`` is the backup_manifest checksum
    algorithm to compute (None: sizes only). Unsafe members raise ``IntegrityError`` naming
    ``what`` and the member before anything is written for them.
    """
    with WriteBehind() as writer:
        extractor = _Extractor(target, tablespace_links, held_back, what, writer)
        walked = walk_tar(stream, extractor, algorithm=algorithm, manifest_prefix=manifest_prefix,
                          what=what, chunk_bytes=CHUNK_BYTES,
                          read_ahead=READ_AHEAD_CHUNKS)  # fmt: skip
    extractor.result.files = walked.files
    extractor.result.bytes_written = walked.bytes
    return extractor.result


class _Extractor:
    """The sink that writes: ``walk_tar`` hands it safe names, it puts them under ``target``."""

    def __init__(
        self,
        target: Path,
        tablespace_links: Mapping[str, Path] | None,
        held_back: Collection[str],
        what: str,
        writer: WriteBehind,
    ) -> None:
        self.target = target
        self.writer = writer
        self.real_target = Path(os.path.realpath(target))
        self.tablespace_links = tablespace_links
        self.held_back = set(held_back)
        self.what = what
        self.result = ExtractResult()
        self.symlinks: set[str] = set()

    def directory(self, member: tarfile.TarInfo, name: str) -> None:
        self._parent_dir(name)
        dest = self.target / name
        if not dest.is_dir() or dest.is_symlink():
            dest.mkdir(mode=_DIR_MODE)
        mode = dir_mode(member.mode)
        dest.chmod(mode)
        if name == "global":
            self.result.global_dir_mode = mode

    def file(
        self, member: tarfile.TarInfo, name: str, chunks: Iterable[bytes | memoryview]
    ) -> None:
        self._parent_dir(name)
        dest = self.target / name
        if name in self.held_back:
            dest = dest.with_name(dest.name + PARTIAL_SUFFIX)
            self.result.held_back[name] = dest
        # Created, written and closed on the writer's thread, in this order (writebehind.py).
        self.writer.open(
            dest,
            file_mode(member.mode),
            lambda: refuse(self.what, member.name, "appears twice in the archive"),
        )
        for chunk in chunks:
            self.writer.write(chunk)
        self.writer.finish()

    def symlink(self, member: tarfile.TarInfo, name: str) -> None:
        self._parent_dir(name)
        dest = self.target / name
        parts = PurePosixPath(name).parts
        if self.tablespace_links is not None and len(parts) == 2 and parts[0] == _TBLSPC_DIR:
            oid = parts[1]
            location = self.tablespace_links.get(oid)
            if location is None:
                refuse(self.what, member.name, f"links to tablespace {oid}, which the backup lacks")
            dest.symlink_to(location)
            self.result.tablespace_links[oid] = location
            self.symlinks.add(name)
            return
        link = member.linkname
        if not _link_stays_inside(PurePosixPath(name).parent, link):
            refuse(self.what, member.name,
                   f"is a symbolic link leading outside the target ('{link}')")  # fmt: skip
        dest.symlink_to(link)
        self.symlinks.add(name)

    def hardlink(self, member: tarfile.TarInfo, name: str, source: str) -> None:
        self._parent_dir(name)
        if source in self.held_back:
            refuse(self.what, member.name, f"is a hard link to '{member.linkname}', not to a file")
        self._check_no_symlink_above(source, member.name)
        # After the writer has created the source (it runs jobs in order).
        existing, link = self.target / source, self.target / name
        self.writer.call(lambda: os.link(existing, link, follow_symlinks=False))

    # --- path safety ----------------------------------------------------------------------------

    def _parent_dir(self, name: str) -> None:
        """Create the member's missing parent directories, refusing to go through a link."""
        self._check_no_symlink_above(name, name)
        parent = (self.target / name).parent
        parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        # Defence in depth: whatever is on disk, the parent must resolve inside the target.
        real_parent = Path(os.path.realpath(parent))
        if not real_parent.is_relative_to(self.real_target):
            refuse(self.what, name, "would be written outside the target")

    def _check_no_symlink_above(self, name: str, shown: str) -> None:
        parts = PurePosixPath(name).parts
        for depth in range(1, len(parts) + 1):
            if "/".join(parts[:depth]) in self.symlinks:
                refuse(self.what, shown, "is under a symbolic link or replaces one")


def _link_stays_inside(directory: PurePosixPath, link: str) -> bool:
    """Whether a relative link in ``directory`` resolves (lexically) inside the target."""
    if link.startswith("/"):
        return False
    depth = len(directory.parts)
    for part in PurePosixPath(link).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part != ".":
            depth += 1
    return True


def rewrite_tablespace_map(
    original: bytes, locations: Mapping[str, Path], in_place: Collection[str] = ()
) -> bytes:
    """A tablespace_map naming ``locations`` (oid → directory) for the oids ``original`` lists.

    Tar-format backups (TABLESPACE_MAP) carry this file instead of pg_tblspc links, in PostgreSQL
    13 to 18 alike; PostgreSQL recreates the links from it when it starts from backup_label.
    Oids in ``in_place`` are restored as directories inside PGDATA: a line for one (PostgreSQL
    writes none) would make the server replace that directory with a link, so it is dropped.
    """
    lines = []
    for line in original.decode(errors="surrogateescape").splitlines():
        if not line.strip():
            continue
        oid = line.split(" ", 1)[0]
        if oid in in_place:
            continue
        if oid not in locations:
            raise IntegrityError(f"tablespace_map names tablespace {oid}, which the backup lacks")
        # PostgreSQL's escaping (do_pg_backup_start): a backslash before \\, \n and \r.
        path = str(locations[oid])
        escaped = path.replace("\\", "\\\\").replace("\n", "\\\n").replace("\r", "\\\r")
        lines.append(f"{oid} {escaped}\n")
    return "".join(lines).encode(errors="surrogateescape")
