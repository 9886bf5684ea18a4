"""The seed's settings at the CLI edge (``options.seed`` says what they mean).

- ``apply_seed_variables``: before the command line is parsed, the seed's WAL variables become
  the ``CLOUD_DUMP_*`` variables they stand for, so that flags still win over them and the
  parser, the range checks and the settings see one set of names.
- ``resolve_storj``: when the settings are made, ``--storage storj`` becomes the bucket's
  ``s3://`` URL at Storj's gateway, so that everything below (the commands, the tasks' storage
  location, the restore config, the spool markers) sees an ordinary S3 store. The seed's
  native Storj credentials open nothing here: a command that reaches storage itself without
  the gateway's S3 credentials is refused (exit 3) with one line saying how to get them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping, Sequence

from coordinator.cli.configfile import from_config_file
from options.declared import BACKUP, WAL_FETCH, WAL_PUSH
from options.seed import GRANT_SETTINGS, seed_variables, storj_location
from storage.errors import ConfigError

log = logging.getLogger(__name__)

# Commands run once per WAL file: a warning there is one line per segment in PostgreSQL's log.
_PER_SEGMENT = frozenset({WAL_PUSH, WAL_FETCH})


def apply_seed_variables(argv: Sequence[str]) -> None:
    """Set the ``CLOUD_DUMP_*`` variables the seed's WAL variables give the command of
    ``argv``; ``ConfigError`` for a value that is not one or two that disagree."""
    updates, problem = seed_variables(argv[0] if argv else "", os.environ, from_config_file)
    if problem is not None:
        raise ConfigError(problem)
    os.environ.update(updates)


def resolve_storj(values: MutableMapping[str, object], command: str) -> None:
    """Turn the seed's Storj settings among ``values`` (a command's settings by field name)
    into the gateway's ``storage`` and ``s3_endpoint``; the native credentials are dropped.

    ``ConfigError``: ``storj`` without a bucket, or, for a command that reaches storage itself
    (not a backup or wal-push handing the work to workers), no S3 credentials.
    """
    given = [f"{flag}/{env}" for field, flag, env in GRANT_SETTINGS if values.get(field)]
    for field, _, _ in GRANT_SETTINGS:
        values[field] = None  # never needed past here: kept out of helpers' settings too
    storage, endpoint, problem = storj_location(
        _text(values.get("storage")), _text(values.get("storj_bucket")),
        _text(values.get("s3_endpoint")))
    if problem is not None:
        raise ConfigError(problem)
    if storage is None or storage == values.get("storage"):
        return  # not Storj: its credentials, if any, concern nothing here
    values["storage"], values["s3_endpoint"] = storage, endpoint
    from storage.factory import s3_credentials_found  # boto3: only for a Storj store

    workers_store = values.get("broker") and command in (BACKUP, WAL_PUSH)
    if not workers_store and not s3_credentials_found():
        bucket = storage.removeprefix("s3://")
        what = (f"not the Storj {' or '.join(given)} given" if given
                else "and none were found")
        raise ConfigError(
            f"cloud-dump reaches Storj through its S3-compatible gateway ({endpoint}), which "
            f"takes S3 credentials, {what}: create them with 'uplink share --register "
            f"--readonly=false sj://{bucket}' (or 'S3 credentials' in the Storj console) and "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if given and command not in _PER_SEGMENT:
        log.warning("%s not used: Storj is reached through its S3 gateway with the S3 "
                    "credentials (AWS_ACCESS_KEY_ID); remove it", " and ".join(given))


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
