"""A TCP proxy that delays every byte by a fixed time each way: a broker far from the database host.

``python -I bench/delayproxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS`` listens on
127.0.0.1:LISTEN_PORT and forwards each connection to 127.0.0.1:UPSTREAM_PORT. Every chunk read
from one side is written to the other at its arrival time + DELAY_MS, in order, and nothing else
limits the flow: the reader keeps reading while earlier chunks wait, so the delay adds latency (a
round trip of 2 x DELAY_MS) without capping bandwidth, as a long network path with room to spare
does. An end
of stream is passed on after the same delay; a reset or error on either side closes both.

Standard library only (asyncio), so that it starts in a few MB and adds no import to measure.
Run by ``bench/backup.py`` (its 50 ms broker case) as its own process, so that its CPU seconds
can be read apart from the benchmark's. It stops on SIGTERM or SIGINT.

``devrig/tcpproxy.py`` (the tests' proxy: outages, holds) is left as it is: it forwards without
delay and the tests rely on that.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

# Large reads: the backup stages its part payloads in Redis through this proxy, and fewer, larger
# chunks cost less CPU on the machine the backup is measured on. A read returns what has arrived,
# so small messages (commands, replies) are not held back to fill it.
_CHUNK = 1024 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay_s`` after it arrived; then pass on EOF."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def forward() -> None:
        while True:
            due, data = await queue.get()
            pause = due - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            if not data:  # end of stream, delayed like the bytes before it
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(forward())
    try:
        while data := await reader.read(_CHUNK):
            queue.put_nowait((loop.time() + delay_s, data))
            if sender.done():  # the other side went away: stop reading
                break
        queue.put_nowait((loop.time() + delay_s, b""))
        await sender
    finally:
        sender.cancel()


async def _link(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_port: int,
    delay_s: float,
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        client_writer.close()
        return
    pipes = [
        asyncio.create_task(_pipe(client_reader, upstream_writer, delay_s)),
        asyncio.create_task(_pipe(upstream_reader, client_writer, delay_s)),
    ]
    try:
        # Both directions run until each has passed on its EOF; an error in one ends both.
        _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
    finally:
        for writer in (client_writer, upstream_writer):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        for task in pipes:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a reset link is not an error of the proxy


async def serve(listen_port: int, upstream_port: int, delay_s: float) -> None:
    """Accept connections on 127.0.0.1:``listen_port`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(
        lambda r, w: _link(r, w, upstream_port, delay_s), "127.0.0.1", listen_port
    )
    print(f"delaying 127.0.0.1:{listen_port} -> 127.0.0.1:{upstream_port} by "
          f"{delay_s * 1000:g} ms each way", flush=True)  # fmt: skip
    await stop.wait()
    # Not ``async with server``: from Python 3.12 its exit waits for every connection to close,
    # and a client's idle connections would keep it. asyncio.run cancels the links on return.
    server.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: delayproxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS", file=sys.stderr)
        return 2
    listen_port, upstream_port, delay_ms = int(argv[0]), int(argv[1]), float(argv[2])
    asyncio.run(serve(listen_port, upstream_port, delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
