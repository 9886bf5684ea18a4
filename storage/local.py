"""The local backend: the Storage protocol over a directory (``file:///path``).

It owns the mapping of keys onto files under a root, atomic writes, the emulation of multipart
uploads on disk, and the translation of ``OSError`` into ``storage.errors`` (``_translated``).

On-disk layout under the root::

    <key>                                    one file per object
    .cloud-dump-uploads/<upload_id>/meta.json   {"key": ..., "initiated_ns": ...}
    .cloud-dump-uploads/<upload_id>/object      the object, parts written in place
    .cloud-dump-uploads/<upload_id>/at-00001    where part 1 lies in it: offset, size, SHA-256
    .cloud-dump-uploads/<upload_id>/at-00001.claim  taken by the one writer of part 1 there
    .cloud-dump-uploads/<upload_id>/part-00001  a part uploaded as a file of its own
    **/.cloud-dump-tmp-*                     files being written; never listed

The root is the store, as a bucket is on S3: it must exist and be a directory, and nothing
here creates it. A missing root is "storage directory '/x' does not exist" for every operation,
reads included (``PermanentStorageError``, exit 5), never an empty store: a typo in a
``file://`` URL must not start a new archive, nor look like one with nothing in it. Only what
lies under the root is created. The check costs one ``stat`` before a write or a listing, and
nothing on a read that finds its object.

Every write goes through ``storage.fsutil.write_atomically``: to a temp file in the target's
directory, fsynced, renamed (or hard-linked, for create-if-absent) onto its name, and the
directory fsynced: a reader sees the old object,
the new one, or none, never a part of one. All multipart state lives on disk, so parts may come
from any process on any host that mounts the same directory.

Parts are written in place when the uploader says where they start in the object
(``upload_part(offset=...)``, which a backup knows: its parts have one size). Completing an upload
whose parts tile the ``object`` file from its start, with no other writer of it, renames that
file onto the key: no byte is copied, and the file is synced once, by each part's writer. A part
uploaded without an offset, or a part number uploaded again (a replacement: its place is taken),
becomes a file of its own, and completion then assembles a new file, reading in-place parts back
and checking each against its SHA-256 as it copies it, as S3 would assemble it. Writers hold a
shared ``flock`` on ``object`` while they write and record; completion holds it exclusively, so
it never renames a file someone is still writing, and a writer that finds the file renamed
away meanwhile answers that the upload is gone, as S3 does once an upload is completed.

Costs: ``head`` reads the whole file to compute its SHA-256 (a local disk reads at GB/s, and
callers head rarely); ``list`` only stats. An object's ETag is derived from its inode, size and
mtime, so it changes whenever the object is rewritten, like an S3 ETag, without reading it.

Differences from S3 that callers can meet: a key cannot be both an object and the parent of
another key ("a" and "a/b"), and keys whose first segment is ``.cloud-dump-uploads`` or with a
segment starting with ``.cloud-dump-tmp-`` are reserved. Transient I/O errors are not retried
here; they are raised as ``StorageUnreachable`` (an I/O error, a stale or disconnected network
mount: the directory is not usable right now, exit 4), while permissions, a full disk or a bad
path are ``PermanentStorageError`` (exit 5) since only the operator can change them.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from storage.base import (
    S3_MAX_PART_SIZE_BYTES,
    S3_MIN_PART_SIZE_BYTES,
    Capabilities,
    MultipartUpload,
    ObjectInfo,
    PartBody,
    UploadedPart,
    sha256_hex,
    validate_key,
    validate_metadata,
)
from storage.errors import (
    ChecksumMismatch,
    ObjectExists,
    ObjectNotFound,
    PartTooSmall,
    PermanentStorageError,
    StorageError,
    StorageUnreachable,
    UploadNotFound,
)
from storage.fsutil import TEMP_PREFIX, fsync_dir, write_all, write_atomically
from storage.urls import local_url

if TYPE_CHECKING:
    # Only for annotations: storage/__init__ imports this module lazily, at run time.
    from storage.options import StorageOptions

TMP_PREFIX = TEMP_PREFIX  # every temporary name under the root starts so
UPLOADS_DIR = ".cloud-dump-uploads"
_META_NAME = "meta.json"
_IN_PLACE_NAME = "object"  # the object its parts are written into, at their offsets
_CLAIM_SUFFIX = ".claim"
# An upload being built is TMP_PREFIX + this + its id; one this old was left by a dead process.
_STAGING_INFIX = "new-"
_STALE_STAGING_S = 3600.0
_UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")
_COPY_CHUNK_BYTES = 1024 * 1024
# Object metadata lives in an extended attribute of the object's own file.
_METADATA_XATTR = "user.cloud-dump.metadata"
# A part file's SHA-256 (hex), set as it is written: completing an upload checks each part
# against the ETag its uploader got without reading it again.
_PART_SHA256_XATTR = "user.cloud-dump.part-sha256"
# copy_file_range refused between these files: copied through this process instead.
_NO_KERNEL_COPY_ERRNOS = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}
)

# A file only this call creates (a claim, an upload's ``object``): never one that is there.
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# flock refused by the file system, not by another holder: no locking there.
_NO_LOCK_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})

# Errors that retrying cannot fix: the operator must change permissions, space or the path.
_PERMANENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EISDIR,
        errno.ENAMETOOLONG,
        errno.EEXIST,
        errno.ENOTSUP,
        errno.EXDEV,  # a rename across mounts never succeeds on retry
    }
)
# On a read, these mean "there is no object under that key" (S3 would answer 404).
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})


class LocalStorage:
    """Objects as files under ``root_path``; see ``storage.base`` for the contract."""

    def __init__(self, root_path: str, options: StorageOptions) -> None:
        # Nothing touches the disk here: the root is checked by each operation.
        self._root = Path(root_path)
        self._options = options

    # -- protocol: identity ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return local_url(str(self._root))

    @property
    def capabilities(self) -> Capabilities:
        # The same limits as S3, so that a backup tested locally behaves the same on S3.
        return Capabilities(
            min_part_size_bytes=S3_MIN_PART_SIZE_BYTES,
            max_part_size_bytes=S3_MAX_PART_SIZE_BYTES,
            max_part_count=self._options.max_part_count,
        )

    # -- protocol: objects ----------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        path = self._path(key)
        meta = dict(validate_metadata(metadata or {}))

        def write(f: IO[bytes]) -> None:
            f.write(data)
            if meta:
                # On the temporary file, before it is linked into place: the object and its
                # metadata appear together or not at all.
                os.setxattr(f.fileno(), _METADATA_XATTR, json.dumps(meta).encode())

        with self._translated("write", path):
            self._require_root()
            if not _write(path, write, exclusive=if_absent):
                raise ObjectExists(key)
            return _object_info(key, path, sha256 or sha256_hex(data), meta)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with self._translated("read", path, key=key):
            return path.read_bytes()

    def open_stream(self, key: str) -> LocalObjectStream:
        path = self._path(key)
        with self._translated("read", path, key=key):
            f = path.open("rb")
            try:
                size = os.fstat(f.fileno()).st_size
                return LocalObjectStream(f, _read_metadata(f.fileno()), path, size)
            except BaseException:
                f.close()
                raise

    def open_range_stream(self, key: str, start: int, length: int) -> LocalObjectStream:
        if start < 0 or length <= 0:
            raise ValueError(f"invalid range start={start} length={length}")
        path = self._path(key)
        with self._translated("read", path, key=key):
            f = path.open("rb")
            try:
                f.seek(start)
                size = os.fstat(f.fileno()).st_size
                # _Limited has the only methods LocalObjectStream calls (read, close).
                return LocalObjectStream(cast("IO[bytes]", _Limited(f, length)), {}, path, size)
            except BaseException:
                f.close()
                raise

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        path = self._path(key)
        with self._translated("read", path, key=key), path.open("rb") as f:
            f.seek(start)
            return f.read(length)

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with self._translated("read", path, key=key), path.open("rb") as f:
            digest = hashlib.sha256()
            while chunk := f.read(_COPY_CHUNK_BYTES):
                digest.update(chunk)
            return _object_info(key, path, digest.hexdigest(), _read_metadata(f.fileno()))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if prefix:
            validate_key(prefix.removesuffix("/"))
        # Walk only the deepest directory the prefix fully names.
        start = self._root / prefix.rpartition("/")[0]
        found: builtins.list[ObjectInfo] = []
        with self._translated("list", start):
            self._require_root()
            for key, path in self._walk(start):
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):  # deleted while we walked
                        found.append(_object_info(key, path, None))
        # S3 sorts by UTF-8 bytes; code point order of str is the same order.
        yield from sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        # Deletes are idempotent: a key that names nothing is already deleted (but in a store
        # that exists, as on S3).
        with self._translated("delete", path):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                self._require_root()
                return
            fsync_dir(path.parent)
            self._prune_empty(path.parent)

    def delete_many(self, keys: Sequence[str]) -> None:
        paths = [self._path(key) for key in keys]  # every key checked before any is deleted
        if not paths:
            return
        with self._translated("delete", self._root):
            self._require_root()
        # Each directory is synced once, after its files are gone, and pruned as ``delete``
        # prunes (one fsync per directory, not per file: 1,000 WAL files share one).
        directories: dict[Path, None] = {}
        for path in paths:
            with self._translated("delete", path):
                try:
                    path.unlink()
                except (FileNotFoundError, NotADirectoryError):
                    continue
            directories[path.parent] = None
        for directory in directories:
            # Gone already: pruned by another delete, with nothing left in it to sync.
            with self._translated("delete", directory), contextlib.suppress(FileNotFoundError):
                fsync_dir(directory)
        for directory in directories:
            self._prune_empty(directory)

    def _prune_empty(self, directory: Path) -> None:
        """Remove ``directory`` and its parents below the root while they are empty: a store has
        no directories of its own (S3 has none), so a prefix whose last object is deleted leaves
        nothing behind. A writer that made one of them meanwhile finds it gone when it creates
        its temporary file and makes it again (``_write``)."""
        while directory != self._root and self._root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty, or already gone
                return
            directory = directory.parent

    # -- protocol: multipart --------------------------------------------------------------------

    def create_multipart(self, key: str) -> str:
        self._path(key)
        upload_id = uuid.uuid4().hex
        uploads = self._root / UPLOADS_DIR
        # Not TMP_PREFIX + id: that is a discarded upload, which any discard sweeps away, and
        # another backup's discard would remove this one while it is being built.
        staging = uploads / f"{TMP_PREFIX}{_STAGING_INFIX}{upload_id}"
        meta = {"key": key, "initiated_ns": time.time_ns()}
        with self._translated("write", staging):
            self._require_root()
            staging.mkdir(parents=True)
            # Built aside and renamed into place, so that an upload is never seen without meta.
            write_atomically(staging / _META_NAME, json.dumps(meta).encode(), mode=None)
            # Made here, never by a part's writer: a writer that finds it gone knows the upload
            # was completed or aborted. 0666 less the umask, as ``_write`` makes an object.
            os.close(os.open(staging / _IN_PLACE_NAME, _NEW_FILE_FLAGS, 0o666))
            staging.rename(uploads / upload_id)
            fsync_dir(uploads)
        return upload_id

    def upload_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        data: bytes | PartBody,
        *,
        sha256: str,
        offset: int | None = None,
    ) -> UploadedPart:
        self._check_part_number(part_number)
        upload_dir = self._upload_dir(key, upload_id)
        expected = sha256.lower()
        digest = hashlib.sha256()
        size = len(data)
        if offset is not None and offset < 0:
            raise ValueError(f"part offset {offset} is negative")

        # A body that checks itself against this very checksum before its last byte
        # (storage.base.PartBody) is not hashed again: a second SHA-256 pass cost a worker ~1
        # CPU second per GB stored (hashlib here: ~1,060 MB/s).
        checked = (
            not isinstance(data, (bytes, bytearray, memoryview)) and data.sha256.lower() == expected
        )

        def write(out: IO[bytes]) -> None:
            # Checked before the part file gets its name: a wrong part is never stored.
            if isinstance(data, (bytes, bytearray, memoryview)):
                digest.update(data)
                out.write(data)
            else:
                while chunk := data.read(_COPY_CHUNK_BYTES):
                    if not checked:
                        digest.update(chunk)
                    out.write(chunk)
            if not checked and digest.hexdigest() != expected:
                raise ChecksumMismatch(
                    f"part {part_number} of multipart upload '{upload_id}' of '{key}' does "
                    f"not match its sha256: expected {expected}, got {digest.hexdigest()}"
                )
            _record_part_sha256(out, expected)

        path = upload_dir / _part_name(part_number)
        # Errors name the file written: the upload's ``object`` (or the part's record there).
        with self._translated("write", upload_dir / _IN_PLACE_NAME):
            if offset is not None and _claim(upload_dir, part_number):
                where = _Placement(part_number, offset, size, expected)
                placed = _write_in_place(upload_dir, where, data, checked)
                if placed is False:
                    raise _upload_not_found(key, upload_id)
                if placed:
                    return UploadedPart(part_number, expected, size, expected)
        with self._translated("write", path):
            try:
                # No mkdir here: a missing directory means the upload was aborted meanwhile.
                write_atomically(path, write, mode=None)
            except FileNotFoundError:
                raise _upload_not_found(key, upload_id) from None
        return UploadedPart(part_number, expected, size, expected)

    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[UploadedPart]
    ) -> ObjectInfo:
        """Assemble the parts into the object, each checked to be the part its uploader was
        answered for (its ETag, the part's SHA-256), as S3 does. Like S3's, the object has no
        whole-object SHA-256 to report."""
        target = self._path(key)
        upload_dir = self._upload_dir(key, upload_id)
        in_place = upload_dir / _IN_PLACE_NAME
        with self._translated("write", target), contextlib.ExitStack() as held:
            placed_fd: int | None = None
            with contextlib.suppress(FileNotFoundError):  # an upload begun before in-place parts
                placed_fd = os.open(in_place, os.O_RDWR | os.O_CLOEXEC)
            locked = False
            if placed_fd is not None:
                held.callback(os.close, placed_fd)
                # Until the upload is discarded: no part's writer is writing or recording now,
                # and none will write into the file once it is renamed onto the key.
                locked = _lock(placed_fd, fcntl.LOCK_EX)
            sources = self._check_parts(key, upload_id, upload_dir, parts)
            renamed = (
                placed_fd is not None
                and locked
                and _tiled(upload_dir, sources)
                and _rename_into_place(placed_fd, in_place, target, sources)
            )
            if not renamed:

                def assemble(out: IO[bytes]) -> None:
                    out.flush()  # from here on the parts go to its descriptor, not its buffer
                    for part, source in zip(parts, sources, strict=True):
                        _append_part(source, out.fileno(), part, upload_id)

                _write(target, assemble)
            self._discard_upload_dir(upload_dir)
            return _object_info(key, target, None)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        upload_dir = self._upload_dir(key, upload_id)
        with self._translated("delete", upload_dir):
            try:
                self._discard_upload_dir(upload_dir)
            except FileNotFoundError:
                raise _upload_not_found(key, upload_id) from None

    def list_multipart_uploads(self, prefix: str) -> builtins.list[MultipartUpload]:
        uploads_root = self._root / UPLOADS_DIR
        found: builtins.list[tuple[str, int, str]] = []
        with self._translated("list", uploads_root):
            self._require_root()
            try:
                entries = sorted(entry.name for entry in uploads_root.iterdir())
            except FileNotFoundError:
                return []
            for upload_id in entries:
                meta = _read_meta(uploads_root / upload_id) if _is_upload_id(upload_id) else None
                if meta is not None and str(meta["key"]).startswith(prefix):
                    found.append((str(meta["key"]), int(meta["initiated_ns"]), upload_id))
        return [MultipartUpload(key, upload_id) for key, _, upload_id in sorted(found)]

    def uploaded_bytes(self, key: str, upload_id: str) -> int:
        upload_dir = self._upload_dir(key, upload_id)
        with self._translated("list", upload_dir):
            try:
                # Parts in place count as the file they fill (a part written there again as a
                # file of its own holds both).
                return sum(
                    entry.stat().st_size
                    for entry in upload_dir.iterdir()
                    if entry.name.startswith("part-") or entry.name == _IN_PLACE_NAME
                )
            except FileNotFoundError:
                raise _upload_not_found(key, upload_id) from None

    def close(self) -> None:
        """Nothing to release: every operation opens and closes its own files."""

    # -- helpers --------------------------------------------------------------------------------

    def _require_root(self) -> None:
        """Raise unless the root is an existing directory: it is the store, never created here."""
        try:
            st = self._root.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise PermanentStorageError(
                f"storage directory '{self._root}' does not exist"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise PermanentStorageError(f"storage directory '{self._root}' is not a directory")

    @contextlib.contextmanager
    def _translated(self, action: str, path: Path, *, key: str | None = None) -> Iterator[None]:
        """``_translated``, after checking the root when a path was missing: a missing object
        in a store that does not exist is the store's error, not the object's."""
        try:
            with _translated(action, path, key=key):
                yield
        except ObjectNotFound:
            self._require_root()
            raise
        except StorageError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in _MISSING_ERRNOS:
                self._require_root()
            raise

    def _path(self, key: str) -> Path:
        validate_key(key)
        segments = key.split("/")
        if segments[0] == UPLOADS_DIR or any(s.startswith(TMP_PREFIX) for s in segments):
            raise ValueError(f"storage key '{key}' uses a name reserved by the local backend")
        return self._root / key

    def _walk(self, start: Path) -> Iterator[tuple[str, Path]]:
        """(key, path) of every object file under ``start``; a missing start yields nothing."""
        for dir_name, dir_names, file_names in os.walk(start, onerror=_raise_unless_missing):
            directory = Path(dir_name)
            if directory == self._root and UPLOADS_DIR in dir_names:
                dir_names.remove(UPLOADS_DIR)
            dir_names[:] = [d for d in dir_names if not d.startswith(TMP_PREFIX)]
            for name in file_names:
                if not name.startswith(TMP_PREFIX):
                    path = directory / name
                    yield path.relative_to(self._root).as_posix(), path

    def _check_part_number(self, part_number: int) -> None:
        if not 1 <= part_number <= self._options.max_part_count:
            raise ValueError(
                f"part number {part_number} is outside 1..{self._options.max_part_count}"
            )

    def _upload_dir(self, key: str, upload_id: str) -> Path:
        """The directory of an upload in progress for ``key``; ``UploadNotFound`` otherwise."""
        self._path(key)
        if not _is_upload_id(upload_id):
            raise _upload_not_found(key, upload_id)
        upload_dir = self._root / UPLOADS_DIR / upload_id
        with self._translated("read", upload_dir):
            meta = _read_meta(upload_dir)
            if meta is None:
                self._require_root()
        if meta is None or meta.get("key") != key:
            raise _upload_not_found(key, upload_id)
        return upload_dir

    def _check_parts(
        self, key: str, upload_id: str, upload_dir: Path, parts: Sequence[UploadedPart]
    ) -> builtins.list[_Source]:
        """Where each listed part is, after S3's checks: present, in order, big enough.

        A part file of its own wins over a place in ``object``: it is only written when the
        part number was uploaded before (a replacement) or without an offset."""
        if not parts:
            raise PermanentStorageError(f"multipart upload '{upload_id}' of '{key}' has no parts")
        numbers = [p.part_number for p in parts]
        if numbers != sorted(set(numbers)):
            raise PermanentStorageError(
                f"parts of multipart upload '{upload_id}' of '{key}' are not in ascending order"
            )
        minimum = self.capabilities.min_part_size_bytes
        sources: builtins.list[_Source] = []
        for index, number in enumerate(numbers):
            path = upload_dir / _part_name(number)
            with self._translated("read", path):
                try:
                    source = _Source(path, None, path.stat().st_size)
                except FileNotFoundError:
                    placed = _read_placement(upload_dir, number)
                    if placed is None:
                        raise PermanentStorageError(
                            f"part {number} of multipart upload '{upload_id}' of '{key}' "
                            "was never uploaded"
                        ) from None
                    source = _Source(upload_dir / _IN_PLACE_NAME, placed, placed.size)
            if index < len(numbers) - 1 and source.size < minimum:
                raise PartTooSmall(
                    f"part {number} of multipart upload '{upload_id}' of '{key}' is "
                    f"{source.size} bytes, under the store's minimum of {minimum} bytes"
                )
            sources.append(source)
        return sources

    def _discard_upload_dir(self, upload_dir: Path) -> None:
        # Renamed first so that the upload disappears from listings at once, even if removing
        # its parts is interrupted.
        doomed = upload_dir.with_name(f"{TMP_PREFIX}{upload_dir.name}")
        upload_dir.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        # And what an earlier discard left (killed, or a part it could not remove): nobody
        # lists or reads a renamed upload again, so it is removed whoever renamed it. Without
        # this its parts held space that no listing, info or cleanup ever showed. An upload
        # being built (``create_multipart``) is someone's for milliseconds: only one an hour
        # old was left by a process that died building it.
        with contextlib.suppress(OSError):
            for left in upload_dir.parent.iterdir():
                name = left.name.removeprefix(TMP_PREFIX)
                if name == left.name:
                    continue
                if _is_upload_id(name) or (
                    _is_upload_id(name.removeprefix(_STAGING_INFIX))
                    and time.time() - left.stat().st_mtime > _STALE_STAGING_S
                ):
                    shutil.rmtree(left, ignore_errors=True)


def _write(path: Path, data: Callable[[IO[bytes]], object], *, exclusive: bool = False) -> bool:
    """``write_atomically`` into ``path``'s directory, made first; made again once if a delete
    pruned it in between (``_prune_empty``). mode None: the umask operators set for a shared
    store decides, as for any file."""
    for attempt in (1, 2):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return write_atomically(path, data, mode=None, exclusive=exclusive)
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable: the loop returns or raises")


def _record_part_sha256(out: IO[bytes], sha256: str) -> None:
    """Record a part file's SHA-256 with it (``_append_part`` checks it)."""
    with contextlib.suppress(OSError):  # no user xattrs: completing hashes the part again
        os.setxattr(out.fileno(), _PART_SHA256_XATTR, sha256.encode())


def _append_part(source: _Source, out: int, part: UploadedPart, upload_id: str) -> None:
    """Append one part to the file open as ``out``, checking it is the part the caller
    uploaded (its ETag).

    A part in place (its range of ``object``) is read back, hashed and written here: the
    assembly that needs it is the rare one (a part replaced, or uploaded without its offset),
    and a writer that failed may have left other bytes in its place. A part file
    written with its SHA-256 recorded (``_PART_SHA256_XATTR``) is checked by that and copied by
    the kernel (``copy_file_range``: no pass through this process, which made completing a
    280 MB archive 0.76 s, now 0.3 s, most of it the fsync). A part file without one (a file
    system without user xattrs) is read, hashed and written here.
    """
    if source.placed is not None:
        if source.placed.sha256 != part.etag:
            raise _part_replaced(part, upload_id)
        with source.path.open("rb") as f:
            f.seek(source.placed.offset)
            # Shorter than recorded: the digest says so.
            if _copy_hashed(cast("IO[bytes]", _Limited(f, source.size)), out) != part.etag:
                raise _part_replaced(part, upload_id)
        return
    with source.path.open("rb") as f:
        try:
            recorded: str | None = os.getxattr(f.fileno(), _PART_SHA256_XATTR).decode()
        except OSError:
            recorded = None
        if recorded is None:
            if _copy_hashed(f, out) != part.etag:
                raise _part_replaced(part, upload_id)
            return
        if recorded != part.etag:
            raise _part_replaced(part, upload_id)
        remaining = os.fstat(f.fileno()).st_size
        while remaining > 0:
            try:
                copied = os.copy_file_range(f.fileno(), out, remaining)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY_ERRNOS:
                    raise
                _copy_hashed(f, out)  # from where the kernel stopped
                return
            if copied == 0:  # the part shrank under us: S3 would not assemble it either
                raise _part_replaced(part, upload_id)
            remaining -= copied


@dataclass(frozen=True)
class _Placement:
    """Where a part lies in an upload's ``object`` file, as its writer recorded it."""

    part_number: int
    offset: int
    size: int
    sha256: str  # hex, of the bytes written there


@dataclass(frozen=True)
class _Source:
    """Where completion finds a part: a part file, or a placement in ``path`` (``object``)."""

    path: Path
    placed: _Placement | None
    size: int


def _claim_name(part_number: int) -> str:
    return f"{_placement_name(part_number)}{_CLAIM_SUFFIX}"


def _placement_name(part_number: int) -> str:
    return f"at-{part_number:05d}"


def _claim(upload_dir: Path, part_number: int) -> bool:
    """Take the place of ``part_number`` in ``object``: True for its first writer, False once
    taken (the part is written as a file of its own then), when it is a file already, or when
    the upload has no ``object`` (opened by an earlier version, or completed meanwhile: the
    part file's write then finds the upload gone).

    One writer per place, ever: whatever a failed or slow writer leaves there is never read as
    the part unless that writer recorded it (``_write_in_place``)."""
    if (upload_dir / _part_name(part_number)).exists():
        return False
    if not (upload_dir / _IN_PLACE_NAME).exists():  # opened by a version without in-place parts
        return False
    try:
        os.close(os.open(upload_dir / _claim_name(part_number), _NEW_FILE_FLAGS, 0o666))
    except (FileExistsError, FileNotFoundError):  # taken; or the upload is gone, which the
        return False  # part file's write then finds
    return True


def _lock(fd: int, operation: int) -> bool:
    """``flock`` ``fd``; False where the file system has no locks (an NFS mount without a
    lock manager answers ENOLCK): parts are then written as files of their own and completion
    assembles them, which needs no lock."""
    try:
        fcntl.flock(fd, operation)
    except OSError as exc:
        if exc.errno in _NO_LOCK_ERRNOS:
            return False
        raise
    return True


def _write_in_place(
    upload_dir: Path, where: _Placement, data: bytes | PartBody, checked: bool
) -> bool | None:
    """Write a part at its offset in ``object`` and sync it, then record where it is: True.
    False when the upload is gone (completed or aborted meanwhile); None, with nothing
    written, where ``object`` cannot be locked (the caller writes a part file instead).

    ``checked``: ``data`` checks itself against ``where.sha256`` (``PartBody``); else it is
    hashed here. Raises ``ChecksumMismatch`` with nothing recorded."""
    path = upload_dir / _IN_PLACE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if not _lock(fd, fcntl.LOCK_SH):  # completion waits for this part to be recorded
            return None
        try:
            if path.stat().st_ino != os.fstat(fd).st_ino:
                return False  # completed and begun again: not our file any more
        except FileNotFoundError:
            return False  # renamed onto the key, or discarded, before we got here
        digest = hashlib.sha256()
        position, end = where.offset, where.offset + where.size
        if isinstance(data, (bytes, bytearray, memoryview)):
            chunks: Iterator[bytes | bytearray | memoryview] = iter((data,))
        else:
            chunks = iter(lambda: data.read(_COPY_CHUNK_BYTES), b"")
        for chunk in chunks:
            if not checked:
                digest.update(chunk)
            view = memoryview(chunk)
            if position + len(view) > end:  # never into the next part's place
                raise ChecksumMismatch(f"part {where.part_number} is over {where.size} bytes")
            while view:
                written = os.pwrite(fd, view, position)
                view = view[written:]
                position += written
        if position != end:
            raise ChecksumMismatch(
                f"part {where.part_number} is {position - where.offset} bytes, not {where.size}"
            )
        if not checked and digest.hexdigest() != where.sha256:
            raise ChecksumMismatch(
                f"part {where.part_number} does not match its sha256: expected "
                f"{where.sha256}, got {digest.hexdigest()}"
            )
        os.fdatasync(fd)  # the bytes before the record that says they are there
        record = {"offset": where.offset, "size": where.size, "sha256": where.sha256}
        write_atomically(
            upload_dir / _placement_name(where.part_number), json.dumps(record).encode(), mode=None
        )
    finally:
        os.close(fd)  # and the lock with it
    return True


def _read_placement(upload_dir: Path, part_number: int) -> _Placement | None:
    try:
        record = json.loads((upload_dir / _placement_name(part_number)).read_bytes())
        return _Placement(
            part_number, int(record["offset"]), int(record["size"]), str(record["sha256"])
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # not a record this code wrote: as if never uploaded


def _tiled(upload_dir: Path, sources: Sequence[_Source]) -> bool:
    """Whether ``object`` is the completed object as it stands: every part in place, one after
    another from its start, and no place taken by a part not listed (a writer that failed or
    was not asked for may have written anywhere). Called with the exclusive lock held."""
    expected = 0
    numbers = set()
    for source in sources:
        if source.placed is None or source.placed.offset != expected:
            return False
        expected += source.size
        numbers.add(_claim_name(source.placed.part_number))
    taken = {entry.name for entry in os.scandir(upload_dir) if entry.name.endswith(_CLAIM_SUFFIX)}
    return taken == numbers


def _rename_into_place(
    placed_fd: int, source: Path, target: Path, sources: Sequence[_Source]
) -> bool:
    """Make ``source`` (open as ``placed_fd``) the object: cut to the parts' size, synced,
    renamed onto ``target``, the directory synced. The directory is made first, and again once
    if a delete pruned it in between (``_prune_empty``). False, with ``source`` in place, when
    ``target`` is on another file system (a key's directory mounted apart): the caller copies.
    """
    os.ftruncate(placed_fd, sum(part.size for part in sources))
    os.fsync(placed_fd)  # the parts' data is synced already: the size, if it changed
    for attempt in (1, 2):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            source.replace(target)
        except FileNotFoundError:
            if attempt == 2 or not source.exists():
                raise
            continue
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return False
            raise
        fsync_dir(target.parent)
        return True
    raise AssertionError("unreachable: the loop returns or raises")


def _copy_hashed(f: IO[bytes], out: int) -> str:
    """Copy the rest of ``f`` to the descriptor ``out``; the SHA-256 (hex) of what it copied."""
    digest = hashlib.sha256()
    while chunk := f.read(_COPY_CHUNK_BYTES):
        digest.update(chunk)
        write_all(out, chunk)
    return digest.hexdigest()


def _part_replaced(part: UploadedPart, upload_id: str) -> PermanentStorageError:
    # S3 answers InvalidPart: the part was replaced since the caller uploaded it.
    return PermanentStorageError(
        f"part {part.part_number} of multipart upload '{upload_id}' does not match its etag"
    )


class _Limited:
    """At most ``length`` bytes of ``file``, from where it stands."""

    def __init__(self, file: IO[bytes], length: int) -> None:
        self._file = file
        self._left = length

    def read(self, size: int = -1, /) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        data = self._file.read(size)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._file.close()


class LocalObjectStream:
    """An object file read in chunks (``Storage.open_stream``); read errors translated."""

    def __init__(
        self, file: IO[bytes], metadata: dict[str, str], path: Path, object_size: int | None
    ) -> None:
        self.metadata = metadata
        self.object_size = object_size
        self._file = file
        self._path = path

    def read(self, size: int = -1, /) -> bytes:
        with _translated("read", self._path):
            return self._file.read(size)

    def close(self) -> None:
        self._file.close()


def _object_info(
    key: str, path: Path, sha256: str | None, metadata: Mapping[str, str] | None = None
) -> ObjectInfo:
    st = path.stat()
    etag = f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"
    return ObjectInfo(key, st.st_size, etag, sha256, metadata, st.st_mtime)


def _read_metadata(fd: int) -> dict[str, str]:
    try:
        raw = os.getxattr(fd, _METADATA_XATTR)
    except OSError as exc:
        # No attribute, or a filesystem without user xattrs (then nothing could be stored).
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return {}
        raise
    value = json.loads(raw)
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _read_meta(upload_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((upload_dir / _META_NAME).read_bytes())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_upload_id(name: str) -> bool:
    # Upload ids become path segments: only our own uuid4 hex form can name a directory.
    return _UPLOAD_ID_RE.fullmatch(name) is not None


def _part_name(part_number: int) -> str:
    return f"part-{part_number:05d}"


def _upload_not_found(key: str, upload_id: str) -> UploadNotFound:
    return UploadNotFound(f"multipart upload '{upload_id}' of '{key}' not found")


def _raise_unless_missing(exc: OSError) -> None:
    # A directory removed while we walk, or a prefix whose parent is an object: nothing to list.
    if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
        raise exc


@contextlib.contextmanager
def _translated(action: str, path: Path, *, key: str | None = None) -> Iterator[None]:
    """The one place where ``OSError`` becomes a ``StorageError``.

    ``key`` is given for reads of an object, where a missing path means a missing object.
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise _translate(exc, action, path, key) from exc


def _translate(exc: OSError, action: str, path: Path, key: str | None) -> StorageError:
    if key is not None and exc.errno in _MISSING_ERRNOS:
        return ObjectNotFound(key)
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    message = f"cannot {action} '{path}': {reason}"
    if exc.errno in _PERMANENT_ERRNOS:
        return PermanentStorageError(message)
    return StorageUnreachable(message)
