"""A running backup's sign of life: its claim's ``heartbeat_at``, rewritten every few seconds.

``cloud-dump cleanup`` removes the claim, uploads and objects of a backup whose coordinator
died (SIGKILL, a lost host): it knows one from a backup that is merely long by this heartbeat,
never by the backup's age. The heartbeat runs in a thread of the coordinator from the claim
until just before finalize or abort, and each beat is one unit of work (``workers.backup.
heartbeat_backup``), so it reaches the store the same way as the backup's parts. A beat that
fails is logged and the next one tried: it is a hint for cleanup, and the backup must not
fail because the store was slow to take one.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from coordinator.backup.work import BackupWork
from workers.backup import BackupRef, HeartbeatRequest

log = logging.getLogger(__name__)


class Heartbeat:
    """Beats every ``every_s`` seconds from ``start()`` until ``stop()`` (which waits for a beat
    in flight, so that none lands after finalize or abort removed the claim)."""

    def __init__(self, work: BackupWork, backup: BackupRef, run_id: str, every_s: float) -> None:
        self._work = work
        self._backup = backup
        self._run_id = run_id
        self._every_s = every_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._every_s):
            request = HeartbeatRequest(backup=self._backup, run_id=self._run_id,
                                       at=datetime.now(UTC).isoformat())  # fmt: skip
            try:
                if not self._work.heartbeat(request, timeout_s=self._every_s):
                    log.warning("backup '%s': its claim is gone or another run's; no more "
                                "heartbeats", self._backup.name)  # fmt: skip
                    return
            except Exception as exc:  # a hint for cleanup: never fails the backup
                log.warning("backup '%s': heartbeat not stored (%s); trying again in %.0f s",
                            self._backup.name, exc, self._every_s)  # fmt: skip
