"""A backup's claim sent ahead (``BackupWork.send_claim``): the command sends it as soon as its
runner is open, while it imports the rest of itself. Its answer is read once by ``claim``; a
command that fails before its run starts withdraws it, so no name stays claimed by a run that
never began. A real local store through the embedded runner."""

from __future__ import annotations

import pytest

from coordinator.backup.work import BackupWork, new_claim
from coordinator.runner import EmbeddedRunner
from storage.base import Storage
from storage.errors import BackupExists
from tests.coordinator.conftest import overdue
from workers.backup import UNITS, BackupRef


def work_on(store: Storage) -> BackupWork:
    return BackupWork(EmbeddedRunner(store, UNITS, threads=2, overdue=overdue), 60.0)


def claims(store: Storage) -> list[str]:
    return [i.key for i in store.list("") if i.key.endswith("backup.claim")]


def test_a_claim_sent_ahead_is_answered_once_and_taken_once(store: Storage) -> None:
    work = work_on(store)
    request = new_claim(BackupRef(name="b1", cluster=None), 60.0)
    work.send_claim(request)
    assert "b1/backup.claim" in work.claim(request)
    assert claims(store) == ["b1/backup.claim"]
    # Another run's claim of the same name is refused, as without sending ahead.
    other = new_claim(BackupRef(name="b1", cluster=None), 60.0)
    work.send_claim(other)
    with pytest.raises(BackupExists):
        work.claim(other)
    work.close()


def test_a_withdrawn_claim_leaves_the_name_free(store: Storage) -> None:
    work = work_on(store)
    request = new_claim(BackupRef(name="b2", cluster=None), 60.0)
    work.send_claim(request)
    work.withdraw_claim()
    assert claims(store) == []
    work.withdraw_claim()  # nothing sent: nothing to do
    # The name can be claimed again.
    again = new_claim(BackupRef(name="b2", cluster=None), 60.0)
    assert "b2/backup.claim" in work.claim(again)
    work.close()


def test_withdrawing_a_refused_claim_leaves_the_holder_s_claim(store: Storage) -> None:
    work = work_on(store)
    holder = new_claim(BackupRef(name="b3", cluster=None), 60.0)
    work.claim(holder)
    late = new_claim(BackupRef(name="b3", cluster=None), 60.0)
    work.send_claim(late)
    work.withdraw_claim()
    assert claims(store) == ["b3/backup.claim"]
    assert holder.run_id in store.get("b3/backup.claim").decode()
    work.close()
