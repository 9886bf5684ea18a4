"""What a running backup tells its operator: a live line on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)

_LOG_EVERY_S = 10.0
_REDRAW_EVERY_S = 0.25


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


class Progress:
    def __init__(self, interactive: bool) -> None:
        self._interactive = interactive and sys.stderr.isatty()
        self._started = time.monotonic()
        self._last_shown = 0.0
        self._archive = ""
        self._streamed = 0
        self._total: int | None = None
        self._stored = 0

    def begin_archive(self, name: str) -> None:
        self._archive = name
        log.info("streaming archive '%s'", name)

    def streamed(self, done_bytes: int, total_bytes: int | None) -> None:
        self._streamed, self._total = done_bytes, total_bytes
        self._show()

    def stored(self, size: int) -> None:
        self._stored += size
        self._show()

    def finish(self, stored_bytes: int, redispatched: int) -> None:
        if self._interactive:
            sys.stderr.write("\n")
        elapsed = time.monotonic() - self._started
        rate = self._streamed / elapsed / 1e6 if elapsed > 0 else 0.0
        log.info(
            "streamed %s in %.1f s (%.0f MB/s), stored %s%s",
            _mib(self._streamed),
            elapsed,
            rate,
            _mib(stored_bytes),
            f", {redispatched} task(s) sent again" if redispatched else "",
        )

    def _show(self) -> None:
        now = time.monotonic()
        every = _REDRAW_EVERY_S if self._interactive else _LOG_EVERY_S
        if now - self._last_shown < every:
            return
        self._last_shown = now
        total = f" of ~{_mib(self._total)}" if self._total else ""
        rate = self._streamed / max(now - self._started, 1e-6) / 1e6
        line = (
            f"{self._archive}: streamed {_mib(self._streamed)}{total}, "
            f"stored {_mib(self._stored)}, {rate:.0f} MB/s"
        )
        if self._interactive:
            sys.stderr.write("\r" + line.ljust(79))
            sys.stderr.flush()
        else:
            log.info("%s", line)
