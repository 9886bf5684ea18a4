"""Starting and stopping the real servers the tests use: free ports, readiness, stop by PID.

Every server is our own child process: we stop only what we started, by the PID we got, first
politely (SIGTERM) and then for sure (SIGKILL). Output goes to a log file whose tail is put into
the failure message when a server does not come up, so a fixture that cannot start its server
fails with the reason instead of skipping. ``children`` (function) is the list of other processes
a test starts: any still running at its end (a failed test) is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from coordinator import wait


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerProcess:
    """A child process with a log file; ``stop()`` ends it and its process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        # A new session so that stop() can signal the whole group (celery's pool children too).
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_until(self, ready: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Poll ``ready`` until it holds; fail the test with the log tail if it never does."""

        def alive_and_ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with status {self.proc.returncode} before it was "
                    f"ready; log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            return ready()

        if wait.wait_until(alive_and_ready, timeout_s=timeout_s, first_s=0.1):
            return
        self.stop()
        pytest.fail(
            f"{self.name} was not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
            f"{log_tail(self.log_path)}"
        )

    def kill_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.kill_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_group(signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        else:
            # The leader is gone, but children in its group may linger (celery pool workers).
            self.kill_group(signal.SIGKILL)
        self._log.close()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; any still running at its end (a failed test) is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
