"""PartWindow giving up: a backup's abort must not wait on what a stopped worker holds.

Real parts through the in-process runner on a local store; the one thing no store can be made
to do on demand, an upload whose opening is never answered (its worker stopped), is a Future
left unresolved.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from coordinator.backup.window import PartWindow
from coordinator.backup.work import BackupWork
from coordinator.runner import EmbeddedRunner
from devrig.moto import local_target
from storage.errors import StorageUnreachable
from workers.backup import UNITS


def test_abandon_does_not_wait_for_an_upload_still_being_opened(tmp_path: Path) -> None:
    storage = local_target(tmp_path / "store").open()
    runner = EmbeddedRunner(storage, UNITS, threads=2, overdue=StorageUnreachable)
    window = PartWindow(BackupWork(runner, 600.0), max_in_flight=4, run_id="r1")
    never_opened: Future[str] = Future()  # its worker was stopped (SIGSTOP) mid-answer
    data = b"x" * 1024
    window.submit("b1/base.tar", never_opened, 1, data, hashlib.sha256(data).hexdigest())

    abandoning = threading.Thread(target=window.abandon, daemon=True)
    abandoning.start()
    abandoning.join(timeout=60)  # a bound only to fail rather than hang
    assert not abandoning.is_alive(), "abandon waited for the upload's opening"
    with pytest.raises(Exception, match="abandoned"):
        window.submit("b1/base.tar", never_opened, 2, data, hashlib.sha256(data).hexdigest())
    runner.close()
