"""The local store's parts written in place (``upload_part(offset=...)``, ``storage.local``).

What only the local backend can show: a completion that copies no byte (the object is the file
the parts were written into), and the cases where it must copy and check instead (a part
replaced, a writer that failed in its place, offsets that do not tile the object, an upload
begun before parts were placed), each of which must still give exactly the bytes asked for or
refuse with nothing stored.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.wait import wait_until
from devrig.moto import local_target
from storage import fsutil
from storage import local as local_module
from storage.base import Storage, UploadedPart, sha256_hex
from storage.errors import ChecksumMismatch, ObjectNotFound, StorageError, UploadNotFound
from storage.fsutil import TEMP_PREFIX
from storage.local import UPLOADS_DIR
from tests.storage.test_contract import PART_BYTES, payload

PART = PART_BYTES  # S3's smallest part, which the local store also requires


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def store(root: Path) -> Storage:
    return local_target(root).open()


def upload(store: Storage, key: str, upload_id: str, number: int, data: bytes,
           offset: int | None) -> UploadedPart:  # fmt: skip
    return store.upload_part(key, upload_id, number, data, sha256=sha256_hex(data), offset=offset)


def in_place_file(root: Path, upload_id: str) -> Path:
    return root / UPLOADS_DIR / upload_id / "object"


def test_parts_placed_out_of_order_become_the_object_without_a_copy(
    root: Path, store: Storage
) -> None:
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    chunks = [payload(1, PART), payload(2, PART), payload(3, 777)]
    inode = in_place_file(root, upload_id).stat().st_ino
    parts = [upload(store, key, upload_id, n, chunks[n - 1], (n - 1) * PART) for n in (3, 1, 2)]
    assert store.uploaded_bytes(key, upload_id) == 2 * PART + 777

    info = store.complete_multipart(key, upload_id, sorted(parts, key=lambda p: p.part_number))

    assert store.get(key) == b"".join(chunks)
    assert info.size == 2 * PART + 777
    # The very file the parts were written into: nothing was copied.
    assert (root / key).stat().st_ino == inode
    assert not (root / UPLOADS_DIR / upload_id).exists()
    assert store.list_multipart_uploads("") == []


def test_a_part_replaced_in_place_is_assembled_from_its_replacement(
    root: Path, store: Storage
) -> None:
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    first, second, tail = payload(1, PART), payload(2, PART), payload(3, 10)
    upload(store, key, upload_id, 1, first, 0)
    replacement = upload(store, key, upload_id, 1, second, 0)
    last = upload(store, key, upload_id, 2, tail, PART)
    # The replacement could not take the place the first upload holds: a file of its own.
    assert (root / UPLOADS_DIR / upload_id / "part-00001").exists()

    store.complete_multipart(key, upload_id, [replacement, last])

    assert store.get(key) == second + tail


def test_a_writer_that_failed_in_its_place_leaves_nothing_that_is_read(
    root: Path, store: Storage
) -> None:
    """A part whose bytes did not match its checksum was written into its place before the
    check failed: its place is not recorded, the part sent again is kept apart, and the
    object holds the bytes asked for."""
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    good, tail = payload(1, PART), payload(2, 99)
    with pytest.raises(ChecksumMismatch):
        store.upload_part(key, upload_id, 1, payload(9, PART), sha256=sha256_hex(good), offset=0)
    parts = [upload(store, key, upload_id, 1, good, 0),
             upload(store, key, upload_id, 2, tail, PART)]  # fmt: skip

    store.complete_multipart(key, upload_id, parts)

    assert store.get(key) == good + tail


def test_a_part_claimed_but_never_recorded_is_never_uploaded(root: Path, store: Storage) -> None:
    """A writer killed between taking a part's place and recording it (its bytes maybe half
    there): completion refuses the part rather than reading its place."""
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    part = upload(store, key, upload_id, 1, payload(1, 64), 0)
    (root / UPLOADS_DIR / upload_id / "at-00001").unlink()  # as if killed before recording

    with pytest.raises(StorageError, match=r"part 1 .* was never uploaded"):
        store.complete_multipart(key, upload_id, [part])
    with pytest.raises(ObjectNotFound):
        store.head(key)


@pytest.mark.parametrize("unlisted_offset", [PART, 0], ids=["after", "over"])
def test_an_unlisted_part_in_place_never_reaches_the_object(
    root: Path, store: Storage, unlisted_offset: int
) -> None:
    """Completing with fewer parts than were placed: the bytes of the part left out are not in
    the object (S3 drops them too), even though they sit in the same file; where they were
    written over a listed part's place, completion is refused with nothing stored."""
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    first, second = payload(1, PART), payload(2, PART)
    part_1 = upload(store, key, upload_id, 1, first, 0)
    upload(store, key, upload_id, 2, second, unlisted_offset)

    if unlisted_offset == 0:
        with pytest.raises(StorageError, match=r"part 1 .* does not match its etag"):
            store.complete_multipart(key, upload_id, [part_1])
        with pytest.raises(ObjectNotFound):
            store.head(key)
    else:
        store.complete_multipart(key, upload_id, [part_1])
        assert store.get(key) == first


@pytest.mark.parametrize("second_offset", [0, PART - 1, PART + 1], ids=["over", "inside", "gap"])
def test_offsets_that_do_not_tile_the_object_give_its_bytes_or_an_error(
    root: Path, store: Storage, second_offset: int
) -> None:
    """A caller's offsets are hints: wrong ones (overlapping, or leaving a gap) must never give
    other bytes than the parts listed. Where a part's place was overwritten by another, the
    completion is refused and nothing is stored; otherwise the parts are assembled."""
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    first, second = payload(1, PART), payload(2, PART)
    parts = [upload(store, key, upload_id, 1, first, 0),
             upload(store, key, upload_id, 2, second, second_offset)]  # fmt: skip

    if second_offset < PART:
        with pytest.raises(StorageError, match=r"part 1 .* does not match its etag"):
            store.complete_multipart(key, upload_id, parts)
        with pytest.raises(ObjectNotFound):
            store.head(key)
    else:
        store.complete_multipart(key, upload_id, parts)
        assert store.get(key) == first + second


def test_parts_with_and_without_offsets_mix(root: Path, store: Storage) -> None:
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    chunks = [payload(1, PART), payload(2, PART), payload(3, 5)]
    parts = [upload(store, key, upload_id, 1, chunks[0], 0),
             upload(store, key, upload_id, 2, chunks[1], None),
             upload(store, key, upload_id, 3, chunks[2], 2 * PART)]  # fmt: skip

    store.complete_multipart(key, upload_id, parts)

    assert store.get(key) == b"".join(chunks)


def test_an_upload_begun_before_parts_were_placed_takes_them_as_files(
    root: Path, store: Storage
) -> None:
    """An upload opened by an older version has no ``object`` file: parts sent with offsets
    are stored as files and assembled."""
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    in_place_file(root, upload_id).unlink()
    chunks = [payload(1, PART), payload(2, 3)]
    parts = [upload(store, key, upload_id, n, chunks[n - 1], (n - 1) * PART) for n in (1, 2)]

    store.complete_multipart(key, upload_id, parts)

    assert store.get(key) == b"".join(chunks)


def test_completing_replaces_an_object_already_under_the_key(root: Path, store: Storage) -> None:
    key = "b1/base.tar.zst"
    store.put(key, b"older object")
    upload_id = store.create_multipart(key)
    part = upload(store, key, upload_id, 1, b"newer", 0)

    store.complete_multipart(key, upload_id, [part])

    assert store.get(key) == b"newer"


def test_a_writer_that_finds_the_upload_completed_under_it_writes_nothing(
    root: Path, store: Storage
) -> None:
    """A part's writer that opened ``object`` waits while completion holds it; once completion
    has renamed it onto the key and discarded the upload, the writer answers that the upload
    is gone and the object is unchanged.

    The test plays completion's part: it holds the lock, waits until the writer has the file
    open (its descriptor shows in /proc/self/fd), renames the file and the upload's directory
    away, then lets go."""
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    placed = in_place_file(root, upload_id)
    kept = payload(1, PART)
    placed.write_bytes(kept)
    outcome: list[BaseException | UploadedPart] = []

    def late_writer() -> None:
        try:
            outcome.append(upload(store, key, upload_id, 2, payload(2, PART), PART))
        except BaseException as exc:
            outcome.append(exc)

    def open_descriptors() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if _points_at(fd, placed))

    with placed.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        writer = threading.Thread(target=late_writer)
        writer.start()
        wait_until(lambda: open_descriptors() == 2 or not writer.is_alive(),
                   timeout_s=60, first_s=0.001)  # fmt: skip
        completed = root / "completed"
        placed.rename(completed)
        upload_dir = placed.parent
        upload_dir.rename(upload_dir.with_name(f"{TEMP_PREFIX}{upload_id}"))
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    writer.join(timeout=60)

    assert len(outcome) == 1 and isinstance(outcome[0], UploadNotFound)
    assert completed.read_bytes() == kept


def _points_at(fd: Path, path: Path) -> bool:
    try:
        return fd.readlink() == path
    except OSError:  # closed meanwhile
        return False


def test_completion_waits_for_a_writer_in_place_before_it_decides(
    root: Path, store: Storage
) -> None:
    """A stray writer (a part not listed) that is writing in place when completion starts must
    not write into the completed object: completion waits for it, then sees the part it
    claimed and copies and checks the listed parts instead of renaming the file.

    The test plays the writer: it holds the shared lock, waits until completion is queued for
    the exclusive one (/proc/locks shows the waiter), claims part 3 and writes over part 1's
    place, then lets go."""
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    first = payload(1, PART)
    part_1 = upload(store, key, upload_id, 1, first, 0)
    placed = in_place_file(root, upload_id)
    outcome: list[BaseException | object] = []

    def complete() -> None:
        try:
            outcome.append(store.complete_multipart(key, upload_id, [part_1]))
        except BaseException as exc:
            outcome.append(exc)

    with placed.open("r+b") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_SH)
        completion = threading.Thread(target=complete)
        completion.start()
        inode = f":{placed.stat().st_ino} "
        wait_until(lambda: _lock_waiter(inode) or not completion.is_alive(),
                   timeout_s=60, first_s=0.001)  # fmt: skip
        (placed.parent / "at-00003.claim").touch()
        writer.write(payload(3, PART))
        writer.flush()
        fcntl.flock(writer.fileno(), fcntl.LOCK_UN)
    completion.join(timeout=60)

    assert len(outcome) == 1
    if isinstance(outcome[0], BaseException):
        assert isinstance(outcome[0], StorageError)
        with pytest.raises(ObjectNotFound):
            store.head(key)
    else:
        assert store.get(key) == first


def _lock_waiter(inode: str) -> bool:
    """Whether some process waits for a lock on the file with inode ``inode`` (":N ")."""
    return any("->" in line and inode in line
               for line in Path("/proc/locks").read_text().splitlines())  # fmt: skip


def test_a_file_system_without_locks_stores_parts_as_files(
    root: Path, store: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stub: an NFS mount without a lock manager answers ENOLCK to flock, which no file system
    here does. Parts sent with offsets are then stored as files of their own and assembled."""

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    chunks = [payload(1, PART), payload(2, 10)]
    parts = [upload(store, key, upload_id, n, chunks[n - 1], (n - 1) * PART) for n in (1, 2)]
    assert sorted(p.name for p in (root / UPLOADS_DIR / upload_id).glob("part-*")) == [
        "part-00001", "part-00002"
    ]

    store.complete_multipart(key, upload_id, parts)

    assert store.get(key) == b"".join(chunks)


class _LongBody(io.BytesIO):
    """A PartBody that hands out more bytes than its length says (a broken reader): the
    store must not write them into the next part's place."""

    failure: Exception | None = None

    def __init__(self, data: bytes, claimed: int) -> None:
        super().__init__(data)
        self._claimed = claimed
        self.sha256 = sha256_hex(data[:claimed])

    def __len__(self) -> int:
        return self._claimed


def test_a_part_longer_than_its_size_never_writes_into_the_next_place(
    root: Path, store: Storage
) -> None:
    key = "b1/base.tar.zst"
    upload_id = store.create_multipart(key)
    first, second = payload(1, PART), payload(2, 10)
    part_2 = upload(store, key, upload_id, 2, second, PART)
    body = _LongBody(first + b"x" * 5, PART)

    with pytest.raises(ChecksumMismatch):
        store.upload_part(key, upload_id, 1, body, sha256=body.sha256, offset=0)
    parts = [upload(store, key, upload_id, 1, first, 0), part_2]

    store.complete_multipart(key, upload_id, parts)

    assert store.get(key) == first + second


def test_a_key_on_another_file_system_is_copied_into_place(
    root: Path, store: Storage, tmp_path: Path
) -> None:
    """A directory of the store mounted apart (here: a link to /dev/shm, a tmpfs): the upload's
    file cannot be renamed there (EXDEV), so completion copies and checks the parts instead."""
    elsewhere = Path("/dev/shm") / f"cloud-dump-test-{tmp_path.name}"
    if not Path("/dev/shm").is_dir() or Path("/dev/shm").stat().st_dev == root.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's directory")
    elsewhere.mkdir()
    try:
        (root / "cl").symlink_to(elsewhere)
        key = "cl/b1/base.tar.zst"
        upload_id = store.create_multipart(key)
        chunks = [payload(1, PART), payload(2, 3)]
        parts = [upload(store, key, upload_id, n, chunks[n - 1], (n - 1) * PART) for n in (1, 2)]

        store.complete_multipart(key, upload_id, parts)

        assert store.get(key) == b"".join(chunks)
        assert (elsewhere / "b1" / "base.tar.zst").stat().st_dev != root.stat().st_dev
        assert store.list_multipart_uploads("") == []
    finally:
        shutil.rmtree(elsewhere)


def test_an_upload_being_opened_survives_another_uploads_discard(
    root: Path, store: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two backups in one store: one completes or aborts an upload (which sweeps what earlier
    discards left) while the other is opening one. The opening must not be swept away.

    The interleaving is forced: the discard runs just as the opening writes its meta.json."""
    finished = store.create_multipart("a/base.tar.zst")
    real_write = fsutil.write_atomically  # what storage.local calls it by
    interleaved: list[bool] = []

    def write_then_discard(path: Path, *args: Any, **kwargs: Any) -> bool:
        if path.name == "meta.json" and not interleaved:
            interleaved.append(True)
            store.abort_multipart("a/base.tar.zst", finished)
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(local_module, "write_atomically", write_then_discard)
    opened = store.create_multipart("b/base.tar.zst")

    assert interleaved
    assert [u.upload_id for u in store.list_multipart_uploads("")] == [opened]
    part = upload(store, "b/base.tar.zst", opened, 1, b"b", 0)
    store.complete_multipart("b/base.tar.zst", opened, [part])
    assert store.get("b/base.tar.zst") == b"b"


def test_an_upload_left_half_opened_is_swept_once_stale(root: Path, store: Storage) -> None:
    """A process that died while opening an upload left its directory being built: a discard
    removes it once it is an hour old, not before."""
    uploads = root / UPLOADS_DIR
    uploads.mkdir()
    stale = uploads / f"{TEMP_PREFIX}new-{'a' * 32}"
    fresh = uploads / f"{TEMP_PREFIX}new-{'b' * 32}"
    for left in (stale, fresh):
        left.mkdir()
        (left / "meta.json").write_text("{}")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    store.abort_multipart("k", store.create_multipart("k"))

    assert not stale.exists()
    assert fresh.exists()


def test_a_failed_write_in_place_names_the_file_written(tmp_path: Path) -> None:
    """The store's file size limit (RLIMIT_FSIZE, set in a child process so that nothing else
    is limited) makes the part's write fail with EFBIG: the error names the upload's object,
    the file being written, not a part file that does not exist."""
    code = f"""
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from devrig.moto import local_target
from storage.base import sha256_hex
from storage.errors import StorageError
store = local_target(Path({str(tmp_path / "store")!r})).open()
upload_id = store.create_multipart("k")
resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, resource.RLIM_INFINITY))
data = bytes(2 * 1024 * 1024)
try:
    store.upload_part("k", upload_id, 1, data, sha256=sha256_hex(data), offset=0)
except StorageError as exc:
    print(exc)
    sys.exit(0)
sys.exit("no error")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=60, cwd=Path(__file__).parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"cannot write '.*/object': file too large", done.stdout), done.stdout
