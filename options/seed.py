"""The Go tool's settings (the seed cloud-dump reimplements) as cloud-dump's own.

Two translations, both pure functions of settings text, for every place that resolves
settings: the full CLI (``coordinator.cli.seed``), the WAL fast path
(``coordinator.cli.fastpath``) and the workers (``tasks.app``).

- ``--storage storj`` (the seed's default backend) with ``--storj-bucket B``/``STORJ_BUCKET``
  is the bucket ``s3://B`` behind Storj's S3-compatible gateway, whose endpoint is
  ``GATEWAY_ENDPOINT`` unless ``--s3-endpoint``/``CLOUD_DUMP_S3_ENDPOINT`` names another (a
  self-hosted gateway). The seed stores at the bucket's root, so there is no prefix. The seed's
  access grant (or API key, satellite and passphrase) speaks Storj's native protocol, which
  cloud-dump does not: the gateway takes S3 credentials (``coordinator.cli.seed`` refuses a
  grant without them).
- The seed's WAL variables (``WAL_COMPRESS``, ``WAL_ENCRYPT``, ``WAL_PASSPHRASE``,
  ``WAL_RECIPIENT_KEY``, ``WAL_IDENTITY_KEY``; its README, "WAL archiving" variables) are read
  as the ``CLOUD_DUMP_*`` variable of the same meaning (``ALIASES``), at the same precedence:
  a flag wins over both, a config file's value over an inherited one, and two different values
  in the same place are refused rather than one silently chosen (an archive encrypted, or
  not, against what one of them says).

Standard library only, and not even ``typing``: the fast path imports this module.
"""

from __future__ import annotations

from options.declared import RESTORE, WAL_FETCH, WAL_PUSH

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

STORJ = "storj"
# Storj's hosted S3-compatible gateway (Storj docs, "S3 Compatible Gateway": gateway.storjshare.io).
GATEWAY_ENDPOINT = "https://gateway.storjshare.io"
# The seed's Storj credentials, flag and variable: none of them opens the gateway.
GRANT_SETTINGS = (
    ("storj_access", "--storj-access", "STORJ_ACCESS"),
    ("storj_api_key", "--storj-api-key", "STORJ_API_KEY"),
    ("storj_satellite", "--storj-satellite", "STORJ_SATELLITE"),
    ("storj_passphrase", "--storj-passphrase", "STORJ_PASSPHRASE"),
)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# Kinds of alias: how the seed's value becomes cloud-dump's, and which values agree.
_SAME = "same"  # the value as it is (a path list, a passphrase)
_BOOL = "bool"  # true/false, compared as booleans
_COMPRESS = "compress"  # the seed's WAL_COMPRESS: false is 'none', true is --compress (zstd)

# (seed variable, commands, cloud-dump variable, kind, secret): the seed README's "WAL
# archiving" table. For restore, WAL_PASSPHRASE and WAL_IDENTITY_KEY are the WAL archive's keys
# (--wal-passphrase, --wal-identity-key), which may differ from the backup's.
ALIASES = (
    ("WAL_COMPRESS", (WAL_PUSH,), "CLOUD_DUMP_WAL_COMPRESSION", _COMPRESS, False),
    ("WAL_ENCRYPT", (WAL_PUSH,), "CLOUD_DUMP_WAL_ENCRYPT", _BOOL, False),
    ("WAL_PASSPHRASE", (WAL_PUSH, WAL_FETCH), "CLOUD_DUMP_PASSPHRASE", _SAME, True),
    ("WAL_PASSPHRASE", (RESTORE,), "CLOUD_DUMP_WAL_PASSPHRASE", _SAME, True),
    ("WAL_RECIPIENT_KEY", (WAL_PUSH,), "CLOUD_DUMP_RECIPIENT_KEY", _SAME, False),
    ("WAL_IDENTITY_KEY", (WAL_FETCH,), "CLOUD_DUMP_IDENTITY_KEY", _SAME, False),
    ("WAL_IDENTITY_KEY", (RESTORE,), "CLOUD_DUMP_WAL_IDENTITY_KEY", _SAME, False),
)


def storj_location(
    storage: str | None, bucket: str | None, endpoint: str | None
) -> tuple[str | None, str | None, str | None]:
    """(storage URL, S3 endpoint, problem) for the storage settings given.

    ``storage`` ``storj`` (any case), or none at all with a Storj bucket (the seed's default
    backend), is ``s3://<bucket>`` at ``endpoint`` or else Storj's gateway; anything else is
    returned as it came. ``problem``: one line saying what is missing, else None.
    """
    if storage is not None and storage.lower() != STORJ:
        return storage, endpoint, None
    if storage is None and not bucket:
        return None, endpoint, None
    if not bucket:
        return None, endpoint, ("--storage storj needs a bucket: --storj-bucket BUCKET or "
                                "STORJ_BUCKET")
    return f"s3://{bucket.strip('/')}", endpoint or GATEWAY_ENDPOINT, None


def seed_variables(
    command: str, environ: Mapping[str, str], from_file: Callable[[str], bool]
) -> tuple[dict[str, str], str | None]:
    """The ``CLOUD_DUMP_*`` variables ``command`` gets from the seed's variables in
    ``environ``: (what to set, problem). ``from_file(name)`` says whether the config file set
    ``name`` (it wins over an inherited variable). ``problem``: one line (values of secrets
    never shown) for a value that is not one, or two different values in one place."""
    updates: dict[str, str] = {}
    for seed, commands, target, kind, secret in ALIASES:
        raw = environ.get(seed)
        if command not in commands or not raw:
            continue
        value = _converted(kind, raw)
        if value is None:
            return {}, f"{_shown(seed, raw, secret)} is not true or false"
        current = environ.get(target)
        if not current or _agree(kind, current, value):
            if not current:
                updates[target] = value
            continue
        seed_in_file, target_in_file = from_file(seed), from_file(target)
        if seed_in_file and not target_in_file:
            updates[target] = value  # the config file wins over the inherited environment
        elif target_in_file and not seed_in_file:
            continue
        else:
            where = "the config file" if seed_in_file else "the environment"
            return {}, (f"{_shown(seed, raw, secret)} (the seed's) and "
                        f"{_shown(target, current, secret)} disagree, both in {where}: "
                        "set one of them")
    return updates, None


def _converted(kind: str, raw: str) -> str | None:
    if kind == _SAME:
        return raw
    lowered = raw.strip().lower()
    if lowered not in _TRUE + _FALSE:
        return None
    if kind == _BOOL:
        return "true" if lowered in _TRUE else "false"
    return "zstd" if lowered in _TRUE else "none"


def _agree(kind: str, current: str, value: str) -> bool:
    """Whether cloud-dump's value ``current`` says what the seed's (converted) ``value`` says."""
    if kind == _BOOL:
        return (current.strip().lower() in _TRUE) == (value == "true")
    if kind == _COMPRESS:
        # WAL_COMPRESS=true asks for compression, and any algorithm is compression.
        return (current == "none") == (value == "none")
    return current == value


def _shown(name: str, value: str, secret: bool) -> str:
    return name if secret else f"{name}='{value}'"
