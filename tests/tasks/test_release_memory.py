"""tasks.app gives the heap's free memory back around every task but a WAL push, and after
WAL pushes once the worker is idle (coordinator.malloc: why)."""

from __future__ import annotations

import threading

import pytest

import tasks.app
import tasks.backup
import tasks.wal


def test_workers_release_around_every_task_but_a_wal_push(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert tasks.backup and tasks.wal  # imported: they register the tasks
    released = threading.Semaphore(0)
    count: list[str] = []

    def release() -> None:
        count.append("x")
        released.release()

    monkeypatch.setattr(tasks.app, "release_free_memory", release)
    monkeypatch.setattr(tasks.app, "IDLE_RELEASE_S", 3600)
    push = tasks.app.app.tasks["cloud_dump.push_wal"]
    tasks.app._before_task(sender=push)
    tasks.app._after_task(sender=push)
    tasks.app._before_task(sender=push)  # the next push comes before the idle release
    assert count == []
    monkeypatch.setattr(tasks.app, "IDLE_RELEASE_S", 0.05)
    tasks.app._after_task(sender=push)
    assert released.acquire(timeout=10)  # idle: released once
    assert count == ["x"]
    for name in ("cloud_dump.upload_part", "cloud_dump.finalize_backup"):
        tasks.app._before_task(sender=tasks.app.app.tasks[name])
        tasks.app._after_task(sender=tasks.app.app.tasks[name])
    assert count == ["x"] * 5
