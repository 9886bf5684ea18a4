"""Payloads to deliver with the next task message this thread publishes (one Redis
transaction, ``tasks.redistransport.ClientChannel``): what the coordinator's ``Broker.send``
hands the transport underneath Celery and kombu, whose publishing API has no room for it.

A context variable, so each sending thread has its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class StagedWithMessage:
    """Payloads (Redis key → bytes, expiring after ``ttl_s``) for the next message this thread
    publishes; ``delivered`` once they were stored with it."""

    payloads: Mapping[str, bytes]
    ttl_s: int
    delivered: bool = False


_STAGED: ContextVar[StagedWithMessage | None] = ContextVar("cloud_dump_staged", default=None)


@contextmanager
def staged_with_message(payloads: Mapping[str, bytes], ttl_s: int) -> Iterator[StagedWithMessage]:
    """Within: a message this thread publishes through a ``ClientChannel`` is delivered in one
    transaction with ``payloads`` (Redis key → bytes) stored. The caller checks ``delivered``:
    another transport publishes the message alone."""
    staged = StagedWithMessage(payloads, ttl_s)
    token = _STAGED.set(staged)
    try:
        yield staged
    finally:
        _STAGED.reset(token)


def staged_for_next_message() -> StagedWithMessage | None:
    """What ``staged_with_message`` set in this thread, if anything."""
    return _STAGED.get()
