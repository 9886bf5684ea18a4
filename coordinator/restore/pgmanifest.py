"""PostgreSQL's ``backup_manifest`` as restore leaves it in PGDATA: true to the files on disk.

Restore changes two files the manifest lists after verifying them: ``global/pg_control`` (its
checkpoint invalidated, see ``coordinator.restore.pgcontrol``) and ``tablespace_map`` (rewritten
when tablespaces are restored elsewhere). ``replace_entries`` gives those entries the new size and
checksum and recomputes ``Manifest-Checksum``, so that ``pg_verifybackup`` still verifies the
restored directory. Only the lines of the changed entries and the checksum line are rewritten;
every other byte stays as PostgreSQL wrote it (the manifest checksum covers those bytes).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

from coordinator.tarwalk import new_checksum
from storage.errors import IntegrityError

_CHECKSUM_KEY = b'"Manifest-Checksum"'
_DIGEST_RE = re.compile(rb'^("Manifest-Checksum":\s*")[0-9a-fA-F]{64}')
_SIZE_RE = re.compile(r'("Size":\s*)\d+')
_CHECKSUM_RE = re.compile(r'("Checksum":\s*")[0-9a-fA-F]*(")')


def replace_entries(manifest_json: bytes, contents: Mapping[str, bytes]) -> bytes:
    """``manifest_json`` with the entries of ``contents`` (path → new bytes) brought up to date.

    Raises ``IntegrityError`` if a path is not listed, or the manifest has no checksum line.
    """
    cut = manifest_json.rfind(_CHECKSUM_KEY)
    if cut < 0:
        raise IntegrityError("backup_manifest has no Manifest-Checksum")
    lines = manifest_json[:cut].split(b"\n")
    missing = set(contents)
    for index, line in enumerate(lines):
        path = _entry_path(line)
        if path in missing:
            lines[index] = _updated_line(line, contents[path])
            missing.discard(path)
    if missing:
        raise IntegrityError(f"backup_manifest does not list '{sorted(missing)[0]}'")
    body = b"\n".join(lines)
    digest = hashlib.sha256(body).hexdigest().encode()
    tail, found = _DIGEST_RE.subn(lambda m: m[1] + digest, manifest_json[cut:], count=1)
    if not found:
        raise IntegrityError("backup_manifest has a malformed Manifest-Checksum")
    return body + tail


def _entry_path(line: bytes) -> str | None:
    """The "Path" of a file entry line (one entry per line, as PostgreSQL writes them)."""
    text = line.strip().rstrip(b",")
    if not text.startswith(b'{ "Path"'):
        return None
    try:
        entry = json.loads(text)
    except ValueError:
        return None
    return str(entry["Path"]) if isinstance(entry, dict) and "Path" in entry else None


def _updated_line(line: bytes, data: bytes) -> bytes:
    text = line.decode()
    entry = json.loads(text.strip().rstrip(","))
    text = _SIZE_RE.sub(lambda m: f"{m[1]}{len(data)}", text, count=1)
    algorithm = entry.get("Checksum-Algorithm")
    if algorithm is not None and algorithm != "NONE":
        checksum = new_checksum(str(algorithm))
        checksum.update(data)
        text = _CHECKSUM_RE.sub(lambda m: f"{m[1]}{checksum.hexdigest()}{m[2]}", text, count=1)
    return text.encode()
