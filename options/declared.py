"""The table of every setting: one ``Option`` per flag (per set of commands that share its
meaning) and per environment-only variable.

A row says everything the rest of cloud-dump needs to know about a setting: its flag and the
environment variable that supplies it when the flag is absent, how its text is read (``kind``),
its default, its range, which commands take it (``"worker"`` for the Celery workers), whether it
is a secret, and its help. Built from it: the parser (``coordinator.cli.main``), the fast path's
flag sets (``coordinator.cli.fastpath``), the range checks (``coordinator.cli.limits``), the
config file's unknown-key warning (``coordinator.cli.configfile``), the workers' settings
(``tasks.settings``); ``tests/test_options.py`` holds the README's configuration table equal to it.

Standard library only, and not even ``typing``: the wal-push fast path imports this module on
every ``archive_command`` call.
"""

from __future__ import annotations

import math
import os

DAY_S = 86_400.0
HOUR_S = 3_600.0
ENV_PREFIX = "CLOUD_DUMP_"

BACKUP, RESTORE, LIST, CHECK = "backup", "restore", "list", "check"
VERIFY, CLEANUP, EXPIRE, DELETE, KEEP = "verify", "cleanup", "expire", "delete", "keep"
INFO = "info"
WAL_PUSH, WAL_FETCH, WORKER = "wal-push", "wal-fetch", "worker"
COMMANDS = (
    BACKUP, RESTORE, LIST, VERIFY, INFO, EXPIRE, DELETE, KEEP, CLEANUP, WAL_PUSH, WAL_FETCH,
    CHECK,
)
ALL = frozenset(COMMANDS)
# Commands that encrypt or decrypt (verify: with --deep; info: the newest WAL it reads).
KEYED = frozenset({BACKUP, RESTORE, WAL_PUSH, WAL_FETCH, VERIFY, INFO})
WAL_ARCHIVE = frozenset({RESTORE, WAL_PUSH, WAL_FETCH})

# storage.layout.COMPRESSIONS, spelled out: this module is standard library only and below
# storage (the fast path imports it). tests/coordinator/test_codecs.py holds the two equal, and
# the --compression-level row's limit and range text equal to coordinator.codecs' level ranges.
COMPRESSIONS = ("zstd", "gzip", "lz4", "none")
LOG_LEVELS = ("debug", "info", "warning", "warn", "error")  # warn: the seed's spelling

# Kinds: how a value's text is read.
TEXT = "text"  # a string (URL, name, path)
INT = "int"  # a whole number in ``limit``
FLOAT = "float"  # a number in ``limit``
CHOICE = "choice"  # one of ``choices``
SWITCH = "switch"  # a flag without a value; its variable is true/false
BOOL = "bool"  # --flag / --no-flag; its variable is true/false; None: not given
REPEATED = "repeated"  # a repeatable flag; its variable is comma-separated
CONST = "const"  # a flag that stores ``const`` into another option's ``dest``

# --help groups.
STORAGE_AND_BROKER = "storage and broker"
ENCRYPTION = "encryption"
RECOVERY = "point-in-time recovery (writes restore_command, the target and recovery.signal)"
WAL = "WAL archive"


class Limit:
    """A number of ``kind`` (int or float) from ``low`` to ``high``; ``above`` excludes ``low``."""

    __slots__ = ("above", "high", "kind", "low")

    def __init__(
        self, kind: type[int] | type[float], low: float, high: float, *, above: bool = False
    ) -> None:
        self.kind = kind
        self.low = low
        self.high = high
        self.above = above

    def describe(self) -> str:
        """The range in words: "a whole number from 1 to 64", "a number above 0, at most 60"."""
        what = "a whole number" if self.kind is int else "a number"
        low, high = _plain(self.low), _plain(self.high)
        if self.above:
            return f"{what} above {low}, at most {high}"
        return f"{what} from {low} to {high}"

    def describe_short(self) -> str:
        """The range for --help: "1-64", "above 0, up to 86400"."""
        low, high = _plain(self.low), _plain(self.high)
        return f"above {low}, up to {high}" if self.above else f"{low}-{high}"

    def problem(self, text: str) -> str | None:
        """Why ``text`` is not an acceptable value; None when it is."""
        value = self.parse(text)
        if value is None:
            return "is not a whole number" if self.kind is int else "is not a number"
        too_low = value <= self.low if self.above else value < self.low
        if too_low or value > self.high:
            return f"is out of range: expected {self.describe()}"
        return None

    def parse(self, text: str) -> int | float | None:
        """``text`` as a number of this kind (finite), None when it is not one."""
        try:
            value = self.kind(text.strip())
        except ValueError:
            return None
        return value if math.isfinite(value) else None


def _plain(number: float) -> str:
    return str(int(number)) if number == int(number) else str(number)


class Option:
    """One setting. ``flag`` None: environment-only; ``env`` None: flag-only.

    ``dest`` is the attribute of the parsed command line (default: the flag's name with
    underscores); ``group`` the --help section (None: the command's own options); ``exclusive``
    names a set of which at most one may be given; ``worker_default`` is what a worker uses when
    the variable is unset, where it differs from the CLI's default; ``range_text`` replaces the
    range --help shows (when the check narrows it further).
    """

    __slots__ = (
        "choices", "commands", "const", "default", "dest", "env", "exclusive", "flag", "group",
        "help", "kind", "limit", "metavar", "range_text", "secret", "worker_default",
    )  # fmt: skip

    def __init__(
        self,
        flag: str | None,
        env: str | None,
        commands: frozenset[str] | set[str],
        help: str,
        *,
        kind: str = TEXT,
        default: object = None,
        metavar: str | None = None,
        choices: tuple[str, ...] | None = None,
        limit: Limit | None = None,
        secret: bool = False,
        group: str | None = None,
        dest: str | None = None,
        const: str | None = None,
        exclusive: str | None = None,
        worker_default: object = None,
        range_text: str | None = None,
    ) -> None:
        self.flag = flag
        self.env = env
        self.commands = frozenset(commands)
        self.help = help
        self.kind = kind
        self.default = default
        self.metavar = metavar
        self.choices = choices
        self.limit = limit
        self.secret = secret
        self.group = group
        self.dest = dest or (flag.lstrip("-").replace("-", "_") if flag else None)
        self.const = const
        self.exclusive = exclusive
        self.worker_default = worker_default
        self.range_text = range_text

    @property
    def takes_value(self) -> bool:
        """Whether the flag is followed by a value on the command line."""
        return self.kind not in (SWITCH, BOOL, CONST)

    def __repr__(self) -> str:
        return f"Option({self.flag!r}, {self.env!r})"


def _seconds(low: float = 0, high: float = DAY_S) -> Limit:
    return Limit(float, low, high, above=True)


OPTIONS: tuple[Option, ...] = (
    # --- backup and restore ----------------------------------------------------------------
    Option("--name", "CLOUD_DUMP_BACKUP_NAME", {BACKUP}, "name of the backup (unique)",
           metavar="NAME"),
    Option("--name", "CLOUD_DUMP_BACKUP_NAME", {RESTORE},
           "name of the backup; none or 'latest': the newest that can reach the target",
           metavar="NAME"),
    # A password in the URL is a secret; libpq's PGPASSWORD or .pgpass keep it out of ps.
    Option("--db-url", "CLOUD_DUMP_DB_URL", {BACKUP},
           "replication connection, postgres://user@host/postgres?replication=yes",
           metavar="URL", secret=True),
    Option("--db-url", "CLOUD_DUMP_DB_URL", {CHECK},
           "the database whose archiving to check (the backup's URL will do: check connects "
           "without replication, and switches WAL)", metavar="URL", secret=True),
    Option("--compression", "CLOUD_DUMP_COMPRESSION", {BACKUP}, "compression of the archives",
           kind=CHOICE, default="zstd", choices=COMPRESSIONS),
    # The widest of the algorithms' ranges; the CLI narrows it to the chosen algorithm's.
    Option("--compression-level", "CLOUD_DUMP_COMPRESSION_LEVEL", {BACKUP},
           "level for the algorithm; default: its fast level", kind=INT, metavar="N",
           limit=Limit(int, 1, 22), range_text="zstd 1-22, gzip 1-9, lz4 1-12"),
    Option("--encrypt", "CLOUD_DUMP_ENCRYPT", {BACKUP},
           "encrypt with age; implied by a key or passphrase", kind=SWITCH, default=False,
           group=ENCRYPTION),
    Option("--recipient-key", "CLOUD_DUMP_RECIPIENT_KEY", {BACKUP, WAL_PUSH},
           "age public key file", kind=REPEATED, metavar="FILE", group=ENCRYPTION),
    # Workers read keys only for verify --deep, from their own environment: never from a task.
    Option("--identity-key", "CLOUD_DUMP_IDENTITY_KEY",
           {RESTORE, WAL_FETCH, VERIFY, INFO, WORKER},
           "age identity (private key) file", kind=REPEATED, metavar="FILE",
           group=ENCRYPTION),
    Option("--passphrase-file", "CLOUD_DUMP_PASSPHRASE_FILE", KEYED | {WORKER},
           "read the passphrase from the first line of FILE", metavar="FILE", group=ENCRYPTION),
    # The environment's passphrase is not the flag's default: only a passphrase typed on the
    # command line (visible in ps) gets the warning (coordinator.cli.main).
    Option("--passphrase", None, KEYED,
           "the passphrase itself (visible in ps: prefer --passphrase-file or env "
           "CLOUD_DUMP_PASSPHRASE)", secret=True, group=ENCRYPTION),
    Option(None, "CLOUD_DUMP_PASSPHRASE", KEYED | {WORKER},
           "the passphrase (instead of --passphrase)", secret=True),
    # Backup: N parts of --part-size-mib staged in Redis (the coordinator keeps its copies in
    # temporary files; 2N bought no speed on bench-peers' prod and cost Redis ~30 MB);
    # restore: N ranges of at least 64 MiB streaming, each holding at most 8 MiB
    # (coordinator.rangedread).
    Option("--parallel", "CLOUD_DUMP_PARALLEL", {BACKUP},
           "uploads in flight / upload threads without a broker", kind=INT, default=4,
           metavar="N", limit=Limit(int, 1, 64)),
    Option("--parallel", "CLOUD_DUMP_PARALLEL", {RESTORE}, "ranged downloads in flight",
           kind=INT, default=4, metavar="N", limit=Limit(int, 1, 64)),
    # S3's smallest part (storage.base.S3_MIN_PART_SIZE_BYTES); a part is staged in Redis,
    # whose largest value is 512 MiB, and --parallel of them are staged at once. 8 MiB
    # (was 16): on bench-peers' prod backup Redis, workers and coordinator peaked 100 MB lower
    # for the same throughput. Past --s3-max-parts parts an archive continues in another object.
    Option("--part-size-mib", "CLOUD_DUMP_PART_SIZE_MIB", {BACKUP},
           "part size (every part but an archive's last)", kind=INT, default=8, metavar="MIB",
           limit=Limit(int, 5, 512)),
    Option("--part-timeout", "CLOUD_DUMP_PART_TIMEOUT", {BACKUP},
           "re-send a part not confirmed after this long", kind=FLOAT, default=300.0,
           metavar="SECONDS", limit=_seconds()),
    Option("--task-timeout", "CLOUD_DUMP_TASK_TIMEOUT", {BACKUP},
           "wait this long for claim/finalize tasks", kind=FLOAT, default=600.0,
           metavar="SECONDS", limit=_seconds()),
    Option("--progress", None, {BACKUP}, "live progress line on a terminal (default on)",
           kind=BOOL, default=True),
    Option("--allow-unchecked-tablespaces", "CLOUD_DUMP_ALLOW_UNCHECKED_TABLESPACES", {BACKUP},
           "PostgreSQL 13-15: back up even when the role cannot be asked whether the cluster has "
           "in-place tablespaces (those versions leave them out of a base backup)",
           kind=SWITCH, default=False),
    Option(None, "CLOUD_DUMP_HEARTBEAT_S", {BACKUP},
           "seconds between a running backup's heartbeats in its claim (cleanup leaves a "
           "backup alone until three are missed)", kind=FLOAT, default=60.0,
           limit=Limit(float, 0.1, HOUR_S)),
    Option(None, "CLOUD_DUMP_WAL_PREFIX", {BACKUP, LIST, VERIFY, CLEANUP, EXPIRE, DELETE, KEEP},
           "WAL archive prefix in the flat layout, for the WAL a backup, list or verify names "
           "(default wal_archive)"),
    # --- restore ---------------------------------------------------------------------------
    Option("--pgdata", "PGDATA", {RESTORE}, "target directory (absent or empty)",
           metavar="DIR"),
    Option("--tablespace-mapping", None, {RESTORE},
           "restore the tablespace recorded at OLD into NEW", kind=REPEATED,
           metavar="OLD=NEW"),
    Option("--owner", None, {RESTORE},
           "when run as root, give everything restored to USER (default: the owner of PGDATA "
           "if it exists, else of the directory it goes into; PostgreSQL cannot run as root)",
           metavar="USER[:GROUP]"),
    Option("--recovery-target-time", None, {RESTORE},
           "stop at this time, with an offset or a full zone name: '2026-03-22 14:30:00+00', "
           "'2026-03-22T16:30:00 Europe/Helsinki'", metavar="TIME", group=RECOVERY,
           exclusive="target"),
    Option("--recovery-target-lsn", None, {RESTORE}, "stop at this LSN", metavar="LSN",
           group=RECOVERY, exclusive="target"),
    Option("--recovery-target-xid", None, {RESTORE}, "stop at this transaction", metavar="XID",
           group=RECOVERY, exclusive="target"),
    Option("--recovery-target-name", None, {RESTORE},
           "stop at this restore point (pg_create_restore_point)", metavar="NAME",
           group=RECOVERY, exclusive="target"),
    Option("--recovery-target", None, {RESTORE},
           "immediate: as soon as consistent; latest: all archived WAL", kind=CHOICE,
           choices=("immediate", "latest"), group=RECOVERY, exclusive="target"),
    Option("--recovery-target-timeline", None, {RESTORE},
           "timeline to follow: current (the backup's), latest, or a timeline number (default: "
           "the one the archive's history leads to; refused when its timelines branch)",
           metavar="latest|current|N", group=RECOVERY),
    Option("--recovery-target-exclusive", None, {RESTORE},
           "stop just before the target instead of just after it", kind=SWITCH, default=False,
           group=RECOVERY),
    Option("--restore-config", None, {RESTORE},
           "where to write the settings restore_command reads (default: <PGDATA's "
           "name>.cloud-dump-restore.conf beside PGDATA, mode 0600; never one serving another "
           "PGDATA)", metavar="FILE", group=RECOVERY),
    Option("--archive-mode", None, {RESTORE},
           "off: write archive_mode = 'off' so the copy never archives; preserve: archive as "
           "its configuration says", kind=CHOICE, default="preserve",
           choices=("preserve", "off")),
    # What restore_command runs (restore writes it into the restore config); default: the
    # cloud-dump that runs the restore.
    Option(None, "CLOUD_DUMP_EXECUTABLE", {RESTORE},
           "the cloud-dump restore_command runs (default: the one that restores)"),
    # The WAL archive's keys where they are not the backup's (the seed's --wal-passphrase and
    # --wal-identity-key): for the history files restore reads, and in the restore config.
    Option("--wal-identity-key", "CLOUD_DUMP_WAL_IDENTITY_KEY", {RESTORE},
           "age identity file of the WAL archive, when not the backup's (default: the backup's "
           "keys)", kind=REPEATED, metavar="FILE", group=ENCRYPTION),
    Option("--wal-passphrase-file", "CLOUD_DUMP_WAL_PASSPHRASE_FILE", {RESTORE},
           "the WAL archive's passphrase, from the first line of FILE, when not the backup's",
           metavar="FILE", group=ENCRYPTION),
    Option("--wal-passphrase", None, {RESTORE},
           "the WAL archive's passphrase itself (visible in ps: prefer --wal-passphrase-file "
           "or env CLOUD_DUMP_WAL_PASSPHRASE)", secret=True, group=ENCRYPTION),
    Option(None, "CLOUD_DUMP_WAL_PASSPHRASE", {RESTORE},
           "the WAL archive's passphrase (instead of --wal-passphrase)", secret=True),
    # --- list ------------------------------------------------------------------------------
    Option("--json", None, {LIST, VERIFY}, "machine-readable output", kind=SWITCH,
           default=False),
    # --- info ------------------------------------------------------------------------------
    Option("--json", None, {INFO}, "one JSON document", kind=SWITCH, default=False,
           exclusive="format"),
    Option("--prometheus", None, {INFO},
           "Prometheus text format 0.0.4, for node_exporter's textfile collector", kind=SWITCH,
           default=False, exclusive="format"),
    # --- verify ----------------------------------------------------------------------------
    # Flag only: a CLOUD_DUMP_BACKUP_NAME set for backups must not narrow what verify checks.
    Option("--name", None, {VERIFY}, "verify this backup only (default: every backup)",
           metavar="NAME", exclusive="which"),
    Option("--all", None, {VERIFY}, "verify every backup (the default)", kind=SWITCH,
           default=False, exclusive="which"),
    Option("--parallel", "CLOUD_DUMP_PARALLEL", {VERIFY},
           "ranged reads in flight; with --deep, also archives and WAL batches checked at "
           "once without a broker", kind=INT, default=4, metavar="N", limit=Limit(int, 1, 64)),
    Option("--deep", None, {VERIFY},
           "also read every archive and the WAL back to their contents: decrypt, decompress, "
           "check each file against backup_manifest and each segment's header (spread over "
           "the workers with --broker)", kind=SWITCH, default=False),
    # --- cleanup ---------------------------------------------------------------------------
    Option("--older-than", None, {CLEANUP},
           "leave alone what showed a sign of life more recently (30m, 24h, 7d; default 24h)",
           metavar="AGE", default="24h"),
    Option("--dry-run", None, {CLEANUP, EXPIRE, DELETE},
           "print what would be removed, remove nothing", kind=SWITCH, default=False),
    # --- expire and delete -----------------------------------------------------------------
    Option("--retain", None, {EXPIRE}, "keep the newest N backups", kind=INT, metavar="N",
           limit=Limit(int, 1, 100_000), exclusive="policy"),
    Option("--recovery-window", None, {EXPIRE},
           "keep every point of the last AGE restorable (14d, 36h)", metavar="AGE",
           exclusive="policy"),
    Option("--name", None, {DELETE}, "the backup to delete", metavar="NAME"),
    Option("--until", None, {KEEP}, "keep it until this date (2027-01-31, or a time with a zone)",
           metavar="DATE", exclusive="keep"),
    Option("--forever", None, {KEEP}, "keep it until released (the default)", kind=SWITCH,
           default=False, exclusive="keep"),
    Option("--release", None, {KEEP}, "let expire remove it again", kind=SWITCH,
           default=False, exclusive="keep"),
    # --- WAL -------------------------------------------------------------------------------
    Option("--wal-prefix", "CLOUD_DUMP_WAL_PREFIX", WAL_ARCHIVE | {CHECK, INFO},
           "WAL archive prefix in the flat layout (default wal_archive; refused with --cluster)",
           metavar="PREFIX",
           group=WAL),
    Option("--spool-dir", "CLOUD_DUMP_SPOOL_DIR", WAL_ARCHIVE,
           "local directory for confirmation markers and prefetched WAL (default: "
           "pg_wal/cloud-dump of the data directory)", metavar="DIR", group=WAL),
    Option("--compression", "CLOUD_DUMP_WAL_COMPRESSION", {WAL_PUSH},
           "compression of the stored WAL", kind=CHOICE, default="zstd", choices=COMPRESSIONS),
    Option("--compress", None, {WAL_PUSH}, "the seed's flag: same as --compression zstd",
           kind=CONST, dest="compression", const="zstd"),
    Option("--encrypt", "CLOUD_DUMP_WAL_ENCRYPT", {WAL_PUSH},
           "encrypt with age; implied by a key or passphrase", kind=SWITCH, default=False,
           group=ENCRYPTION),
    # Segments in flight or spooled ahead of PostgreSQL: 16 MiB each, up to 1 GiB.
    Option("--look-ahead", "CLOUD_DUMP_WAL_LOOK_AHEAD", {WAL_PUSH},
           "also push up to N more segments already marked .ready", kind=INT, default=8,
           metavar="N", limit=Limit(int, 0, 64)),
    # pgBackRest's archive-timeout. PostgreSQL's archiver waits for the call, and so does a
    # fast shutdown; a push that gives up is retried by PostgreSQL, nothing is lost.
    Option("--timeout", "CLOUD_DUMP_WAL_PUSH_TIMEOUT", {WAL_PUSH},
           "give up (non-zero; PostgreSQL retries) if storage has not confirmed after this "
           "long; PostgreSQL's archiver, and a fast shutdown, wait for the call", kind=FLOAT,
           default=60.0, metavar="SECONDS", limit=_seconds()),
    Option(None, "CLOUD_DUMP_WAL_RETRY_S", {WAL_PUSH},
           "seconds after which a WAL push not yet answered is sent again", kind=FLOAT,
           default=15.0, limit=_seconds(high=HOUR_S)),
    Option(None, "CLOUD_DUMP_WAL_PUSHER_IDLE_EXIT", {WAL_PUSH},
           "seconds the WAL pusher waits for the next file before it exits", kind=FLOAT,
           default=2.0, limit=Limit(float, 0, HOUR_S)),
    Option("--prefetch", "CLOUD_DUMP_WAL_PREFETCH", {WAL_FETCH},
           "keep up to N following segments prefetched", kind=INT, default=8, metavar="N",
           limit=Limit(int, 0, 64)),
    Option("--allow-partial", None, {WAL_FETCH},
           "serve <segment>.partial files when asked for them", kind=SWITCH, default=False),
    Option(None, "CLOUD_DUMP_WAL_FETCH_RETRIES", {WAL_FETCH},
           "attempts of a fetch, 2 s then 6 s apart", kind=INT, default=3,
           limit=Limit(int, 1, 20)),
    Option(None, "CLOUD_DUMP_WAL_PREFETCH_WAIT", {WAL_FETCH},
           "seconds a call waits for a segment the prefetcher is fetching", kind=FLOAT,
           default=30.0, limit=Limit(float, 0, HOUR_S)),
    Option(None, "CLOUD_DUMP_WAL_PREFETCH_IDLE_EXIT", {WAL_FETCH},
           "seconds the prefetcher waits for the next call before it exits", kind=FLOAT,
           default=5.0, limit=Limit(float, 0, HOUR_S)),
    # The seed's WAL variables, read as the variable each names (options.seed.ALIASES).
    Option(None, "WAL_COMPRESS", {WAL_PUSH},
           "the seed's: false is CLOUD_DUMP_WAL_COMPRESSION=none, true zstd (as --compress)"),
    Option(None, "WAL_ENCRYPT", {WAL_PUSH}, "the seed's: CLOUD_DUMP_WAL_ENCRYPT"),
    Option(None, "WAL_PASSPHRASE", {WAL_PUSH, WAL_FETCH}, "the seed's: CLOUD_DUMP_PASSPHRASE",
           secret=True),
    Option(None, "WAL_PASSPHRASE", {RESTORE}, "the seed's: CLOUD_DUMP_WAL_PASSPHRASE",
           secret=True),
    Option(None, "WAL_RECIPIENT_KEY", {WAL_PUSH}, "the seed's: CLOUD_DUMP_RECIPIENT_KEY"),
    Option(None, "WAL_IDENTITY_KEY", {WAL_FETCH}, "the seed's: CLOUD_DUMP_IDENTITY_KEY"),
    Option(None, "WAL_IDENTITY_KEY", {RESTORE}, "the seed's: CLOUD_DUMP_WAL_IDENTITY_KEY"),
    # The seed's global --parallel, on its commands that have nothing to run in parallel here:
    # accepted (and checked) so that its command lines keep working. Flag only: a backup's
    # CLOUD_DUMP_PARALLEL in a server's environment must not reach archive_command.
    Option("--parallel", None, {LIST, WAL_PUSH, WAL_FETCH},
           "the seed's flag: accepted, no effect (one file per call; list reads manifests)",
           kind=INT, default=4, metavar="N", limit=Limit(int, 1, 64)),
    # --- check -----------------------------------------------------------------------------
    Option("--timeout", None, {CHECK},
           "how long to wait for each worker, and for the switched WAL segment to be archived",
           kind=FLOAT, default=60.0, metavar="SECONDS", limit=_seconds()),
    # --- every command: storage, broker, logging -------------------------------------------
    Option("--storage", "CLOUD_DUMP_STORAGE", ALL | {WORKER},
           "s3://bucket[/prefix], file:///path, or storj (the seed's: --storj-bucket through "
           "Storj's S3 gateway)", metavar="URL", group=STORAGE_AND_BROKER),
    # The seed's Storj settings (options.seed): the bucket, reached through Storj's S3-compatible
    # gateway with S3 credentials; the native credentials below open nothing here.
    Option("--storj-bucket", "STORJ_BUCKET", ALL | {WORKER},
           "with --storage storj (or no --storage): this bucket, through Storj's S3 gateway "
           "(--s3-endpoint, default https://gateway.storjshare.io) with its S3 credentials "
           "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)", metavar="BUCKET",
           group=STORAGE_AND_BROKER),
    Option("--storj-access", "STORJ_ACCESS", ALL,
           "the seed's access grant: not used (the gateway takes S3 credentials; refused "
           "without them)", metavar="GRANT", secret=True, group=STORAGE_AND_BROKER),
    Option("--storj-api-key", "STORJ_API_KEY", ALL,
           "the seed's API key: not used, as --storj-access", metavar="KEY", secret=True,
           group=STORAGE_AND_BROKER),
    Option("--storj-satellite", "STORJ_SATELLITE", ALL,
           "the seed's satellite address: not used, as --storj-access", metavar="ADDRESS",
           group=STORAGE_AND_BROKER),
    Option("--storj-passphrase", "STORJ_PASSPHRASE", ALL,
           "the seed's Storj encryption passphrase: not used, as --storj-access",
           metavar="PASSPHRASE", secret=True, group=STORAGE_AND_BROKER),
    Option("--s3-endpoint", "CLOUD_DUMP_S3_ENDPOINT", ALL | {WORKER},
           "S3-compatible endpoint, e.g. MinIO or Storj's gateway", metavar="URL",
           group=STORAGE_AND_BROKER),
    Option("--s3-region", "CLOUD_DUMP_S3_REGION", ALL | {WORKER},
           "S3 region (default: from the AWS configuration)", metavar="REGION",
           group=STORAGE_AND_BROKER),
    Option("--s3-path-style", "CLOUD_DUMP_S3_PATH_STYLE", ALL | {WORKER},
           "path-style addressing; default: on with --s3-endpoint", kind=BOOL,
           group=STORAGE_AND_BROKER),
    # storage.base.MIN_CONFIGURABLE_PART_COUNT .. S3_MAX_PART_COUNT
    Option("--s3-max-parts", "CLOUD_DUMP_S3_MAX_PARTS", ALL | {WORKER},
           "most parts the store accepts in one upload (an archive with more continues in "
           "another object)", kind=INT, default=10_000, metavar="N",
           limit=Limit(int, 1, 10_000), group=STORAGE_AND_BROKER),
    Option("--storage-max-attempts", "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS", ALL | {WORKER},
           "attempts per storage request, with backoff", kind=INT, default=5, metavar="N",
           limit=Limit(int, 1, 20), group=STORAGE_AND_BROKER),
    Option("--broker", "CLOUD_DUMP_BROKER_URL", ALL | {WORKER},
           "Celery broker, e.g. redis://host:6379/0; without it work runs in-process",
           metavar="URL", group=STORAGE_AND_BROKER, worker_default="redis://127.0.0.1:6379/0"),
    Option("--result-backend", "CLOUD_DUMP_RESULT_BACKEND", ALL | {WORKER},
           "where task results go; default: the broker", metavar="URL",
           group=STORAGE_AND_BROKER),
    Option("--staging-url", "CLOUD_DUMP_STAGING_URL", ALL | {WORKER},
           "Redis for staged part payloads; default: the broker", metavar="URL",
           group=STORAGE_AND_BROKER),
    Option("--cluster", "CLOUD_DUMP_CLUSTER", ALL,
           "cluster namespace: <cluster>/backup/, <cluster>/wal_archive/", metavar="NAME"),
    Option("--config", "CLOUD_DUMP_CONFIG", ALL,
           "KEY=VALUE file of settings and credentials; its values override the environment, "
           "flags override both", metavar="FILE"),
    Option("--log-level", "CLOUD_DUMP_LOG_LEVEL", ALL, "how much to log", kind=CHOICE,
           default="info", choices=LOG_LEVELS, metavar="LEVEL"),
)


def options_of(command: str) -> list[Option]:
    """The rows ``command`` takes, in table order."""
    return [option for option in OPTIONS if command in option.commands]


def option_for(command: str, flag: str) -> Option | None:
    """``command``'s row for ``flag``, None when it takes no such flag."""
    for option in OPTIONS:
        if option.flag == flag and command in option.commands:
            return option
    return None


def env_names() -> frozenset[str]:
    """Every variable cloud-dump reads (``CLOUD_DUMP_*`` and ``PGDATA``)."""
    return frozenset(option.env for option in OPTIONS if option.env)


def number_from_env(env: str) -> int | float:
    """The environment-only number ``env`` (``CLOUD_DUMP_WAL_RETRY_S`` ...), else its default.

    The CLI checked the variable before the command ran (exit 3 naming it), and a detached
    helper inherits the environment its command checked; a value out of range here can only
    be one set behind the CLI's back, and is taken as unset.
    """
    option = next(o for o in OPTIONS if o.env == env and o.flag is None)
    assert option.limit is not None and isinstance(option.default, int | float)
    text = os.environ.get(env)
    if text and option.limit.problem(text) is None:
        value = option.limit.parse(text)
        assert value is not None
        return value
    return option.default


def value_flags(command: str) -> frozenset[str]:
    """``command``'s flags that are followed by a value."""
    return frozenset(
        o.flag for o in options_of(command) if o.flag and o.takes_value
    )


def switches(command: str) -> frozenset[str]:
    """``command``'s flags that take no value (``--no-x`` included for --x/--no-x flags)."""
    names: set[str] = set()
    for o in options_of(command):
        if o.flag and not o.takes_value:
            names.add(o.flag)
            if o.kind == BOOL:
                names.add("--no-" + o.flag[2:])
    return frozenset(names)
