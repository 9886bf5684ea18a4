"""What a running backup tells its operator: a live line on a terminal, log lines otherwise.

The line reads "base: streamed 39 MiB of ~23 MiB + WAL, sent 5 MiB, 120 MB/s".

- *streamed*: what the server has sent, before compression. Its own count (BASE_BACKUP's
  progress reports) arrives at most once a second; between reports, and in a backup shorter
  than a second, the bytes already sent to the uploads are a truer lower bound, so the larger
  of the two is shown.
- *of ~N MiB + WAL*: the server's estimate, the tablespace sizes of BASE_BACKUP's PROGRESS,
  covers the data directories only. The WAL that base.tar carries (from the backup's start to
  its end, at least one whole segment: 16 MiB by default) comes on top and is known only once
  it has been sent, so the streamed count passes the estimate by that much. pg_basebackup has
  the same gap (it raises its total to what it has received); here the estimate is shown as
  what it is.
- *sent*: bytes handed to the uploads (compressed, encrypted), confirmed or not; what storage
  holds is the "stored" of the summary at the end.
"""

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
        self._reported = 0  # the server's count
        self._total: int | None = None
        self._sent = 0

    @property
    def _streamed(self) -> int:
        return max(self._reported, self._sent)

    def begin_archive(self, name: str) -> None:
        self._archive = name
        log.info("streaming archive '%s'", name)

    def streamed(self, done_bytes: int, total_bytes: int | None) -> None:
        self._reported, self._total = done_bytes, total_bytes
        self._show()

    def stored(self, size: int) -> None:
        """``size`` more bytes handed to the uploads."""
        self._sent += size
        self._show()

    def finish(self, stored_bytes: int, redispatched: int) -> None:
        if self._interactive:
            self._show(force=True)  # the last redraw may be up to _REDRAW_EVERY_S old
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

    def line(self) -> str:
        """The progress line as it stands."""
        total = f" of ~{_mib(self._total)} + WAL" if self._total else ""
        rate = self._streamed / max(time.monotonic() - self._started, 1e-6) / 1e6
        return (
            f"{self._archive}: streamed {_mib(self._streamed)}{total}, "
            f"sent {_mib(self._sent)}, {rate:.0f} MB/s"
        )

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        every = _REDRAW_EVERY_S if self._interactive else _LOG_EVERY_S
        if now - self._last_shown < every and not force:
            return
        self._last_shown = now
        if self._interactive:
            sys.stderr.write("\r" + self.line().ljust(79))
            sys.stderr.flush()
        else:
            log.info("%s", self.line())
