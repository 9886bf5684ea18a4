"""A wal-push call's wait for a running WAL pusher, before anything heavy is imported.

Under load most archive_command calls find the pusher already running and the file either
confirmed (``coordinator.cli.fastpath`` answers from the marker) or in flight: the call then
only has to ask for the file and wait for its marker. Doing that through the full CLI (argparse,
logging, settings) cost ~35 ms of CPU per call, a third of wal-push's CPU per GB next to
pgBackRest's async archive-push (bench-peers, prod WAL). This module does it with ``os`` and
``fcntl`` alone (``coordinator.helperlock``):

1. the file is a segment (other names go to the full CLI), no error is recorded for it, the
   pusher holds its lock, and the file exists;
2. the request is written (as ``Spool.request`` writes it: temp file, then a rename);
3. it waits, 1 ms growing to 20 ms between looks, as the full CLI does, until the marker
   answers for this very file: True, the call succeeded.

Anything else returns False and the full CLI takes over in the same process, where every case
is decided and reported: an error recorded for the file (the full CLI reports it rather than
clearing it, because ``asked_here`` says this call made the request), the pusher gone (it starts
another), or ``QUICK_WAIT_S`` spent (a slow store: the full CLI waits on, up to ``--timeout``).
Success still means what it means on the full path: the marker, which the pusher writes only
once storage confirmed the file.
"""

from __future__ import annotations

import os
import time

from coordinator.helperlock import lock_held
from coordinator.wal.push.marker import (
    ERROR_DIR,
    MARKER_DIR,
    PUSHER_LOCK,
    REQUEST_DIR,
    TMP_PREFIX,
    marker_answers,
)

# Longer waits are rare (a slow store, a full queue) and can afford the full CLI's start-up.
QUICK_WAIT_S = 10.0
_POLL_FIRST_S = 0.001
_POLL_FACTOR = 1.5
_POLL_MAX_S = 0.02

# Files this process asked the pusher for: the full CLI, taking over, must not clear an error
# the pusher recorded in answer to that request (it clears only errors older than the call).
asked_here: set[str] = set()


def wait_for_pusher(spool: str, name: str, path: str, location: str) -> bool:
    """Whether a running pusher confirmed ``name`` (read from ``path``) for ``location``.

    ``spool``: the spool directory; ``name``: a WAL file name already checked to contain no
    ``/``. Never raises for a problem it meets: it returns False and leaves it to the full CLI.
    """
    if not _is_segment(name):
        return False  # history and backup files are rare; a bad name is the full CLI's to refuse
    errors = os.path.join(spool, ERROR_DIR, name)
    marker = os.path.join(spool, MARKER_DIR, name)
    if os.path.exists(errors) or not lock_held(os.path.join(spool, PUSHER_LOCK)):
        return False
    absolute = os.path.abspath(path)
    if not os.path.isfile(absolute) or not _request(spool, name, absolute):
        return False
    asked_here.add(name)
    deadline = time.monotonic() + QUICK_WAIT_S
    pause = _POLL_FIRST_S
    while True:
        if _answers(marker, absolute, location):
            _clear_request(spool, name)
            return True
        if os.path.exists(errors) or time.monotonic() > deadline:
            return False
        if not lock_held(os.path.join(spool, PUSHER_LOCK)):
            # It may have confirmed the file and then exited.
            return _answers(marker, absolute, location) and _clear_request(spool, name)
        time.sleep(pause)
        pause = min(pause * _POLL_FACTOR, _POLL_MAX_S)


def _is_segment(name: str) -> bool:
    """A WAL segment's name: 24 upper-case hexadecimal digits (``storage.walnames``, without
    its regular expressions, which would cost this path their import)."""
    return len(name) == 24 and all(c in "0123456789ABCDEF" for c in name)


def _answers(marker: str, path: str, location: str) -> bool:
    try:
        with open(marker) as f:
            text = f.read()
    except OSError:
        return False
    return marker_answers(text, path, location)


def _request(spool: str, name: str, path: str) -> bool:
    """Write ``requests/<name>`` = ``path``, whole or not at all; False if it could not be."""
    directory = os.path.join(spool, REQUEST_DIR)
    temp = os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, f"{path}\n".encode())
        finally:
            os.close(fd)
        os.rename(temp, os.path.join(directory, name))
    except OSError:
        _unlink(temp)
        return False
    return True


def _clear_request(spool: str, name: str) -> bool:
    _unlink(os.path.join(spool, REQUEST_DIR, name))
    return True


def _unlink(path: str) -> None:
    # Not contextlib.suppress: importing contextlib costs this path ~4 ms.
    try:  # noqa: SIM105
        os.unlink(path)
    except OSError:
        pass
