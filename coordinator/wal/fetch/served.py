"""The served path of wal-fetch: a spooled segment moved into ``%p``, and the spool's names.

Every ``wal-fetch`` call PostgreSQL makes during a recovery loads this module, most of them
(``coordinator.cli.fastpath``) nothing else of cloud-dump's: a served call costs starting Python
and the few system calls below, so this module imports ``os`` only (``logging`` only on the
rare path that warns; not even ``json``, whose regular expressions cost ~3 ms: the sidecars and
the plan are lines of text). ``coordinator.wal.fetch.spool`` builds the rest of the spool
(the prefetcher's writes, its plan, the end-of-archive memory, the cached identity) on the
names and rules defined here.

What a spooled file promises. The prefetcher verified it against its archived SHA-256 before
writing its sidecar (``prefetch/<segment>.sidecar``, see ``sidecar_text``), which it writes
last: a sidecar means a complete, verified data file. The files are not fsynced. The sidecar
records the kernel's boot id (``/proc/sys/kernel/random/boot_id``, a random UUID drawn at each
boot), and a file spooled before the current boot is never served: within one boot every process
reads the page cache, which holds what was written whether or not it reached the disk, so an
fsync would only matter across a crash of the machine, and a file from before such a crash is
refused (discarded and fetched again). A killed prefetcher leaves at worst a temporary file or a
data file without sidecar, both discarded. Where the boot id cannot be read, the prefetcher
fsyncs instead and records none, and such a sidecar is served whatever the boot.
"""

from __future__ import annotations

import os

from coordinator.helperlock import lock_held

PREFETCH_DIR = "prefetch"
LOCK_NAME = "prefetch.lock"
PLAN_NAME = "prefetch-plan"
SIDECAR_SUFFIX = ".sidecar"
END_OF_ARCHIVE_NAME = "end-of-archive"
END_OF_ARCHIVE_MEMORY_S = 10.0
# PostgreSQL replays nothing while a call waits for the prefetcher: the segment is taken within
# this long of its sidecar appearing; a stat that often costs nothing.
WAIT_POLL_S = 0.005
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_HEX = frozenset("0123456789ABCDEF")


def boot_id() -> str | None:
    """The kernel's boot id (a UUID, new at each boot); None where there is none (not Linux)."""
    try:
        with open(BOOT_ID_PATH) as f:
            return f.read().strip() or None
    except OSError:
        return None


def is_segment_name(name: str) -> bool:
    """Whether ``name`` is a WAL segment's (24 upper-case hex digits), as
    ``storage.walnames.is_segment`` says, without the regular expressions it loads."""
    return len(name) == 24 and _HEX.issuperset(name)


def archive_source(storage: str, cluster: str | None, wal_prefix: str | None) -> str:
    """Names the archive in spooled files' sidecars: the storage URL and the WAL prefix settings.

    Built from the settings rather than from ``Layout`` (whose import a served call avoids): two
    spellings of one archive only cost a fetch again, two archives never share a name.
    """
    return f"{storage}#{cluster or ''}#{wal_prefix or ''}"


def serve_without_cli(
    name: str, destination: str, *, spool_dir: str | None, source: str, prefetch: int
) -> bool:
    """The served path for ``coordinator.cli.fastpath``: move spooled ``name`` into
    ``destination``, waiting for the running prefetcher when it is fetching it.

    Only when there is nothing else to do: no prefetcher to start (see ``prefetcher_wanted``),
    since starting one needs every setting of the full command line. False when it did not
    serve (then only an unfit spooled file was discarded): the full CLI decides.
    """
    from coordinator.wal.spooldir import wal_spool_dir

    root = wal_spool_dir(destination, spool_dir)
    if root is None or not is_segment_name(name):
        return False
    if prefetcher_wanted(root, name, prefetch):
        return False
    if take(root, source, name, destination) is not None:
        return True
    if prefetch <= 0 or not being_prefetched(root, name):
        return False
    from options.declared import number_from_env

    bound_s = float(number_from_env("CLOUD_DUMP_WAL_PREFETCH_WAIT"))
    return await_prefetched(root, source, name, destination, bound_s) is not None


def prefetcher_wanted(root: str, name: str, prefetch: int) -> bool:
    """Whether a call for ``name`` should start a prefetcher: none runs, fewer than half of the
    next ``prefetch`` segments are spooled, and the archive did not end after ``name`` on its
    timeline a moment ago (a prefetcher then just stopped there)."""
    if prefetch <= 0 or count_ahead(root, name) * 2 >= prefetch:
        return False
    end = recent_end_of_archive(root)
    if end is not None and end[:8] == name[:8] and end > name:
        return False
    return not lock_held(os.path.join(root, LOCK_NAME))


def take(root: str, source: str, name: str, destination: str) -> int | None:
    """Move spooled ``name`` to ``destination``; its size, or None if it is not spooled (a
    file unfit to serve is discarded with a warning). Older segments of its timeline go."""
    directory = os.path.join(root, PREFETCH_DIR)
    path = os.path.join(directory, name)
    try:
        with open(path + SIDECAR_SUFFIX, "rb") as f:
            facts = parse_sidecar(f.read())
    except FileNotFoundError:
        return None
    try:
        size: int | None = os.stat(path).st_size
    except FileNotFoundError:
        size = None
    problem = _unfit(facts, size, source)
    if problem is None:
        try:
            os.rename(path, destination)
        except OSError as exc:
            import errno

            if exc.errno != errno.EXDEV:
                raise
            _move_across(path, destination)  # a --spool-dir on another file system
        remove(root, name)
        _prune_before(root, name)
        return size
    import logging

    logging.getLogger(__name__).warning("discarding spooled '%s': %s", name, problem)
    remove(root, name)
    return None


def sidecar_text(size: int, raw_sha256: str, source: str, boot: str | None) -> bytes:
    """A spooled file's sidecar: its size in bytes, its SHA-256, the archive it came from
    (``archive_source``) and the boot it was written in (none: it was fsynced)."""
    lines = [f"size={size}", f"raw_sha256={raw_sha256}", f"source={source}"]
    if boot is not None:
        lines.append(f"boot_id={boot}")
    return ("\n".join(lines) + "\n").encode()


def parse_sidecar(data: bytes) -> dict[str, str] | None:
    """The facts of a sidecar written by ``sidecar_text``; None when it is not one."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    facts = dict(line.partition("=")[::2] for line in text.splitlines())
    return facts if {"size", "raw_sha256", "source"} <= facts.keys() else None


def _unfit(facts: dict[str, str] | None, size: int | None, source: str) -> str | None:
    if size is None:
        return "its sidecar has no data file"
    if facts is None:
        return "its sidecar is not valid"
    if facts["source"] != source:
        return "it was fetched from another archive"
    if facts["size"] != str(size):
        return f"it holds {size} bytes, its sidecar says {facts['size']}"
    written_at_boot = facts.get("boot_id")
    if written_at_boot is not None and written_at_boot != boot_id():
        return "it was written before the machine restarted (and not fsynced)"
    return None


def _move_across(source: str, destination: str) -> None:
    from pathlib import Path

    from storage.fsutil import move

    move(Path(source), Path(destination))


def remove(root: str, name: str) -> None:
    """Remove spooled ``name``: its data file and its sidecar."""
    path = os.path.join(root, PREFETCH_DIR, name)
    for each in (path, path + SIDECAR_SUFFIX):
        try:  # noqa: SIM105 - contextlib costs a served call ~2 ms of imports
            os.unlink(each)
        except FileNotFoundError:
            pass


def _prune_before(root: str, name: str) -> None:
    """Drop spooled segments of this timeline older than ``name``: never asked for again
    (a restarted recovery re-fetches them from storage), they only hold disk space."""
    for entry in entries(root):
        if entry[:8] == name[:8] and entry < name:
            remove(root, entry)


def entries(root: str) -> set[str]:
    """Segments with a data file or a sidecar in the spool."""
    try:
        names = os.listdir(os.path.join(root, PREFETCH_DIR))
    except FileNotFoundError:
        return set()
    return {n for n in (name.removesuffix(SIDECAR_SUFFIX) for name in names) if is_segment_name(n)}


def count_ahead(root: str, name: str) -> int:
    """How many segments after ``name`` on its timeline are spooled or being written."""
    return sum(1 for entry in entries(root) if entry[:8] == name[:8] and entry > name)


def being_prefetched(root: str, name: str) -> bool:
    """Whether a running prefetcher still means to deliver ``name`` (its plan names it, and the
    plan is of the process holding the lock: a dead prefetcher's plan is not its successor's)."""
    try:
        with open(os.path.join(root, PLAN_NAME)) as f:
            pid, *names = f.read().split()
    except (OSError, ValueError):
        return False
    if name not in names:
        return False
    lock_path = os.path.join(root, LOCK_NAME)
    if not lock_held(lock_path):
        return False
    try:
        with open(lock_path) as f:
            return f.read().strip() == pid
    except OSError:
        return False


def plan_text(pid: int, names: list[str]) -> bytes:
    """The prefetcher's plan (``PLAN_NAME``): its pid, then the segments it still means to
    deliver, one a line."""
    return "".join(f"{line}\n" for line in [str(pid), *names]).encode()


def await_prefetched(
    root: str, source: str, name: str, destination: str, bound_s: float
) -> int | None:
    """Serve ``name`` once the running prefetcher spools it; None when it gave up on it or
    left, or after ``bound_s`` seconds (the caller then fetches it itself)."""
    import time

    sidecar = os.path.join(root, PREFETCH_DIR, name + SIDECAR_SUFFIX)
    deadline = time.monotonic() + bound_s
    polls = 0
    while time.monotonic() < deadline:
        time.sleep(WAIT_POLL_S)  # first: the caller has just looked
        polls += 1
        if os.path.exists(sidecar):
            break
        # The plan and the lock are read less often than the sidecar is looked for.
        if polls % 10 == 0 and not being_prefetched(root, name):
            break
    else:
        import logging

        logging.getLogger(__name__).warning(
            "the prefetcher has not delivered '%s' within %.0f s: fetching it directly",
            name, bound_s)  # fmt: skip
        return None
    # Spooled, or the prefetcher left (perhaps right after spooling it): None if not there.
    return take(root, source, name, destination)


def recent_end_of_archive(root: str) -> str | None:
    """The segment found missing from the archive within ``END_OF_ARCHIVE_MEMORY_S``, if any."""
    import time

    path = os.path.join(root, END_OF_ARCHIVE_NAME)
    try:
        if time.time() - os.stat(path).st_mtime < END_OF_ARCHIVE_MEMORY_S:
            with open(path) as f:
                return f.read().strip()
    except OSError:
        pass
    return None
