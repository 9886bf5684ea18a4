"""Detached helper processes of the WAL commands: starting one, and making sure only one runs.

PostgreSQL runs archive_command and restore_command one file at a time, and each call is a new
process. To keep up with a busy server a call starts a helper that keeps working after the call
has returned (pgBackRest's async archive-push and archive-get do the same): the WAL pusher
(``coordinator.wal.push.helper``) and the WAL prefetcher (``coordinator.wal.fetch.helper``). A
helper

- runs in its own session, so the signals PostgreSQL sends its own children at shutdown do not
  cut an upload short, and its output goes to a log file in the spool, not to PostgreSQL's log;
- gets its settings as JSON on stdin, never on its command line: ``ps`` and Flower must not
  show a passphrase or a key path given on the caller's command line (the environment, where
  credentials live, is inherited as usual and is readable only by the same user);
- holds an exclusive ``flock`` on a lock file for its whole life. The kernel drops the lock when
  the process ends, however it ends, so "is a helper running" never reads a stale pid file.

This module is imported on the fast path of every WAL call: standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from coordinator.helperlock import lock_held

# A helper's log is rotated (one old generation kept) when it passes this size at start-up.
LOG_ROTATE_BYTES = 4 * 1024 * 1024


def make_spool_dir(root: Path, directory: Path | None = None) -> None:
    """Create a spool's ``root`` (and ``directory`` inside it), never what holds the spool.

    A spool lives in pg_wal (or ``--spool-dir``). A detached helper can outlive its data
    directory (the server stopped, PGDATA removed): it must not bring pg_wal back, which would
    leave the operator a directory that is "not empty" for the next restore. The missing
    parent raises ``FileNotFoundError`` naming it instead (exit 16), which ends the helper.
    """
    try:
        root.mkdir(mode=0o700, exist_ok=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            exc.errno, f"cannot create spool directory '{root}': its parent does not exist",
            str(root.parent),
        ) from None
    if directory is not None and directory != root:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)


class HelperLock:
    """An exclusive, non-blocking ``flock`` on ``path``, held until ``release`` or exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        make_spool_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        # For the operator (and tests): which process holds it. Never trusted for liveness.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def helper_pid(lock_path: Path) -> int | None:
    """The pid of the helper holding ``lock_path``, None if none holds it."""
    if not helper_running(lock_path):
        return None
    try:
        return int(lock_path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def helper_running(lock_path: Path) -> bool:
    """Whether a helper holds ``lock_path`` right now."""
    return lock_held(lock_path)


def spawn_helper(
    module: str, settings: Mapping[str, object], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``python -m module`` detached, with ``settings`` on its stdin.

    Returns once the settings are written; never waits for the helper. The caller may
    ``poll()`` it while it lives; when the caller exits, the helper is reparented.
    """
    make_spool_dir(log_path.parent)
    _rotate(log_path)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = subprocess.Popen(  # our own interpreter and module
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log_fd)
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # the helper found another one running
        process.stdin.write(json.dumps(settings).encode())
        process.stdin.close()
    return process


def read_payload() -> dict[str, object]:
    """In the helper: what its caller wrote on stdin (its settings, as
    ``coordinator.settings.settings_to_json`` wrote them, under ``"settings"``, and the job)."""
    payload = json.loads(sys.stdin.buffer.read() or b"{}")
    if not isinstance(payload, dict) or not isinstance(payload.get("settings"), dict):
        raise SystemExit("helper settings on stdin are not a JSON object with 'settings'")
    return payload


def _rotate(log_path: Path) -> None:
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > LOG_ROTATE_BYTES:
            log_path.replace(log_path.with_name(log_path.name + ".1"))
