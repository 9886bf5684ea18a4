"""Confirmation markers of wal-push: what a marker records and whether it answers for a file.

A marker in ``<spool>/archived/`` says "this exact file (identity and SHA-256) is stored in this
archive". The fast path reads markers before anything else is imported: ``os`` only.
"""

from __future__ import annotations

import os

# The spool's marker directory, the marker's format and the archive location it names: defined
# here, where only os is loaded, and used by coordinator.wal.push.spool.
MARKER_DIR = "archived"
# The pusher's lock, and the directories where calls ask for files and the pusher records
# errors: also read by ``coordinator.wal.push.quickwait`` before anything heavy is imported.
PUSHER_LOCK = "pusher.lock"
REQUEST_DIR = "requests"
ERROR_DIR = "errors"
TMP_PREFIX = ".tmp-"  # spool files being written; readers skip them
# A marker is "<format> <raw sha256> <file identity> <location>". Markers of another format
# (the first one had no identity) answer for nothing.
MARKER_FORMAT = "2"
_MARKER_FIELDS = 8  # format, sha256, the five identity numbers, location


def archive_location(storage_url: str | None, cluster: str | None, wal_prefix: str | None) -> str:
    """A one-line name of the archive a push goes to (no credentials: URLs carry none)."""
    return f"{storage_url or '-'}|{cluster or '-'}|{(wal_prefix or 'wal_archive').strip('/')}"


def file_identity(st: os.stat_result) -> str:
    """What tells one file at a path from another: size, device, inode, mtime and ctime (ns).

    Writing into the file changes its mtime, replacing it (a rename, a copy) its inode or ctime.
    """
    return f"{st.st_size} {st.st_dev} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}"


def marker_text(raw_sha256: str, identity: str, location: str) -> str:
    """A confirmation marker: storage holds the file of ``identity`` (as read) at ``location``."""
    return f"{MARKER_FORMAT} {raw_sha256} {identity} {location}\n"


def marker_answers(text: str, path: str, location: str) -> bool:
    """Whether marker ``text`` confirms the file now at ``path`` for this archive location.

    Only for the very file that was read and pushed: one ``stat``, no hashing (this is the
    path of every already-archived call). Any difference sends the call down the full path,
    where the worker compares content and refuses different bytes (exit 17).
    """
    fields = text.rstrip("\n").split(" ", _MARKER_FIELDS - 1)
    if len(fields) != _MARKER_FIELDS or fields[0] != MARKER_FORMAT or fields[-1] != location:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return " ".join(fields[2:-1]) == file_identity(st)
