"""Which storage a unit of work is for: the location a request carries, checked by the worker.

With a broker the coordinator needs no storage of its own: the workers hold it. But a
coordinator that *was* told a storage (``--storage``, ``CLOUD_DUMP_STORAGE`` or ``--config``)
must not have its work land somewhere else without a word. So every request it sends carries
that location (``storage_url``: the URL as ``Storage.url`` spells it, never a credential or an
endpoint), and a worker whose own storage is elsewhere refuses the request before touching
anything (``StorageMismatch``, exit 3 on the coordinator's command line).

Locations are compared as the stores report them (``Storage.url``, normalised by
``storage.factory.storage_url``), never by endpoint: workers may reach the same bucket through
another endpoint than the coordinator's (a gateway, an internal address).
"""

from __future__ import annotations

from pydantic import BaseModel

from storage.base import Storage
from storage.errors import StorageMismatch
from storage.redact import redact_url
from storage.urls import storage_url


class StorageBound(BaseModel):
    """A request for work on storage. ``storage_url``: where the sender was told the work goes;
    None: wherever the worker's storage is (the sender was told no storage)."""

    storage_url: str | None = None

    def facts(self) -> dict[str, object]:
        """The facts naming this unit of work, for people: backup, archive, part, WAL file,
        sizes. Each request says its own; never a secret (none is in a request)."""
        return {}

    def summary(self) -> str:
        """``key=value`` words of ``facts()`` and the storage location, e.g. ``backup=nightly
        archive=base.tar.zst part=12 bytes=16777216``: what Flower shows as the task's
        arguments (Celery's ``argsrepr``) instead of the raw request."""
        facts = self.facts()
        if self.storage_url is not None:
            facts["storage"] = redact_url(self.storage_url)
        return " ".join(f"{name}={value}" for name, value in facts.items())


def require_location(storage: Storage, expected: str | None, worker: str) -> None:
    """Raise ``StorageMismatch`` naming both locations unless ``storage`` is at ``expected``."""
    if expected is None:
        return
    wanted = storage_url(expected)
    if storage.url != wanted:
        raise StorageMismatch(
            f"worker '{worker}' stores in '{storage.url}', not in '{wanted}' as this command "
            "was told (--storage, CLOUD_DUMP_STORAGE or --config): refused, nothing stored; "
            "tell this command the workers' storage, or none"
        )
