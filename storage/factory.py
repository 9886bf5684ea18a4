"""Opening a store: ``open_storage(url, options)`` is the only place that names a backend
(``storage.urls`` says where a URL points without opening it).

Backends are imported lazily so that a command using local storage never pays for boto3.
"""

from __future__ import annotations

from storage.base import Storage
from storage.options import StorageOptions
from storage.urls import parse_storage_url


def open_storage(url: str, options: StorageOptions | None = None) -> Storage:
    """Open the store that ``url`` names: ``s3://bucket[/prefix]`` or ``file:///path``."""
    options = options or StorageOptions()
    scheme, where, prefix = parse_storage_url(url)
    if scheme == "s3":
        from storage.s3 import S3Storage

        return S3Storage(where, prefix, options)
    from storage.local import LocalStorage

    return LocalStorage(where, options)


def s3_credentials_found() -> bool:
    """Whether S3 credentials are configured for this process, instance and container roles
    aside (``storage.s3.static_credentials_found``)."""
    from storage.s3 import static_credentials_found

    return static_credentials_found()
