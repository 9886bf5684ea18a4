"""Worker settings, read once from the environment when a worker process starts.

Every variable is ``CLOUD_DUMP_<FIELD>``: ``CLOUD_DUMP_BROKER_URL``, ``CLOUD_DUMP_STORAGE``,
``CLOUD_DUMP_S3_ENDPOINT``, ... Storage credentials are not settings: boto3's standard chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles) supplies them, so they
never pass through cloud-dump's own configuration, logs or task messages.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.base import S3_MAX_PART_COUNT

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


class WorkerSettings(BaseSettings):
    """What a worker needs: where tasks come from and which store it writes to."""

    model_config = SettingsConfigDict(env_prefix="CLOUD_DUMP_", extra="ignore")

    broker_url: str = DEFAULT_BROKER_URL
    # Results (ETags, confirmations) go back through Redis too unless told otherwise.
    result_backend: str | None = None
    storage: str | None = None
    # Where staged part payloads live; the broker's Redis unless told otherwise.
    staging_url: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_path_style: bool | None = None
    s3_max_parts: int = S3_MAX_PART_COUNT
    storage_max_attempts: int = 5
    # verify --deep only: the keys that decrypt backups and WAL, from this worker's own
    # environment (a task never carries one). Comma-separated identity files, as the CLI's.
    identity_key: str | None = None
    passphrase_file: str | None = None
    passphrase: SecretStr | None = None
    # The seed's STORJ_BUCKET, under its own name: with CLOUD_DUMP_STORAGE=storj (or none), the
    # bucket at Storj's gateway (options.seed), as the CLI resolves it.
    storj_bucket: str | None = Field(default=None, validation_alias="STORJ_BUCKET")
