"""sync_file_range and syncfs through ctypes, on this machine's real kernel and file system."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from storage.kernelsync import start_writeback, sync_filesystem


def test_start_writeback_on_a_written_file_and_on_a_pipe(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 1_000_000)
        start_writeback(fd, 0, 500_000)
        start_writeback(fd, 500_000, 0)  # 0: to the end of the file
    finally:
        os.close(fd)
    read_end, write_end = os.pipe()
    try:
        start_writeback(write_end, 0, 0)  # ESPIPE: nothing to write back, not an error
    finally:
        os.close(read_end)
        os.close(write_end)
    assert (tmp_path / "f").stat().st_size == 1_000_000


def test_a_closed_descriptor_is_an_error_not_a_silent_success(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    sync_filesystem(fd)
    os.close(fd)
    with pytest.raises(OSError) as raised:
        sync_filesystem(fd)
    assert raised.value.errno == errno.EBADF
    with pytest.raises(OSError) as raised:
        start_writeback(fd, 0, 0)
    assert raised.value.errno == errno.EBADF
