"""What a failing broker looks like to cloud-dump: the one translation of its errors.

The broker is Redis, reached three ways: kombu (task messages), redis-py (staged payloads, task
results) and Celery's control commands (which workers are alive). Each library reports a lost
connection in its own exception type; ``broker_faults`` turns every one of them into
``BrokerUnreachable``, one lower-case line naming the broker with its password hidden, raised
``from`` the original. Every broker call of the coordinator and the Redis stage of the workers
goes through it, so that "the broker went away" always reads (and exits) the same way.

Imports of redis and kombu are lazy: the embedded (no broker) path never loads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from storage.errors import BrokerUnreachable
from storage.redact import redact_url


def fault_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the broker is unreachable or not serving right now"."""
    from kombu.exceptions import OperationalError
    from redis import exceptions as redis_errors

    return (
        OSError,
        OperationalError,  # kombu: publishing or connecting failed after its own retries
        redis_errors.ConnectionError,  # also a wrong password, and "LOADING" after a restart
        redis_errors.TimeoutError,
        # A failover in progress: the address now leads to a replica, or one without a master.
        redis_errors.ReadOnlyError,
        redis_errors.MasterDownError,
        # Something that is not Redis answers at the address (an HTTP server, a proxy): as
        # unreachable as no server at all, not an unexpected error (exit 1).
        redis_errors.InvalidResponse,
    )


def is_broker_fault(exc: BaseException) -> bool:
    return isinstance(exc, fault_types())


def is_library_broker_fault(exc: BaseException) -> bool:
    """A broker fault in redis-py's or kombu's own exception types, not a bare ``OSError``
    (which storage raises too): what a task fails with when Celery itself lost the broker on
    the worker, e.g. while storing the task's STARTED state, before any code of ours ran."""
    return is_broker_fault(exc) and type(exc).__module__.split(".")[0] in ("redis", "kombu")


def broker_unreachable(url: str, exc: BaseException) -> BrokerUnreachable:
    """``exc`` (one of ``fault_types``) as the project's error, naming the broker at ``url``."""
    error = BrokerUnreachable(f"cannot reach broker '{redact_url(url)}': {_reason(exc, url)}")
    error.__cause__ = exc
    return error


@contextmanager
def broker_faults(url: str) -> Iterator[None]:
    """Run a broker call: its connection failures leave as ``BrokerUnreachable``."""
    try:
        yield
    except BrokerUnreachable:
        raise
    except Exception as exc:
        if is_broker_fault(exc):
            raise broker_unreachable(url, exc) from exc
        raise


def _reason(exc: BaseException, url: str) -> str:
    """The most specific cause, lower case (e.g. 'connection refused'): the first system
    error in the chain of causes, else the innermost cause."""
    chain = [exc]
    while (inner := exc.__cause__ or exc.__context__) is not None and inner not in chain:
        chain.append(inner)
        exc = inner
    system = next((e for e in chain if getattr(e, "strerror", None)), None)
    text = getattr(system, "strerror", None) or str(exc) or type(exc).__name__
    reason = text.split("\n")[0].strip().rstrip(".").lower() or type(exc).__name__.lower()
    return _without_password(reason, url)


def _without_password(text: str, url: str) -> str:
    # Libraries do not print passwords, but a message must not depend on that.
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    if password:
        text = text.replace(password.lower(), "***").replace(password, "***")
    return text
