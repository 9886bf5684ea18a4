"""storage.fsutil: the one atomic write, the directory fsync, and errors naming the file."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from storage import fsutil


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What ``os.fsync`` was called on: "dir" or "file" (it still runs)."""
    seen: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        seen.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return seen


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


FIXED_RANDOM = b"\x01" * 8


def temp_name(path: Path, prefix: str = fsutil.TEMP_PREFIX) -> Path:
    """The temporary name ``write_atomically`` picks once ``os.urandom`` gives FIXED_RANDOM."""
    return path.with_name(f"{prefix}{path.name}-{FIXED_RANDOM.hex()}")


def test_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    fsutil.write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_default_mode_is_0600_whatever_the_umask_allows(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "f"
    fsutil.write_atomically(target, b"x")
    assert mode_of(target) == 0o600


def test_a_given_mode_is_set_exactly_though_the_umask_would_narrow_it(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        fsutil.write_atomically(tmp_path / "f", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "f") == 0o640


def test_keeping_a_mode_is_passing_the_one_the_file_has(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    target.chmod(0o640)
    fsutil.write_atomically(target, b"new", mode=stat.S_IMODE(target.stat().st_mode))
    assert mode_of(target) == 0o640


def test_mode_none_is_what_open_gives_under_the_umask(tmp_path: Path, umask_022: None) -> None:
    fsutil.write_atomically(tmp_path / "f", b"x", mode=None)
    assert mode_of(tmp_path / "f") == 0o644


def test_text_reads_back_as_written(tmp_path: Path) -> None:
    target = tmp_path / "f"
    fsutil.write_atomically(target, "naïve → 1\n", sync=False)
    assert target.read_text() == "naïve → 1\n"


def test_sync_fsyncs_the_file_then_its_directory(tmp_path: Path, fsyncs: list[str]) -> None:
    fsutil.write_atomically(tmp_path / "f", b"x")
    assert fsyncs == ["file", "dir"]


def test_without_sync_nothing_is_fsynced(tmp_path: Path, fsyncs: list[str]) -> None:
    fsutil.write_atomically(tmp_path / "f", b"x", sync=False)
    assert fsyncs == []


def test_the_temporary_name_starts_with_the_prefix_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real = Path.replace

    def spying(self: Path, target: Path) -> Path:
        seen.append(self.name)
        return real(self, target)

    monkeypatch.setattr(Path, "replace", spying)
    fsutil.write_atomically(tmp_path / "marker", b"x", temp_prefix=".tmp-", sync=False)
    assert len(seen) == 1 and seen[0].startswith(".tmp-marker-")
    assert (tmp_path / "marker").read_bytes() == b"x"


def test_a_missing_directory_is_reported_for_the_target(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "f"
    with pytest.raises(FileNotFoundError) as caught:
        fsutil.write_atomically(target, b"x")
    assert caught.value.filename == str(target)
    assert str(target) in str(caught.value) and fsutil.TEMP_PREFIX not in str(caught.value)


def test_a_failed_write_names_the_target_and_removes_the_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as caught:
        fsutil.write_atomically(target, b"new")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_failed_rename_names_the_target_and_removes_the_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    (target / "inside").mkdir(parents=True)
    with pytest.raises(OSError) as caught:
        fsutil.write_atomically(target, b"x", sync=False)
    assert caught.value.filename == str(target) and caught.value.filename2 is None
    assert [p.name for p in tmp_path.iterdir()] == ["a-directory"]


def test_never_writes_through_a_link_at_the_temporary_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "urandom", lambda n: FIXED_RANDOM[:n])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    target = tmp_path / "f"
    temp_name(target).symlink_to(elsewhere)
    with pytest.raises(OSError) as caught:
        fsutil.write_atomically(target, b"x")
    # O_EXCL refuses any existing name, a link included (O_NOFOLLOW would say ELOOP).
    assert caught.value.errno in (errno.EEXIST, errno.ELOOP)
    assert caught.value.filename == str(target)
    assert elsewhere.read_bytes() == b"untouched"
    assert not target.exists()


def test_exclusive_creates_only_an_absent_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f"
    assert fsutil.write_atomically(target, b"first", exclusive=True) is True
    assert fsutil.write_atomically(target, b"second", exclusive=True) is False
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_function_writes_the_content_in_pieces(tmp_path: Path) -> None:
    target = tmp_path / "f"

    def pieces(f: IO[bytes]) -> None:
        for n in range(3):
            f.write(bytes([n]) * 1000)

    fsutil.write_atomically(target, pieces, mode=None)
    assert target.read_bytes() == b"\x00" * 1000 + b"\x01" * 1000 + b"\x02" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_function_that_fails_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def broken(f: IO[bytes]) -> None:
        f.write(b"half")
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError):
        fsutil.write_atomically(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_name_as_long_as_the_file_system_allows_is_written(tmp_path: Path) -> None:
    target = tmp_path / ("n" * 255)
    fsutil.write_atomically(target, b"x")
    assert target.read_bytes() == b"x"


def test_concurrent_writers_of_one_name_never_mix(tmp_path: Path) -> None:
    """Each writer has its own temporary file (a random part, O_EXCL): the target is always one
    writer's whole content, as for two hosts writing one object on a shared mount."""
    import concurrent.futures

    target = tmp_path / "f"
    contents = [bytes([n]) * 200_000 for n in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: fsutil.write_atomically(target, c, sync=False), contents * 4))
    assert target.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_move_copies_across_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, destination = tmp_path / "s", tmp_path / "d"
    source.write_bytes(b"data")
    real = Path.replace

    def cross_device(self: Path, target: Path) -> Path:
        if self == source:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(self), str(target))
        return real(self, target)

    monkeypatch.setattr(Path, "replace", cross_device)
    fsutil.move(source, destination)
    assert destination.read_bytes() == b"data" and not source.exists()
    assert mode_of(destination) == 0o600


def test_fsync_dir_names_the_directory(tmp_path: Path) -> None:
    fsutil.fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        fsutil.fsync_dir(tmp_path / "gone")
    assert caught.value.filename == str(tmp_path / "gone")


def test_fsync_dir_error_without_a_name_gets_the_directorys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError) as caught:
        fsutil.fsync_dir(tmp_path)
    assert caught.value.errno == errno.EIO and caught.value.filename == str(tmp_path)


def test_write_all_writes_what_a_short_write_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:3]))
    target = tmp_path / "f"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fsutil.write_all(fd, b"0123456789")
    finally:
        os.close(fd)
    assert target.read_bytes() == b"0123456789"


@pytest.mark.parametrize(
    ("raised", "replacing", "named"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), False, "/the/file"),
        (OSError(errno.ENOENT, "No such file or directory", "/other"), False, "/other"),
        (OSError(errno.ENOENT, "No such file or directory", "/tmp-name"), True, "/the/file"),
    ],
)
def test_naming(raised: OSError, replacing: bool, named: str) -> None:
    with pytest.raises(OSError) as caught, fsutil.naming(Path("/the/file"), replacing=replacing):
        raise raised
    assert caught.value.filename == named
    assert caught.value.errno == raised.errno
    assert type(caught.value) is type(raised)


def test_naming_keeps_the_subclass_and_leaves_an_error_without_errno_alone() -> None:
    with pytest.raises(FileNotFoundError), fsutil.naming(Path("/the/file"), replacing=True):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/tmp-name")
    plain = OSError("no errno")
    with pytest.raises(OSError) as caught, fsutil.naming(Path("/the/file")):
        raise plain
    assert caught.value is plain
