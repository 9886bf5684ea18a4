"""A TCP proxy in front of a real server, to give a client a real outage of a few seconds.

``TcpProxy(upstream_port)`` listens on its own loopback port and forwards every connection to
the upstream server. ``cut_once(marker, after_bytes, outage_s)`` arms one outage: on the first
connection whose client sends ``marker`` (e.g. part of a request line), the proxy lets
``after_bytes`` of the answer through, then resets every connection and stops listening, so new
connections are refused, for ``outage_s`` seconds, after which it listens on the same port again.
To the client this is the server going away mid-response and coming back.

``hold()`` keeps every byte received from then on, in both directions, until ``release()``: a
client whose request is under way stays inside it, as one on a hung network or host would.
``s3_proxy`` (function) is one in front of the session's moto server, closed after the test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from devrig.moto import MotoServer
from devrig.procs import free_port

_CHUNK = 64 * 1024


@dataclass
class _Outage:
    marker: bytes
    after_bytes: int
    seconds: float


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.armed = False
        self.answered = 0

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.cuts = 0
        self.outage_over = threading.Event()
        self._upstream_port = upstream_port
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._outage: _Outage | None = None
        self._reopened = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._listener = self._listen()
        threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_once(self, marker: bytes, after_bytes: int, outage_s: float) -> None:
        self._outage = _Outage(marker, after_bytes, outage_s)

    def hold(self) -> None:
        """Forward nothing more, either way, until ``release()``; connections stay open."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._close_listener()
        self._reopened.set()
        self._drop_links()
        self._flowing.set()  # held pumps find their links closed and end, forwarding nothing

    # --- internals -------------------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        return listener

    def _close_listener(self) -> None:
        # shutdown() wakes a thread blocked in accept(); close() alone does not on Linux.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                self._reopened.wait()  # an outage (or close): wait for the listener to return
                self._reopened.clear()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            except OSError:
                client.close()
                continue
            link = _Link(client, upstream)
            with self._lock:
                self._links.add(link)
            threading.Thread(target=self._pump_up, args=(link,), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(link,), daemon=True).start()

    def _pump_up(self, link: _Link) -> None:
        with contextlib.suppress(OSError):
            while data := link.client.recv(_CHUNK):
                self._flowing.wait()
                outage = self._outage
                if outage is not None and outage.marker in data:
                    link.armed = True
                link.upstream.sendall(data)
        self._forget(link)

    def _pump_down(self, link: _Link) -> None:
        with contextlib.suppress(OSError):
            while data := link.upstream.recv(_CHUNK):
                self._flowing.wait()
                outage = self._outage
                if link.armed and outage is not None:
                    room = outage.after_bytes - link.answered
                    if room <= len(data):
                        link.client.sendall(data[: max(room, 0)])
                        self._start_outage(outage)
                        return
                    link.answered += len(data)
                link.client.sendall(data)
        self._forget(link)

    def _forget(self, link: _Link) -> None:
        link.close()
        with self._lock:
            self._links.discard(link)

    def _start_outage(self, outage: _Outage) -> None:
        self._outage = None  # once
        self.cuts += 1
        self._close_listener()
        self._drop_links()
        timer = threading.Timer(outage.seconds, self._reopen)
        timer.daemon = True
        timer.start()

    def _drop_links(self) -> None:
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.close()

    def _reopen(self) -> None:
        if self._closed:
            return
        self._listener = self._listen()
        self._reopened.set()
        self.outage_over.set()


@pytest.fixture
def s3_proxy(moto_server: MotoServer) -> Iterator[TcpProxy]:
    proxy = TcpProxy(int(moto_server.endpoint.rsplit(":", 1)[1]))
    try:
        yield proxy
    finally:
        proxy.close()
