"""kombu's Redis transport, its connections opened without redis-py 8's extra handshake.

Every connection kombu opens to a ``redis://`` broker (the coordinator's producers, the
workers' consumers) gets ``workers.staging.quiet_connection_kwargs``: RESP2, no ``CLIENT
SETINFO``, no maintenance notifications. Three to four round trips fewer per connection, which
a broker 50 ms away turns into 150-200 ms before a backup's first task is sent. Nothing else
of the transport changes. ``tasks.config.make_app`` selects it for ``redis://`` URLs only:
``rediss://`` keeps kombu's own transport, whose TLS set-up depends on the scheme's name.

``ClientTransport``, for the coordinator's commands, also leaves out kombu's ``PING`` as a
channel opens (``_ConnectsForPing``) and redis-py's health-check ``PING`` before a connection's
first command (``health_check_interval`` 0 on its connections only). A command's connections
are fresh and busy; the checks found nothing kombu's own error handling would not (kombu's
connections have no redis-py retry, so a failed check raises as the command would), and each
cost the first send a round trip. The workers keep them: kombu's periodic checks of their
long-lived pub/sub connection use the health check.

``ClientChannel`` also delivers a message in the same round trip as the payloads it refers to
(``tasks.stagedmessage``): ``SET`` of each payload and the message's ``LPUSH`` in one
``MULTI``/``EXEC``, so that a worker never finds the message without its payloads, and no
payload is left staged for a message that was not delivered. Staging first and publishing
after cost every part and the finalize a round trip more (50 ms with the broker 50 ms away).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from tasks.stagedmessage import staged_for_next_message
from workers.staging import quiet_connection_kwargs


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]
        params.update(quiet_connection_kwargs())
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


class _ConnectsForPing(redis.Redis):
    """A client whose ``ping`` opens a connection of its pool and sends nothing.

    kombu's channel "evaluates" its connection with a PING as it opens. A command's producer
    channel opens right before its first send, which finds out as much: its connection opens
    here (TCP, and ``AUTH``/``SELECT`` where the URL asks for them, so a wrong password still
    fails here), and the round trip of the PING, which the first send waited for with the
    broker far away, is left out.
    """

    def ping(self, **kwargs: Any) -> bool:
        pool = self.connection_pool
        pool.release(pool.get_connection())
        return True


class ClientChannel(Channel):
    def _get_client(self) -> Any:
        client = super()._get_client()  # type: ignore[no-untyped-call]
        # A callable (a key-prefixing client) is kombu's business: left as it is.
        return _ConnectsForPing if client is redis.Redis else client

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params = super()._connparams(asynchronous=asynchronous)
        if "health_check_interval" in params:  # kombu drops it for classes without it
            params["health_check_interval"] = 0
        return params

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """Deliver ``message`` to ``queue``: with the payloads of ``staged_with_message`` in
        one transaction when there are any, else as kombu does."""
        staged = staged_for_next_message()
        if not (staged and staged.payloads) or kwargs.get("_publish_batch") is not None or (
            self._expires and queue in self._expires
        ):
            super()._put(queue, message, **kwargs)  # type: ignore[no-untyped-call]
            return
        priority = self._get_message_priority(message, reverse=False)  # type: ignore[no-untyped-call]
        with self.conn_or_acquire() as client, client.pipeline(transaction=True) as pipe:
            for key, data in staged.payloads.items():
                pipe.set(key, data, ex=staged.ttl_s)
            pipe.lpush(self._q_for_pri(queue, priority), dumps(message))  # type: ignore[no-untyped-call]
            pipe.execute()
        staged.delivered = True


class ClientTransport(Transport):
    Channel = ClientChannel
