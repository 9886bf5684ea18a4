"""coordinator.runner: units of work in threads of this process, as commands see them through the
Runner interface (the Celery side is tested against real workers in tests/coordinator/broker)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from coordinator.runner import EmbeddedRunner, run
from coordinator.wait import wait_until
from storage.base import Storage
from storage.errors import StorageUnreachable
from tests.coordinator.conftest import overdue
from workers.backup import UNITS as BACKUP_UNITS
from workers.backup import (
    BackupRef,
    ClaimRequest,
    OpenArchiveRequest,
    UploadPartRequest,
    UploadPartResult,
)
from workers.staging import Stage
from workers.verify import UNITS as VERIFY_UNITS
from workers.wal import UNITS as WAL_UNITS


def test_a_part_is_uploaded_from_the_stage_and_answered_in_json_form(store: Storage) -> None:
    runner = EmbeddedRunner(store, BACKUP_UNITS, threads=2, overdue=overdue)
    upload_id = run(runner, "cloud_dump.open_archive", OpenArchiveRequest(key="b/base.tar"), "k")
    data = b"x" * 1000
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    request = UploadPartRequest(key="b/base.tar", upload_id=upload_id, part_number=1,
                                size=len(data), sha256=sha, ref="r1")  # fmt: skip
    answer = run(runner, "cloud_dump.upload_part", request, "part 1", {"r1": data})
    assert isinstance(answer, dict)  # as a worker's answer arrives through Celery
    assert UploadPartResult.model_validate(answer).size == len(data)
    with pytest.raises(Exception, match="r1"):
        runner.stage.get("r1")  # released with its unit


def test_a_units_error_is_raised_by_its_result(store: Storage) -> None:
    runner = EmbeddedRunner(store, BACKUP_UNITS, threads=1, overdue=overdue)
    claim = ClaimRequest(backup=BackupRef(name="b1"), run_id="r1", host="h", started_at="t")
    run(runner, "cloud_dump.claim_backup", claim, "claim")
    with pytest.raises(Exception, match="b1"):  # the name is taken
        run(runner, "cloud_dump.claim_backup", claim.model_copy(update={"run_id": "r2"}), "c")


def _units(gate: threading.Event, ran: list[str]) -> dict[str, Any]:
    def blocking(storage: Storage, stage: Stage, request: Any) -> str:
        ran.append(request.key)
        gate.wait(30)
        return str(request.key)

    return {"slow": blocking}


def test_a_unit_unanswered_in_its_time_is_overdue(store: Storage) -> None:
    gate, ran = threading.Event(), list[str]()
    runner = EmbeddedRunner(store, _units(gate, ran), threads=1, overdue=overdue)
    try:
        handle = runner.start("slow", OpenArchiveRequest(key="a"), "unit a", timeout_s=0.05)
        assert wait_until(handle.done, timeout_s=10, first_s=0.01)
        with pytest.raises(StorageUnreachable, match="unit a overdue"):
            handle.result()
    finally:
        gate.set()


def test_shorten_brings_the_deadline_forward_never_back(store: Storage) -> None:
    gate, ran = threading.Event(), list[str]()
    runner = EmbeddedRunner(store, _units(gate, ran), threads=1, overdue=overdue)
    try:
        handle = runner.start("slow", OpenArchiveRequest(key="a"), "unit a", timeout_s=0.05)
        handle.shorten(3600)  # later than its own timeout: no effect
        assert wait_until(handle.done, timeout_s=10, first_s=0.01)
        other = runner.start("slow", OpenArchiveRequest(key="b"), "unit b", timeout_s=3600)
        other.shorten(0)
        assert other.done()
    finally:
        gate.set()


def test_the_runners_deadline_bounds_every_unit(store: Storage) -> None:
    import time

    gate, ran = threading.Event(), list[str]()
    runner = EmbeddedRunner(store, _units(gate, ran), threads=1, overdue=overdue,
                            deadline=time.monotonic() + 0.05)  # fmt: skip
    try:
        handle = runner.start("slow", OpenArchiveRequest(key="a"), "unit a", timeout_s=3600)
        assert wait_until(handle.done, timeout_s=10, first_s=0.01)
        with pytest.raises(StorageUnreachable):
            handle.result()
    finally:
        gate.set()


def test_a_released_unit_that_waits_for_a_thread_never_runs(store: Storage) -> None:
    gate, ran = threading.Event(), list[str]()
    runner = EmbeddedRunner(store, _units(gate, ran), threads=1, overdue=overdue)
    first = runner.start("slow", OpenArchiveRequest(key="first"), "first")
    assert wait_until(lambda: ran == ["first"], timeout_s=10, first_s=0.01)
    second = runner.start("slow", OpenArchiveRequest(key="second"), "second", {"p": b"x"})
    runner.release([second])
    gate.set()
    assert wait_until(first.done, timeout_s=10, first_s=0.01)
    runner.close()  # waits for the unit running, which let the second one through the gate
    assert ran == ["first"]
    with pytest.raises(Exception, match="p"):
        runner.stage.get("p")


def test_the_units_are_the_celery_tasks_of_the_same_names() -> None:
    """A name the embedded runner knows is a task the workers run, and the other way round
    for every task of the backup, the WAL archive and verify --deep."""
    from tasks.app import app

    app.loader.import_default_modules()  # the task modules the workers load
    registered = {name for name in app.tasks if name.startswith("cloud_dump.")}
    units = set(BACKUP_UNITS) | set(WAL_UNITS) | set(VERIFY_UNITS)
    assert units <= registered
    assert registered - units == {"cloud_dump.ping_storage"}
