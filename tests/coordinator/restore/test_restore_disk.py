"""What a restore leaves on disk: the modes the backed-up cluster had (group access included), a
pg_control that cannot be started without its backup_label, a backup_manifest that still
verifies, and, when the disk fills up, one error naming the file and an empty target.

Backups of PostgreSQL 15 and 17 clusters, with and without ``initdb --allow-group-access``, are
taken once per module; every test restores them into new directories through the CLI.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c
import pytest
import zstandard

from coordinator.cli.exitcodes import ExitCode
from devrig import sample
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster, PgClusterError, PgFactory, majors, make_postgres_dir
from devrig.procs import log_tail
from devrig.restored import RestoredCluster, started
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from storage.manifest import BackupManifest

PG15_VERIFYBACKUP = Path("/usr/lib/postgresql/15/bin/pg_verifybackup")
DEAD = 0xDEAD


def checkpoint_lsn(control: bytes) -> int:
    """ControlFileData.checkPoint: after system identifier, version, catalog version, state and
    time (8+4+4+4+4 padding+8 bytes)."""
    return int.from_bytes(control[32:40], "little")


def crc_offsets(control: bytes) -> list[int]:
    """Offsets holding the CRC-32C of every byte before them (PostgreSQL's ``crc`` field)."""
    return [o for o in range(40, 1024, 4)
            if crc32c.crc32c(control[:o]) == int.from_bytes(control[o:o + 4], "little")]


class GroupAccessCluster(PgCluster):
    """A cluster initialised with ``initdb --allow-group-access`` (0750 directories, 0640 files)."""

    def _run_as_postgres(
        self, argv: Sequence[str], log_path: Path
    ) -> subprocess.CompletedProcess[bytes]:
        if argv and Path(argv[0]).name == "initdb":
            argv = [*argv, "--allow-group-access"]
        return super()._run_as_postgres(argv, log_path)


@dataclass(frozen=True)
class Backed:
    """A cluster, its backup "b" in ``target``, and the digest of its rows at backup time."""

    cluster: PgCluster
    target: StorageTarget
    tablespace: Path
    expected: dict[str, str]


@pytest.fixture(scope="module")
def scratch_dirs() -> Iterator[Callable[[str], Path]]:
    """``make(prefix)``: a new postgres-owned directory, removed at the end of the module."""
    made: list[Path] = []

    def make(prefix: str) -> Path:
        made.append(make_postgres_dir(prefix))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def backups(
    pg_factory: PgFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[int, bool], Backed]]:
    """``get(major, group_access)``: backed up once per module."""
    made: dict[tuple[int, bool], Backed] = {}
    own: list[PgCluster] = []

    def get(major: int, group_access: bool) -> Backed:
        if (major, group_access) not in made:
            if group_access:
                cluster: PgCluster = GroupAccessCluster(major)
                own.append(cluster)
                try:
                    cluster.start()
                except PgClusterError as exc:
                    pytest.fail(str(exc), pytrace=False)
            else:
                cluster = pg_factory(major)
            tablespace = sample.populate(cluster, rows=500)
            target = local_target(tmp_path_factory.mktemp("store"))
            backup_cli(cluster, target, "b")
            made[major, group_access] = Backed(
                cluster, target, tablespace, sample.digest(cluster.sql))
        return made[major, group_access]

    yield get
    for cluster in own:
        cluster.destroy()


def restore(
    backed: Backed, make: Callable[[str], Path], pgdata: Path | None = None
) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """Restore backup "b" with its tablespace remapped: (pgdata, tablespace dir, the run)."""
    pgdata = pgdata or make("cloud-dump-disk-") / "data"
    tablespace = make("cloud-dump-disk-ts-") / "ts"
    done = run_cli("restore", "--name", "b", "--pgdata", str(pgdata),
                   "--tablespace-mapping", f"{backed.tablespace}={tablespace}",
                   env=backed.target.env)  # fmt: skip
    return pgdata, tablespace, done


def modes_under(root: Path) -> dict[str, int]:
    """Permission bits of every directory and file under ``root`` (itself as "."), no links."""
    found = {".": stat.S_IMODE(root.lstat().st_mode)}
    for path in root.rglob("*"):
        st = path.lstat()
        if not stat.S_ISLNK(st.st_mode):
            found[str(path.relative_to(root))] = stat.S_IMODE(st.st_mode)
    return found


# --- modes (group access) ----------------------------------------------------------------------


@pytest.mark.parametrize("group_access", [True, False], ids=["group-access", "default"])
@pytest.mark.parametrize("major", [15, 17])
def test_restore_keeps_the_modes_of_the_backed_up_cluster_and_the_copy_starts(
    major: int, group_access: bool, backups: Callable[[int, bool], Backed],
    scratch_dirs: Callable[[str], Path],
) -> None:
    backed = backups(major, group_access)
    pgdata, tablespace, done = restore(backed, scratch_dirs)
    assert done.returncode == 0, done.stderr

    dir_mode, file_mode = (0o750, 0o640) if group_access else (0o700, 0o600)
    restored = modes_under(pgdata)
    for root in (pgdata, tablespace):
        for path, mode in modes_under(root).items():
            wanted = dir_mode if (root / path).is_dir() else file_mode
            assert oct(mode) == oct(wanted), f"{root / path}"
    # The same modes as in the source cluster, file by file.
    source = modes_under(backed.cluster.datadir)
    common = source.keys() & restored.keys()
    assert len(common) > 900
    assert {p: oct(restored[p]) for p in common if source[p] != restored[p]} == {}
    with started(major, pgdata, tablespace) as copy:
        assert sample.digest(copy.sql) == backed.expected
        assert copy.sql("SHOW data_directory_mode") == [(f"0{dir_mode:o}",)]


# --- pg_control without backup_label ------------------------------------------------------------


@pytest.mark.parametrize("major", [15, 17])
def test_restored_copy_starts_with_its_backup_label_and_refuses_without_it(
    major: int, backups: Callable[[int, bool], Backed], scratch_dirs: Callable[[str], Path]
) -> None:
    backed = backups(major, False)
    pgdata, tablespace, done = restore(backed, scratch_dirs)
    assert done.returncode == 0, done.stderr
    (pgdata / "backup_label").unlink()
    copy = RestoredCluster(major, pgdata, tablespace)
    try:
        with pytest.raises(AssertionError, match="did not start"):
            copy.start(timeout_s=30)
        assert "could not locate a valid checkpoint record" in log_tail(copy.log_path, 50)
    finally:
        copy.stop()

    pgdata, tablespace, done = restore(backed, scratch_dirs)
    assert done.returncode == 0, done.stderr
    control = (pgdata / "global" / "pg_control").read_bytes()
    assert checkpoint_lsn(control) == DEAD  # what pg_controldata shows as the checkpoint
    assert len(crc_offsets(control)) == 1  # still a valid pg_control
    with started(major, pgdata, tablespace) as copy:
        assert sample.digest(copy.sql) == backed.expected


def test_pg_verifybackup_verifies_the_restored_directory(
    backups: Callable[[int, bool], Backed], scratch_dirs: Callable[[str], Path]
) -> None:
    """backup_manifest in PGDATA describes pg_control and tablespace_map as restore left them."""
    pgdata, _, done = restore(backups(15, False), scratch_dirs)
    assert done.returncode == 0, done.stderr
    verified = subprocess.run([str(PG15_VERIFYBACKUP), str(pgdata)],
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "successfully verified" in verified.stdout


def stored_member(target: StorageTarget, name: str) -> bytes:
    store = target.open()
    manifest = BackupManifest.from_json(store.get("b/manifest.json"), "b")
    base = next(a for a in manifest.archives if a.name == "base")
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(store.get(base.key))).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


@pytest.mark.parametrize("major", majors(default=(15, 17)))
def test_pg_control_layout_holds_the_checkpoint_at_offset_32_with_a_verifiable_crc(
    major: int, pg_factory: PgFactory, tmp_path: Path
) -> None:
    """What pgcontrol relies on, checked against each major's own files: the checkpoint LSN at
    byte 32 is backup_label's CHECKPOINT LOCATION, and a CRC of the bytes before it exists."""
    cluster = pg_factory(major)
    target = local_target(tmp_path / "store")
    backup_cli(cluster, target, "b", "--compression", "zstd")
    control = stored_member(target, "global/pg_control")
    label = stored_member(target, "backup_label").decode()
    location = next(line.split(": ")[1] for line in label.splitlines()
                    if line.startswith("CHECKPOINT LOCATION"))
    high, low = location.split("/")
    assert checkpoint_lsn(control) == (int(high, 16) << 32) | int(low, 16)
    assert len(crc_offsets(control)) == 1
    assert int.from_bytes(control[8:12], "little") in (1300, 1700, 1800)  # pg_control_version


# --- a full disk ---------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` owned by postgres, unmounted and removed afterwards."""
    point = make_postgres_dir("cloud-dump-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},uid=postgres,gid=postgres,"
                    "mode=0700", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)
        point.rmdir()


def test_restore_onto_a_full_disk_names_the_file_and_leaves_the_target_empty(
    backups: Callable[[int, bool], Backed], scratch_dirs: Callable[[str], Path]
) -> None:
    backed = backups(15, False)
    # Smaller than one WAL segment, which the base archive carries: the disk fills mid-file.
    with small_filesystem("12m") as point:
        pgdata, tablespace, done = restore(backed, scratch_dirs, pgdata=point / "data")
        assert done.returncode == ExitCode.LOCAL_IO, done.stderr
        errors = [line for line in done.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1, done.stderr
        assert "no space left on device" in errors[0] and f"'{pgdata}/" in errors[0], errors
        assert list(point.iterdir()) == []
        assert not tablespace.exists() or list(tablespace.iterdir()) == []
