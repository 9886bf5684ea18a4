"""WriteBehind: jobs run in order on its thread, errors come back to the caller's thread, and
nothing is written after abandon() returns."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

from coordinator.restore.writebehind import WriteBehind
from storage.errors import IntegrityError


def _taken() -> NoReturn:
    raise IntegrityError("name taken")


def test_files_are_written_in_order_and_a_link_follows_its_file(tmp_path: Path) -> None:
    with WriteBehind(max_jobs=2) as writer:  # a small queue: the caller waits for the thread
        writer.open(tmp_path / "a", 0o640, _taken)
        for i in range(50):
            writer.write(bytes([i]) * 1000)
        writer.finish()
        writer.call(lambda: os.link(tmp_path / "a", tmp_path / "b"))
    assert (tmp_path / "a").read_bytes() == b"".join(bytes([i]) * 1000 for i in range(50))
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640  # exactly, whatever the umask
    assert (tmp_path / "b").stat().st_ino == (tmp_path / "a").stat().st_ino


def test_an_existing_name_raises_the_callers_error_at_flush(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"old")
    writer = WriteBehind()
    writer.open(tmp_path / "a", 0o600, _taken)
    writer.write(b"new")
    writer.finish()
    with pytest.raises(IntegrityError, match="name taken"):
        writer.flush()
    writer.abandon()
    assert (tmp_path / "a").read_bytes() == b"old"


def test_a_write_error_names_the_file_and_later_jobs_are_skipped(tmp_path: Path) -> None:
    writer = WriteBehind()
    writer.open(tmp_path / "missing-dir" / "a", 0o600, _taken)
    writer.call(lambda: (tmp_path / "after").write_bytes(b"x"))
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        writer.flush()
    writer.abandon()
    assert not (tmp_path / "after").exists()


def test_abandon_skips_what_is_queued(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), WriteBehind() as writer:
        writer.call(lambda: (tmp_path / "first").write_bytes(b"x"))
        writer.flush()
        writer.open(tmp_path / "a", 0o600, _taken)
        raise RuntimeError("the caller failed")
    # After abandon returned, the thread is gone: whatever it did is done, nothing comes later.
    assert (tmp_path / "first").exists()
    assert not writer._thread.is_alive()


@pytest.mark.timeout(60)  # without the fix, flush() waited forever for a thread that had died
def test_a_close_failing_after_an_error_does_not_stop_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mock: close(2) failing (NFS reports write-back errors there) is not something a local
    # file system produces. The fd is really closed; only the file under test's close fails.
    victim = str(tmp_path / "a")
    real_close = os.close

    def failing_close(fd: int) -> None:
        try:
            target = str(Path(f"/proc/self/fd/{fd}").readlink())
        except OSError:
            target = ""
        real_close(fd)
        if target == victim:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "close", failing_close)
    writer = WriteBehind()
    writer.open(tmp_path / "a", 0o600, _taken)
    writer.write(b"data")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    writer.call(fail)  # the file is still open: the error path closes it, and that fails too
    writer.finish()
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    writer.abandon()
    assert not writer._thread.is_alive()
