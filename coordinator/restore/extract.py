"""Safe streaming extraction of one tablespace tar into a directory, checksumming as it writes.

``extract_archive`` reads a tar stream once (``tarfile`` mode ``r|``) and refuses anything that
could write outside the target: absolute names, ``..`` components, symbolic or hard links leading
outside, members under a symbolic link, device files and FIFOs. The one exception is
``pg_tblspc/<oid>`` in the base archive: a symbolic link to the tablespace's location on the
source server, replaced by a link to where this restore puts that tablespace.

Every regular file's checksum is computed from the bytes as they are written (in the algorithm
PostgreSQL's ``backup_manifest`` uses), so ``verify_against_manifest`` checks the restored files
without re-reading any. Files and directories keep the owner and group bits the archive gives
them, never world bits and never group write: a cluster initialised with ``--allow-group-access``
comes back 0750/0640, any other 0700/0600 (PostgreSQL never sets anything else). The owner
always keeps read and write (and search, on directories), so the restore can finish its work.

A failed write names the file it was writing: ``OSError`` from a write on a file descriptor
(``ENOSPC``, ``EFBIG``) carries no file name, so the CLI's one-line error could not say where
the disk filled up.

Names in ``held_back`` are written under a temporary name (``<name>.cloud-dump-partial``) and
reported in the result; the caller renames them once everything is verified. Restore holds back
``global/pg_control``: PostgreSQL refuses to start without it, so a restore interrupted at any
point (even by SIGKILL) never leaves a data directory that looks usable.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import tarfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NoReturn

import crc32c

from storage.errors import IntegrityError
from storage.fsutil import naming as naming  # also run.py's and targetdirs.py's, for now
from storage.fsutil import write_all

PARTIAL_SUFFIX = ".cloud-dump-partial"
_COPY_BYTES = 64 * 1024  # larger chunks made glibc map and unmap each one: 3x slower (bench/backup)
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
    extractor = _Extractor(target, tablespace_links, algorithm, manifest_prefix, held_back, what)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                extractor.add(tar, member)
    except (tarfile.TarError, EOFError) as exc:
        raise IntegrityError(f"{what} is not a readable tar archive: {exc}") from exc
    return extractor.result


class _Extractor:
    def __init__(
        self,
        target: Path,
        tablespace_links: Mapping[str, Path] | None,
        algorithm: str | None,
        manifest_prefix: str,
        held_back: Collection[str],
        what: str,
    ) -> None:
        self.target = target
        self.real_target = Path(os.path.realpath(target))
        self.tablespace_links = tablespace_links
        self.algorithm = algorithm
        self.manifest_prefix = manifest_prefix
        self.held_back = set(held_back)
        self.what = what
        self.result = ExtractResult()
        self.symlinks: set[str] = set()

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = self._safe_name(member.name)
        if name is None:  # "./": the target itself
            return
        dest = self.target / name
        if member.isdir():
            self._parent_dir(name)
            if not dest.is_dir() or dest.is_symlink():
                dest.mkdir(mode=_DIR_MODE)
            mode = dir_mode(member.mode)
            dest.chmod(mode)
            if name == "global":
                self.result.global_dir_mode = mode
        elif member.isfile():
            self._parent_dir(name)
            self._write_file(tar, member, name, dest)
        elif member.issym():
            self._parent_dir(name)
            self._symlink(member, name, dest)
        elif member.islnk():
            self._parent_dir(name)
            self._hardlink(member, name, dest)
        else:
            self._refuse(member.name, "is a device file or FIFO")

    # --- member kinds ---------------------------------------------------------------------------

    def _write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, dest: Path
    ) -> None:
        if name in self.held_back:
            dest = dest.with_name(dest.name + PARTIAL_SUFFIX)
            self.result.held_back[name] = dest
        source = tar.extractfile(member)
        if source is None:  # only for non-regular members, excluded above
            self._refuse(member.name, "has no data")
        mode = file_mode(member.mode)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(dest, flags, mode)
        except FileExistsError:
            self._refuse(member.name, "appears twice in the archive")
        checksum = new_checksum(self.algorithm)
        size = 0
        try:
            with naming(dest):
                os.fchmod(fd, mode)  # open() applied the umask to it
                while chunk := source.read(_COPY_BYTES):
                    checksum.update(chunk)
                    write_all(fd, chunk)
                    size += len(chunk)
        finally:
            os.close(fd)
        if size != member.size:
            raise IntegrityError(f"{self.what} member '{member.name}' is truncated")
        self.result.bytes_written += size
        self.result.files[self.manifest_prefix + name] = FileFacts(
            size=size, algorithm=self.algorithm, checksum=checksum.hexdigest()
        )

    def _symlink(self, member: tarfile.TarInfo, name: str, dest: Path) -> None:
        parts = PurePosixPath(name).parts
        if self.tablespace_links is not None and len(parts) == 2 and parts[0] == _TBLSPC_DIR:
            oid = parts[1]
            location = self.tablespace_links.get(oid)
            if location is None:
                self._refuse(member.name, f"links to tablespace {oid}, which the backup lacks")
            dest.symlink_to(location)
            self.result.tablespace_links[oid] = location
            self.symlinks.add(name)
            return
        link = member.linkname
        if not _link_stays_inside(PurePosixPath(name).parent, link):
            self._refuse(member.name, f"is a symbolic link leading outside the target ('{link}')")
        dest.symlink_to(link)
        self.symlinks.add(name)

    def _hardlink(self, member: tarfile.TarInfo, name: str, dest: Path) -> None:
        source_name = self._safe_name(member.linkname)
        source_facts = self.result.files.get(self.manifest_prefix + (source_name or ""))
        if source_name is None or source_facts is None or source_name in self.held_back:
            self._refuse(member.name, f"is a hard link to '{member.linkname}', not to a file")
        self._check_no_symlink_above(source_name, member.name)
        os.link(self.target / source_name, dest, follow_symlinks=False)
        self.result.files[self.manifest_prefix + name] = source_facts

    # --- path safety ----------------------------------------------------------------------------

    def _safe_name(self, raw: str) -> str | None:
        """The member name relative to the target, or None for the target itself."""
        if raw.startswith("/") or "\x00" in raw:
            self._refuse(raw, "has an absolute name")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts:
            self._refuse(raw, "has a '..' component")
        return "/".join(parts) if parts else None

    def _parent_dir(self, name: str) -> None:
        """Create the member's missing parent directories, refusing to go through a link."""
        self._check_no_symlink_above(name, name)
        parent = (self.target / name).parent
        parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        # Defence in depth: whatever is on disk, the parent must resolve inside the target.
        real_parent = Path(os.path.realpath(parent))
        if not real_parent.is_relative_to(self.real_target):
            self._refuse(name, "would be written outside the target")

    def _check_no_symlink_above(self, name: str, shown: str) -> None:
        parts = PurePosixPath(name).parts
        for depth in range(1, len(parts) + 1):
            if "/".join(parts[:depth]) in self.symlinks:
                self._refuse(shown, "is under a symbolic link or replaces one")

    def _refuse(self, member: str, reason: str) -> NoReturn:
        raise IntegrityError(f"{self.what} member '{member}' {reason}: refusing to extract it")


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


# --- PostgreSQL's backup_manifest ---------------------------------------------------------------

# Files PostgreSQL puts in a base backup without listing them in backup_manifest: the WAL that
# makes the backup consistent (pg_wal/), and the manifest itself.
_UNLISTED_NAMES = frozenset({"backup_manifest"})
_UNLISTED_PREFIXES = ("pg_wal/",)
_HASHLIB_ALGORITHMS = {
    "SHA224": "sha224",
    "SHA256": "sha256",
    "SHA384": "sha384",
    "SHA512": "sha512",
}


@dataclass(frozen=True)
class FileFacts:
    """A restored file as written: its size and checksum in ``algorithm`` (None: not computed)."""

    size: int
    algorithm: str | None
    checksum: str


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    algorithm: str | None
    checksum: str | None


class _Checksum:
    """Incremental CRC32C in PostgreSQL's manifest notation, or a no-op for "NONE"."""

    def __init__(self, crc: bool) -> None:
        self._crc: int | None = 0 if crc else None

    def update(self, data: bytes) -> None:
        if self._crc is not None:
            self._crc = crc32c.crc32c(data, self._crc)

    def hexdigest(self) -> str:
        if self._crc is None:
            return ""
        # PostgreSQL prints the CRC's bytes as they lie in memory (pg_checksum_final memcpy),
        # i.e. little-endian on the x86/ARM servers it runs on: crc 0x2247748a -> "8a744722".
        return self._crc.to_bytes(4, "little").hex()


def new_checksum(algorithm: str | None) -> _Checksum | hashlib._Hash:
    """A fresh checksum object for a backup_manifest ``Checksum-Algorithm``."""
    if algorithm is None or algorithm == "NONE":
        return _Checksum(crc=False)
    if algorithm == "CRC32C":
        return _Checksum(crc=True)
    try:
        return hashlib.new(_HASHLIB_ALGORITHMS[algorithm])
    except KeyError:
        raise IntegrityError(
            f"backup_manifest uses unknown checksum algorithm '{algorithm}'"
        ) from None


def load_backup_manifest(manifest_json: bytes) -> list[ManifestEntry]:
    """The file entries of a backup_manifest, after checking its own Manifest-Checksum."""
    try:
        doc = json.loads(manifest_json)
        version = doc["PostgreSQL-Backup-Manifest-Version"]
        files = doc["Files"]
        declared = doc["Manifest-Checksum"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"backup_manifest is not a PostgreSQL backup manifest: {exc}") from exc
    if version not in (1, 2):
        raise IntegrityError(f"backup_manifest has unsupported version {version}")
    # The checksum covers every byte before the line that holds it (PostgreSQL's definition).
    cut = manifest_json.rfind(b'"Manifest-Checksum"')
    if hashlib.sha256(manifest_json[:cut]).hexdigest() != str(declared).lower():
        raise IntegrityError("backup_manifest does not match its own Manifest-Checksum")
    try:
        return [_entry(item) for item in files]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"backup_manifest has a malformed file entry: {exc}") from exc


def manifest_algorithm(entries: list[ManifestEntry]) -> str | None:
    """The checksum algorithm to compute while extracting (PostgreSQL uses one per backup)."""
    return next((e.algorithm for e in entries if e.algorithm is not None), None)


def verify_against_manifest(manifest_json: bytes, observed: Mapping[str, FileFacts]) -> None:
    """Raise ``IntegrityError`` naming the first file that differs from the backup_manifest.

    Every listed file must have been restored with its size and checksum; a restored file that is
    not listed must be one PostgreSQL leaves out of the manifest (WAL, the manifest itself).
    """
    entries = load_backup_manifest(manifest_json)
    listed = set()
    for entry in entries:
        listed.add(entry.path)
        facts = observed.get(entry.path)
        if facts is None:
            raise IntegrityError(f"file '{entry.path}' listed in backup_manifest was not restored")
        if facts.size != entry.size:
            raise IntegrityError(
                f"file '{entry.path}' has {facts.size} bytes, backup_manifest says {entry.size}"
            )
        if entry.algorithm in (None, "NONE"):
            continue
        if facts.algorithm != entry.algorithm or facts.checksum != entry.checksum:
            raise IntegrityError(
                f"file '{entry.path}' does not match its {entry.algorithm} checksum "
                "in backup_manifest"
            )
    for path in observed:
        if path not in listed and not _unlisted_by_postgres(path):
            raise IntegrityError(f"file '{path}' was restored but is not in backup_manifest")


def _unlisted_by_postgres(path: str) -> bool:
    return path in _UNLISTED_NAMES or path.startswith(_UNLISTED_PREFIXES)


def _entry(item: dict[str, object]) -> ManifestEntry:
    if "Path" in item:
        path = str(item["Path"])
    else:
        # Names that are not valid UTF-8 are hex-encoded; tarfile decodes them the way
        # os.fsdecode does (surrogateescape), so compare in that form.
        path = os.fsdecode(binascii.unhexlify(str(item["Encoded-Path"])))
    algorithm = item.get("Checksum-Algorithm")
    checksum = item.get("Checksum")
    return ManifestEntry(
        path=path,
        size=int(str(item["Size"])),
        algorithm=str(algorithm) if algorithm is not None else None,
        checksum=str(checksum).lower() if checksum is not None else None,
    )
