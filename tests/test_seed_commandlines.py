"""Every example command line of the seed's README, run as its operators run them.

The Go tool cloud-dump reimplements documents its command lines in its README
(``../shared/seed/cloud-dump-README.txt``, fixed; a copy is ``tests/seed/``'s). This module
reads them from the file (so a new example is noticed:
``test_every_example_is_run_or_skipped_for_a_reason``), substitutes the placeholders and runs
each against real servers: PostgreSQL 15 clusters, and the moto S3 server standing for Storj's
gateway (``CLOUD_DUMP_S3_ENDPOINT`` at moto, gateway S3 credentials in the
environment; the literal ``"<grant>"`` stays on the command line: with S3 credentials the grant is
not needed). Each example is checked for what the seed says it does.

Substitutions (``_substituted``): the bucket (``my-backups``, ``my-bucket``) is the test's; the
``--db-url`` is the source cluster's (flat-layout lines: a cluster archiving with the seed's flat
``archive_command``; ``--cluster prod-pg17`` lines: one archiving with its cluster-layout line);
``--pgdata`` a fresh directory; ``$(date +FMT)`` the date, except where the README's Case 3 has
its cron run on 2026-03-21; ``<backup-name-from-...>`` the flat backup; recovery target times and
LSNs (the README's are made-up instants) real ones between the rows written in phases, keeping the
README's ``UTC`` spelling; ``0/FFFFFFFF  # or just latest`` is run as ``--recovery-target latest``
(PostgreSQL 13+ refuses to promote at the end of WAL short of an LSN target); ``...`` the flags the
example elides (storage, and the name, database or PGDATA); key files the test's own; the fake
segment made with ``dd if=/dev/urandom`` a segment with a valid header (cloud-dump checks that a
segment is archived under its own name); ``%p``/``%f`` a file and its name, as PostgreSQL passes
them. An ``archive_command`` runs as the postgres user, with the server's environment (the seed's
systemd ``EnvironmentFile``) given as ``--config``.

Not run, with the reason (``SKIPPED``): usage synopses (``[flags]``), prose that starts with
``cloud-dump``, and every line that is not cloud-dump's (``make``, ``docker``, ``uplink``,
``pg_ctl``, ``psql``, ``systemctl``, ``go``, ``git``, ``dd``, ``diff``): the extractor only
takes lines starting with ``cloud-dump``, ``./cloud-dump``, ``archive_command =`` or
``restore_command =``; ``pg_ctl start`` is done by the tests that restore (the copy starts and
answers).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coordinator.crypto import generate_identity
from coordinator.restore.restoreconfig import default_restore_config
from coordinator.wait import wait_until
from devrig.launcher import postgres_cloud_dump
from devrig.moto import MotoServer
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.recovery import active_settings, wait_archived, wait_promoted
from devrig.restored import chown_postgres, started
from devrig.services import VENV_BIN, error_line, run_cli
from devrig.walfiles import SYSID_A, make_segment
from options.seed import GATEWAY_ENDPOINT
from storage.base import Storage
from storage.factory import open_storage
from storage.options import StorageOptions

# A copy of the Go tool's README (../shared/seed/cloud-dump-README.txt, fixed) kept with the tests,
# so that a clone runs them wherever it is checked out.
SEED_README = Path(__file__).resolve().parent / "seed" / "cloud-dump-README.txt"
_STARTS = ("cloud-dump ", "./cloud-dump ", "archive_command = '", "restore_command = '")
SYNOPSIS, PROSE = "usage synopsis, not an example", "prose that starts with cloud-dump"
SEG = "000000010000000000000001"


@dataclass(frozen=True)
class Example:
    line: int  # in the seed README, 1-based: where the example starts
    text: str  # its continuation lines joined

    @property
    def command(self) -> list[str]:
        """The cloud-dump words (an archive_command's or restore_command's value split)."""
        words = shlex.split(_dates(self.text), comments=True)
        if words[0] in ("archive_command", "restore_command"):
            words = shlex.split(words[2])
        return words

    @property
    def verb(self) -> str:
        return self.command[1]

    def flag(self, name: str) -> str | None:
        words = self.command
        return words[words.index(name) + 1] if name in words else None


def seed_examples() -> list[Example]:
    """Every command line of the seed README: a line starting as ``_STARTS`` and the lines a
    trailing backslash continues it with."""
    lines = SEED_README.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        text = lines[i].strip()
        if text.startswith(_STARTS):
            start = i + 1
            while text.endswith("\\"):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            found.append(Example(start, text))
        i += 1
    return found


def skipped(example: Example) -> str | None:
    """Why ``example`` is not run, None when a test runs it."""
    if "[flags]" in example.text:
        return SYNOPSIS
    words = example.command
    if example.text.startswith("cloud-dump") and words[1] in ("backup", "restore", "list") and (
            not words[2].startswith("-") and words[2] != "..."):
        return PROSE
    return None


EXAMPLES = seed_examples()
# The backups the world fixture makes with these lines (and checks), that test_list_lines and
# the restores use.
WORLD_BACKUPS = ("--name prod-2026-03-22", "--cluster prod-pg17 --name 2026-03-22")


def examples(verb: str, *, has: str | None = None, lacks: str | None = None) -> list[Example]:
    return [e for e in EXAMPLES if not skipped(e) and e.verb == verb
            and not e.text.startswith(("archive_command", "restore_command"))
            and (has is None or has in e.text) and (lacks is None or lacks not in e.text)]


def _dates(text: str, date: str | None = None) -> str:
    """``$(date +FMT)`` as the shell expands it (or ``date``)."""
    return re.sub(r"\$\(date \+([^)]*)\)", lambda m: date or time.strftime(m.group(1)), text)


# --- the world: two archiving source clusters, their backups, and a bucket ----------------------


@dataclass
class Source:
    cluster: PgCluster
    times: dict[str, str] = field(default_factory=dict)  # README target time -> a real one
    lsns: dict[str, str] = field(default_factory=dict)  # README target LSN -> a real one


@dataclass
class World:
    bucket: str
    endpoint: str
    launcher: Path
    flat: Source
    prod: Source
    keys: Path  # a directory holding age.key and age.key.pub
    env: dict[str, str] = field(default_factory=dict)

    def store(self, bucket: str | None = None) -> Storage:
        return open_storage(f"s3://{bucket or self.bucket}",
                            StorageOptions(s3_endpoint=self.endpoint, s3_region="us-east-1"))


def _substituted(example: Example, world: World, *, bucket: str | None = None,
                 date: str | None = None, elided: list[str] | None = None,
                 pgdata: Path | None = None, wal: tuple[str, str] | None = None) -> list[str]:
    """``example``'s arguments (after ``cloud-dump``) with the module docstring's substitutions."""
    words = shlex.split(_dates(example.text, date), comments=True)
    if words[0] in ("archive_command", "restore_command"):
        words = shlex.split(words[2])
    source = world.prod if "--cluster" in words else world.flat
    out: list[str] = []
    args = iter(words[1:])
    for word in args:
        if word == "...":
            out += elided or []
        elif word == "--storj-bucket":
            next(args)
            out += [word, bucket or world.bucket]
        elif word == "--db-url":
            out += [word, source.cluster.replication_url()]
            next(args)
        elif word == "--pgdata":
            out += [word, str(pgdata)]
            next(args)
        elif word in ("--recovery-target-time", "--recovery-target-lsn"):
            value = next(args)
            if value == "0/FFFFFFFF":
                out += ["--recovery-target", "latest"]
            else:
                real = (source.times if word.endswith("time") else source.lsns)[value]
                out += [word, real]
        elif word.startswith("<backup-name-from-"):
            out.append("prod-2026-03-22")
        elif word.startswith("~/.config/cloud-dump/"):
            out.append(str(world.keys / word.rsplit("/", 1)[1]))
        elif wal is not None and word in ("%p", "%f"):
            out.append(wal[0] if word == "%p" else wal[1])
        else:
            out.append(word)
    return out


def _run(argv: list[str], world: World, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*argv, env={**world.env, **env})


def _write_rows(cluster: PgCluster, phase: str) -> None:
    cluster.sql(f"INSERT INTO seed SELECT g, '{phase}' FROM generate_series(1, 10) g")


def _utc(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%d %H:%M:%S.%f") + " UTC"


def _server_env_file(world_env: dict[str, str]) -> Path:
    """The server's environment (the seed's systemd EnvironmentFile), 0600, owned by postgres."""
    path = make_postgres_dir("cloud-dump-seed-env-") / "server.env"
    path.write_text("".join(f'{k}="{v}"\n' for k, v in world_env.items()))
    path.chmod(0o600)
    chown_postgres(path)
    return path


def _archive_command(example: Example, world: World, server_env: Path) -> str:
    words = [str(world.launcher), *_substituted(example, world), "--config", str(server_env)]
    return " ".join(w if w in ("%p", "%f") else shlex.quote(w) for w in words)


def _only(line_text: str) -> Example:
    found = [e for e in EXAMPLES if e.text == line_text]
    assert found, f"the seed README no longer has: {line_text}"
    return found[0]


def _backup(example: Example, world: World, **kw: str) -> None:
    done = _run(_substituted(example, world, **kw), world)  # type: ignore[arg-type]
    assert done.returncode == 0, (example.line, done.stderr)


@pytest.fixture(scope="module")
def world(pg_factory: PgFactory, moto_server: MotoServer, aws_env: dict[str, str],
          moto_admin_client: object) -> Iterator[World]:
    """The README's Cases 2 and 3: a flat-layout and a ``--cluster prod-pg17`` source, each
    archiving with the seed's ``archive_command``, backed up with the seed's backup lines, rows
    written in phases around them; real targets for the README's made-up ones."""
    bucket = f"seed-{os.getpid()}-{int(time.time())}"
    moto_admin_client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    keys = make_postgres_dir("cloud-dump-seed-keys-")
    secret, public = generate_identity()
    (keys / "age.key").write_text(f"{secret}\n")
    (keys / "age.key.pub").write_text(f"{public}\n")
    env = {"CLOUD_DUMP_S3_ENDPOINT": moto_server.endpoint, **aws_env}
    launcher = postgres_cloud_dump()
    server_env = _server_env_file(env)
    placeholder = World(bucket, moto_server.endpoint, launcher, None, None, keys,  # type: ignore[arg-type]
                        {**env, "CLOUD_DUMP_EXECUTABLE": str(launcher)})
    flat_line = _only("archive_command = 'cloud-dump wal-push %p %f --storage storj "
                      "--storj-access \"<grant>\" --storj-bucket my-backups'")
    prod_line = _only("archive_command = 'cloud-dump wal-push %p %f --cluster prod-pg17 "
                      "--storage storj --storj-access \"<grant>\" --storj-bucket my-backups'")
    placeholder.flat = Source(pg_factory(15, archive_command=_archive_command(
        flat_line, placeholder, server_env)))
    placeholder.prod = Source(pg_factory(15, archive_command=_archive_command(
        prod_line, placeholder, server_env)))
    world = placeholder
    for source in (world.flat, world.prod):
        source.cluster.sql("CREATE TABLE seed (id int, phase text)")

    # Case 2, flat: backup, then a, (time), b, (LSN), c.
    flat = world.flat
    _write_rows(flat.cluster, "0")
    _backup(_only_backup(WORLD_BACKUPS[0]), world)
    _write_rows(flat.cluster, "a")
    flat.times["2026-03-22 14:30:00 UTC"] = _clock_between(flat.cluster)
    _write_rows(flat.cluster, "b")
    flat.lsns["0/5200000"] = str(flat.cluster.sql("SELECT pg_current_wal_lsn()")[0][0])
    _write_rows(flat.cluster, "c")
    wait_archived(flat.cluster)

    # Case 3, --cluster prod-pg17: the cron line runs on 2026-03-21, then a, (time), b, (LSN),
    # c; the 2026-03-22 backup; (time), d.
    prod = world.prod
    cron = _only_backup("--cluster prod-pg17 --name $(date +%Y-%m-%d)")
    _write_rows(prod.cluster, "0")
    _backup(cron, world, date="2026-03-21")
    _write_rows(prod.cluster, "a")
    prod.times["2026-03-21 15:30:00 UTC"] = _clock_between(prod.cluster)
    _write_rows(prod.cluster, "b")
    prod.lsns["0/5200000"] = str(prod.cluster.sql("SELECT pg_current_wal_lsn()")[0][0])
    _write_rows(prod.cluster, "c")
    _backup(_only_backup(WORLD_BACKUPS[1]), world)
    prod.times["2026-03-22 14:30:00 UTC"] = _clock_between(prod.cluster)
    _write_rows(prod.cluster, "d")
    wait_archived(prod.cluster)
    yield world


def _only_backup(fragment: str) -> Example:
    found = [e for e in examples("backup") if fragment in e.text]
    assert found, f"the seed README no longer has a backup line with: {fragment}"
    return found[0]


def _clock_between(cluster: PgCluster) -> str:
    """A time of the server's clock after everything committed so far, and before anything
    committed from now on, in the README's spelling (``... UTC``)."""

    def clock() -> datetime:
        value = cluster.sql("SELECT clock_timestamp()")[0][0]
        assert isinstance(value, datetime)
        return value

    def after(instant: datetime) -> datetime:
        later = wait_until(lambda: (now if (now := clock()) > instant else None),
                           timeout_s=10, first_s=0.001)
        assert later, f"the server's clock did not move past {instant}"
        return later

    target = after(clock())
    after(target)  # later commits are stamped after the target
    return _utc(target.astimezone(UTC))


# --- the tests ---------------------------------------------------------------------------------


def test_every_example_is_run_or_skipped_for_a_reason() -> None:
    """The README's 49 examples: a new one fails this test until it is given a test."""
    assert len(EXAMPLES) == 49, [f"{e.line}: {e.text}" for e in EXAMPLES]
    reasons = {e.line: skipped(e) for e in EXAMPLES}
    assert sorted(n for n, why in reasons.items() if why == SYNOPSIS) == [531, 562, 598, 618, 647]
    assert sorted(n for n, why in reasons.items() if why == PROSE) == [656, 779]
    for example in EXAMPLES:
        if reasons[example.line] is None:
            assert example.verb in ("backup", "restore", "list", "wal-push", "wal-fetch"), example


def _fresh_bucket(client: object, world: World, tag: str) -> str:
    name = f"{world.bucket}-{tag}"
    client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
    return name


def _keys(world: World, bucket: str | None = None) -> set[str]:
    return {info.key for info in world.store(bucket).list("")}


_RAN: dict[tuple[str, ...], subprocess.CompletedProcess[str]] = {}


@pytest.mark.parametrize("example", [e for e in examples("backup", lacks="...")
                                     if not any(f in e.text for f in WORLD_BACKUPS)],
                         ids=lambda e: f"line{e.line}")
def test_backup_lines_create_the_backup(example: Example, world: World) -> None:
    argv = _substituted(example, world)
    done = _RAN.get(tuple(argv)) or _run(argv, world)
    _RAN[tuple(argv)] = done  # the same line twice in the README (another password): run once
    assert done.returncode == 0, done.stderr
    name, cluster = example_flag(argv, "--name"), example_flag(argv, "--cluster")
    key = f"{cluster}/backup/{name}/manifest.json" if cluster else f"{name}/manifest.json"
    assert key in _keys(world)
    listing = _run(["list", *(["--cluster", cluster] if cluster else []), "--storage", "storj",
                    "--storj-bucket", world.bucket], world)
    assert name is not None and listing.returncode == 0, listing.stderr
    assert name in listing.stdout


def example_flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("example", examples("list"), ids=lambda e: f"line{e.line}")
def test_list_lines_show_the_backups(example: Example, world: World) -> None:
    done = _run(_substituted(example, world), world)
    assert done.returncode == 0, done.stderr
    if example.flag("--cluster") == "prod-pg17":
        assert "Cluster: prod-pg17  (WAL archive: prod-pg17/wal_archive/)" in done.stdout
        assert "2026-03-21" in done.stdout and "2026-03-22" in done.stdout
    else:
        assert "prod-2026-03-22" in done.stdout


def _phases(pgdata: Path, *, promote: bool) -> list[tuple[object, ...]]:
    """The rows of the restored copy, started as the README says (pg_ctl start)."""
    with started(15, pgdata) as copy:
        if promote:
            wait_promoted(copy)
        return copy.sql("SELECT phase, count(*) FROM seed GROUP BY phase ORDER BY phase")


def _restore(argv: list[str], world: World, pgdata: Path, **env: str) -> None:
    done = _run(argv, world, **env)
    assert done.returncode == 0, done.stderr
    config = default_restore_config(pgdata)
    if config.exists():
        chown_postgres(config)


def _new_pgdata() -> Path:
    return make_postgres_dir("cloud-dump-seed-restore-") / "data"


def test_plain_restore_lines_restore_a_startable_copy(world: World) -> None:
    plain = examples("restore", lacks="--recovery-target")
    plain = [e for e in plain if "..." not in e.text]
    assert {e.line for e in plain} == {141, 175, 477, 516, 575}
    # The same restore, whatever --pgdata the line names: run once, checked once.
    commands = {tuple(a for a in _substituted(e, world, pgdata=Path("/x")) if a != "/x")
                for e in plain}
    assert len(commands) == 1
    pgdata = _new_pgdata()
    _restore(_substituted(plain[0], world, pgdata=pgdata), world, pgdata)
    assert not (pgdata / "recovery.signal").exists()
    assert _phases(pgdata, promote=False) == [("0", 10)]


_EXPECTED: dict[tuple[str | None, str | None, str], list[str]] = {  # (cluster, backup, target)
    (None, "prod-2026-03-22", "time"): ["0", "a"],
    (None, "prod-2026-03-22", "lsn"): ["0", "a", "b"],
    ("prod-pg17", "2026-03-21", "time"): ["0", "a"],
    ("prod-pg17", "2026-03-21", "lsn"): ["0", "a", "b"],
    ("prod-pg17", "2026-03-22", "latest"): ["0", "a", "b", "c", "d"],
    ("prod-pg17", "2026-03-22", "time"): ["0", "a", "b", "c"],
}


def _pitr_examples() -> list[Example]:
    seen: dict[str, Example] = {}
    for e in examples("restore", has="--recovery-target"):
        seen.setdefault(re.sub(r"--pgdata \S+", "", e.text), e)  # same but for --pgdata: once
    return list(seen.values())


@pytest.mark.parametrize("example", _pitr_examples(), ids=lambda e: f"line{e.line}")
def test_pitr_lines_recover_to_the_target_and_promote(example: Example, world: World) -> None:
    pgdata = _new_pgdata()
    argv = _substituted(example, world, pgdata=pgdata)
    _restore(argv, world, pgdata)
    # What the README says restore writes (its line 781): restore_command runs wal-fetch; here
    # its settings are in the restore config, and no secret is in postgresql.auto.conf.
    settings = active_settings(pgdata)
    assert " wal-fetch %f %p --config " in settings["restore_command"]
    auto_conf = (pgdata / "postgresql.auto.conf").read_text()
    assert "<grant>" not in auto_conf and os.environ["AWS_SECRET_ACCESS_KEY"] not in auto_conf
    config = default_restore_config(pgdata).read_text()
    assert f'CLOUD_DUMP_STORAGE="s3://{world.bucket}"' in config
    assert "<grant>" not in config and "STORJ" not in config
    assert ('CLOUD_DUMP_CLUSTER="prod-pg17"' in config) == ("--cluster" in argv)
    assert settings["recovery_target_action"] == "promote"
    assert (pgdata / "recovery.signal").exists()
    target = ("latest" if "latest" in argv else
              "time" if "--recovery-target-time" in argv else "lsn")
    key = (example.flag("--cluster"), example.flag("--name"), target)
    rows = _phases(pgdata, promote=True)
    assert [phase for phase, _ in rows] == _EXPECTED[key]


def _storage_flags(bucket: str) -> list[str]:
    return ["--storage", "storj", "--storj-access", "<grant>", "--storj-bucket", bucket]


def test_manual_wal_push_and_fetch_lines(world: World, moto_admin_client: object,
                                         tmp_path: Path) -> None:
    """The README's "Test WAL push / fetch": push, fetch back identical, push again (exit 0),
    fetch of a missing segment exits 1 and writes nothing."""
    bucket = _fresh_bucket(moto_admin_client, world, "manual")
    lines = [e for e in examples("wal-push") + examples("wal-fetch") if "/tmp/" in e.text]
    lines.sort(key=lambda e: e.line)
    assert [e.line for e in lines] == [492, 496, 503, 508]
    segment = make_segment(SYSID_A, 7, SEG)  # the README's dd makes one without a header
    paths = {f"/tmp/{SEG}": tmp_path / SEG, "/tmp/fetched": tmp_path / "fetched",
             "/tmp/nope": tmp_path / "nope"}
    paths[f"/tmp/{SEG}"].write_bytes(segment)

    def run(example: Example) -> subprocess.CompletedProcess[str]:
        argv = [str(paths.get(w, w)) for w in _substituted(example, world, bucket=bucket)]
        return _run(argv, world)

    push, fetch, again, missing = (run(e) for e in lines)
    assert push.returncode == 0, push.stderr
    stored = world.store(bucket).get(f"wal_archive/{SEG}.zst")
    assert fetch.returncode == 0, fetch.stderr
    assert paths["/tmp/fetched"].read_bytes() == segment
    assert again.returncode == 0, again.stderr
    assert world.store(bucket).get(f"wal_archive/{SEG}.zst") == stored
    assert missing.returncode == 1, missing.stderr
    assert not paths["/tmp/nope"].exists()


def test_encryption_section_wal_lines_round_trip(world: World, moto_admin_client: object,
                                                 tmp_path: Path) -> None:
    bucket = _fresh_bucket(moto_admin_client, world, "walenc")
    push = [e for e in examples("wal-push") if "..." in e.text]
    fetch = [e for e in examples("wal-fetch") if "..." in e.text]
    assert [e.line for e in push + fetch] == [804, 805]
    segment = make_segment(SYSID_A, 8, SEG)
    (tmp_path / SEG).write_bytes(segment)
    pushed = _run(_substituted(push[0], world, elided=_storage_flags(bucket),
                               wal=(str(tmp_path / SEG), SEG)), world)
    assert pushed.returncode == 0, pushed.stderr
    assert f"wal_archive/{SEG}.zst.age" in _keys(world, bucket)
    fetched = _run(_substituted(fetch[0], world, elided=_storage_flags(bucket),
                                wal=(str(tmp_path / "fetched"), SEG)), world)
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "fetched").read_bytes() == segment


def _seed_systemd_env() -> dict[str, str]:
    """The README's /etc/cloud-dump/storj.env (its "Production setup (systemd)")."""
    text = SEED_README.read_text()
    body = text[text.index("tee /etc/cloud-dump/storj.env"):]
    body = body[body.index("\n") + 1:body.index("\nEOF")]
    return dict(line.split("=", 1) for line in body.splitlines())


def test_systemd_archive_command_takes_the_seed_environment(
    world: World, moto_admin_client: object, tmp_path: Path
) -> None:
    """``archive_command = 'cloud-dump wal-push %p %f --storage storj'`` with the README's
    storj.env: STORJ_BUCKET, CLOUD_DUMP_CLUSTER, WAL_ENCRYPT and WAL_PASSPHRASE are honoured
    (the grant ignored: S3 credentials are there), and wal-fetch decrypts with WAL_PASSPHRASE."""
    bucket = _fresh_bucket(moto_admin_client, world, "systemd")
    seed_env = {**_seed_systemd_env(), "STORJ_BUCKET": bucket}
    assert seed_env["WAL_ENCRYPT"] == "true" and seed_env["CLOUD_DUMP_CLUSTER"] == "prod-pg17"
    line = _only("archive_command = 'cloud-dump wal-push %p %f --storage storj'")
    segment = make_segment(SYSID_A, 9, SEG)
    (tmp_path / SEG).write_bytes(segment)
    pushed = _run(_substituted(line, world, wal=(str(tmp_path / SEG), SEG)), world, **seed_env)
    assert pushed.returncode == 0, pushed.stderr
    assert f"prod-pg17/wal_archive/{SEG}.zst.age" in _keys(world, bucket)
    fetch = ["wal-fetch", SEG, str(tmp_path / "fetched"), "--storage", "storj"]
    assert _run(fetch, world, **seed_env).returncode == 0
    assert (tmp_path / "fetched").read_bytes() == segment
    wrong = _run([*fetch[:2], str(tmp_path / "wrong"), *fetch[3:]], world,
                 **{**seed_env, "WAL_PASSPHRASE": "not-it"})
    assert wrong.returncode == 200 and not (tmp_path / "wrong").exists()


@pytest.mark.parametrize(("backup_line", "restore_line"), [(800, 801), (815, 818)],
                         ids=["passphrase", "keypair"])
def test_encryption_section_backup_and_restore(world: World, backup_line: int,
                                               restore_line: int) -> None:
    backup = next(e for e in examples("backup", has="...") if e.line == backup_line)
    restore = next(e for e in examples("restore", has="...") if e.line == restore_line)
    name = f"enc-{backup_line}"
    flags = _storage_flags(world.bucket)
    done = _run(_substituted(backup, world, elided=[
        *flags, "--db-url", world.flat.cluster.replication_url(), "--name", name]), world)
    assert done.returncode == 0, done.stderr
    assert any(k.startswith(f"{name}/base.tar") and k.endswith(".age") for k in _keys(world))
    pgdata = _new_pgdata()
    _restore(_substituted(restore, world, elided=[*flags, "--name", name, "--pgdata",
                                                  str(pgdata)]), world, pgdata)
    assert [phase for phase, _ in _phases(pgdata, promote=False)] == ["0", "a", "b", "c"]


@pytest.mark.parametrize("line", [553, 556], ids=["passphrase", "keypair"])
def test_cli_reference_encrypted_backups_are_encrypted(world: World, line: int) -> None:
    backup = next(e for e in examples("backup", has="...") if e.line == line)
    name = f"enc-{line}"
    done = _run(_substituted(backup, world, elided=[
        *_storage_flags(world.bucket), "--db-url", world.flat.cluster.replication_url(),
        "--name", name]), world)
    assert done.returncode == 0, done.stderr
    manifest = world.store().get(f"{name}/manifest.json").decode()
    assert ('"passphrase"' if line == 553 else '"recipients"') in manifest


def test_restore_wal_passphrase_opens_an_archive_encrypted_otherwise(
    world: World, pg_factory: PgFactory, moto_admin_client: object
) -> None:
    """The README's encrypted archive_command (``--encrypt --passphrase "wal-secret"``), an
    unencrypted backup, and restore's ``--wal-passphrase``: the copy replays the encrypted WAL,
    and the passphrase is in the restore config only, never in postgresql.auto.conf."""
    bucket = _fresh_bucket(moto_admin_client, world, "walpass")
    line = _only("archive_command = 'cloud-dump wal-push %p %f --encrypt --passphrase "
                 "\"wal-secret\" --cluster prod-pg17 --storage storj --storj-access \"<grant>\" "
                 "--storj-bucket my-backups'")
    server_env = _server_env_file({k: v for k, v in world.env.items()
                                   if k != "CLOUD_DUMP_EXECUTABLE"})
    words = [str(world.launcher), *_substituted(line, world, bucket=bucket),
             "--config", str(server_env)]
    cluster = pg_factory(15, archive_command=" ".join(
        w if w in ("%p", "%f") else shlex.quote(w) for w in words))
    cluster.sql("CREATE TABLE seed (id int, phase text)")
    _write_rows(cluster, "0")
    backup = _run(["backup", "--cluster", "prod-pg17", "--name", "b", "--db-url",
                   cluster.replication_url(), *_storage_flags(bucket)], world)
    assert backup.returncode == 0, backup.stderr
    _write_rows(cluster, "a")
    wait_archived(cluster)
    assert any(k.endswith(".zst.age") for k in _keys(world, bucket))
    pgdata = _new_pgdata()
    restore = ["restore", "--cluster", "prod-pg17", "--name", "b", "--pgdata", str(pgdata),
               *_storage_flags(bucket), "--recovery-target", "latest"]
    _restore([*restore, "--wal-passphrase", "wal-secret"], world, pgdata)
    assert "wal-secret" not in (pgdata / "postgresql.auto.conf").read_text()
    assert 'CLOUD_DUMP_PASSPHRASE="wal-secret"' in default_restore_config(pgdata).read_text()
    assert [phase for phase, _ in _phases(pgdata, promote=True)] == ["0", "a"]


@pytest.mark.parametrize("line", [541, 141, 600, 492, 496], ids=lambda n: f"line{n}")
def test_a_grant_without_gateway_credentials_is_refused(
    world: World, moto_admin_client: object, tmp_path: Path, line: int
) -> None:
    """The seed's command lines as they are, without S3 credentials: one line saying how to get
    the gateway's (exit 3; wal-fetch 200), nothing stored or written, the grant never shown."""
    bucket = _fresh_bucket(moto_admin_client, world, f"grant{line}")
    example = next(e for e in EXAMPLES if e.line == line)
    (tmp_path / SEG).write_bytes(make_segment(SYSID_A, 10, SEG))
    pgdata = tmp_path / "pgdata"
    argv = [str(tmp_path / SEG) if w == f"/tmp/{SEG}" else
            str(tmp_path / "fetched") if w == "/tmp/fetched" else w
            for w in _substituted(example, world, bucket=bucket, pgdata=pgdata)]
    argv = [a.replace("<grant>", "1GrantValue") for a in argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"HOME": str(tmp_path), "CLOUD_DUMP_S3_ENDPOINT": world.endpoint})
    done = subprocess.run([str(VENV_BIN / "cloud-dump"), *argv], env=env, capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == (200 if example.verb == "wal-fetch" else 3), done.stderr
    error = error_line(done.stderr)
    assert "uplink share --register --readonly=false" in error
    assert "S3 credentials" in error and "1GrantValue" not in done.stderr
    assert _keys(world, bucket) == set()
    assert not pgdata.exists() and not (tmp_path / "fetched").exists()


def test_gateway_is_storjs_unless_an_endpoint_is_given(world: World) -> None:
    """Without CLOUD_DUMP_S3_ENDPOINT, --storage storj goes to Storj's hosted gateway: the
    restore config a target restore would write names it (checked without a network: the
    endpoint is only recorded here)."""
    from coordinator.cli.seed import resolve_storj

    values: dict[str, object] = {"storage": "storj", "storj_bucket": "b", "s3_endpoint": None,
                                 "storj_access": "<grant>", "broker": None}
    resolve_storj(values, "list")
    assert values == {"storage": "s3://b", "storj_bucket": "b", "s3_endpoint": GATEWAY_ENDPOINT,
                      "storj_access": None, "storj_api_key": None, "storj_satellite": None,
                      "storj_passphrase": None, "broker": None}


def test_seed_wal_variables_that_disagree_in_one_place_are_refused(tmp_path: Path) -> None:
    """Same place, different values: refused naming both, never a secret's value; a config
    file's value wins over an inherited one (then the push goes on, to a missing file)."""
    path = tmp_path / SEG
    encrypt = run_cli("wal-push", str(path), SEG, env={
        "WAL_ENCRYPT": "true", "CLOUD_DUMP_WAL_ENCRYPT": "false"})
    assert encrypt.returncode == 3
    assert "WAL_ENCRYPT='true'" in error_line(encrypt.stderr)
    secret = run_cli("wal-fetch", SEG, str(path), env={
        "WAL_PASSPHRASE": "one-secret", "CLOUD_DUMP_PASSPHRASE": "another-secret"})
    assert secret.returncode == 200
    line = error_line(secret.stderr)
    assert "WAL_PASSPHRASE" in line and "CLOUD_DUMP_PASSPHRASE" in line
    assert "secret" not in line.replace("_PASSPHRASE", "")
    config = tmp_path / "archive.conf"
    config.write_text("WAL_COMPRESS=false\n")
    file_wins = run_cli("wal-push", str(path), SEG, "--config", str(config), "--storage",
                        f"file://{tmp_path}/missing", env={"CLOUD_DUMP_WAL_COMPRESSION": "zstd"})
    # Past the settings (a disagreement would be 3): the file %p names does not exist.
    assert file_wins.returncode == 16, file_wins.stderr
