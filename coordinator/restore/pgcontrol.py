"""The restored ``global/pg_control``: made unusable without the backup's ``backup_label``.

Started from a restored copy *with* ``backup_label``, PostgreSQL replays WAL from the backup's
start checkpoint, named in that file, to the backup's end. *Without* it (an operator deleting the
file that "blocks" a start), PostgreSQL believes it is recovering from a crash at the checkpoint
recorded in ``pg_control``, which BASE_BACKUP copied at the end of the backup: it skips the WAL
between the two and opens a cluster silently missing committed rows.

So, as pgBackRest does since 2.50 (pgbackrest/pgbackrest#2232), restore sets that checkpoint's
LSN to 0/DEAD and recomputes the file's CRC. With ``backup_label`` the server never reads the
field; without it, recovery fails ("could not locate a valid checkpoint record") because no
cluster has WAL at 0/DEAD: initdb starts WAL in the second segment. The LSN shows in
``pg_controldata`` as "Latest checkpoint location: 0/DEAD", a recognisable marker.

Layout (``ControlFileData``, unchanged in this respect in PostgreSQL 13 to 18): system identifier
(8 bytes), ``pg_control_version`` (4), ``catalog_version_no`` (4), state (4, then 4 of padding),
time (8), then ``checkPoint`` at byte 32. The CRC-32C of every byte before it closes the struct;
its offset moved between majors, so it is found rather than assumed: the one 4-byte-aligned
offset holding the CRC of the bytes before it. A file whose CRC cannot be found, or of a
``pg_control_version`` not known here, is left alone (``invalidate_checkpoint`` returns None).
"""

from __future__ import annotations

import crc32c

# pg_control_version of PostgreSQL 13-16, 17 and 18; checkPoint sits at the same offset in all.
KNOWN_CONTROL_VERSIONS = frozenset({1300, 1700, 1800})
CHECKPOINT_OFFSET = 32
INVALID_CHECKPOINT_LSN = 0xDEAD
_VERSION_OFFSET = 8
_CRC_SEARCH_END = 1024  # sizeof(ControlFileData) is ~300 bytes; the file is 8 KiB of padding


def find_crc_offset(control: bytes) -> int | None:
    """Offset of the CRC-32C that covers every byte before it, or None when there is none."""
    for offset in range(CHECKPOINT_OFFSET + 8, min(_CRC_SEARCH_END, len(control) - 3), 4):
        stored = int.from_bytes(control[offset : offset + 4], "little")
        if crc32c.crc32c(control[:offset]) == stored:
            return offset
    return None


def control_version(control: bytes) -> int:
    return int.from_bytes(control[_VERSION_OFFSET : _VERSION_OFFSET + 4], "little")


def checkpoint_lsn(control: bytes) -> int:
    return int.from_bytes(control[CHECKPOINT_OFFSET : CHECKPOINT_OFFSET + 8], "little")


def invalidate_checkpoint(control: bytes) -> bytes | None:
    """``control`` with its checkpoint LSN set to 0/DEAD and its CRC recomputed.

    None when the file is not one this module can change safely (unknown version, or no CRC
    found where PostgreSQL puts it): the caller keeps the original.
    """
    if control_version(control) not in KNOWN_CONTROL_VERSIONS:
        return None
    crc_offset = find_crc_offset(control)
    if crc_offset is None:
        return None
    changed = bytearray(control)
    lsn = INVALID_CHECKPOINT_LSN.to_bytes(8, "little")
    changed[CHECKPOINT_OFFSET : CHECKPOINT_OFFSET + 8] = lsn
    crc = crc32c.crc32c(bytes(changed[:crc_offset]))
    changed[crc_offset : crc_offset + 4] = crc.to_bytes(4, "little")
    return bytes(changed)
