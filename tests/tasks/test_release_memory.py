"""tasks.app gives the heap's free memory back around every task but a WAL push
(coordinator.malloc: why)."""

from __future__ import annotations

import pytest

import tasks.app
import tasks.backup
import tasks.wal


def test_workers_release_around_every_task_but_a_wal_push(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert tasks.backup and tasks.wal  # imported: they register the tasks
    released: list[str] = []
    monkeypatch.setattr(tasks.app, "release_free_memory", lambda: released.append("x"))
    tasks.app._release_free_memory(sender=tasks.app.app.tasks["cloud_dump.push_wal"])
    assert released == []
    for name in ("cloud_dump.upload_part", "cloud_dump.finalize_backup"):
        tasks.app._release_free_memory(sender=tasks.app.app.tasks[name])
    assert released == ["x", "x"]
