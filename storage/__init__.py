"""Object storage for cloud-dump: the protocol, its error tree, backends and key layout.

The names below are loaded on first use (PEP 562), so that ``from storage.errors import ...``
in a per-segment command such as ``wal-push`` does not pay for dataclasses, hashlib and the
backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Redundant aliases mark these as re-exports for the type checker.
    from storage.base import Capabilities as Capabilities
    from storage.base import MultipartUpload as MultipartUpload
    from storage.base import ObjectInfo as ObjectInfo
    from storage.base import Storage as Storage
    from storage.base import UploadedPart as UploadedPart
    from storage.factory import open_storage as open_storage
    from storage.options import StorageOptions as StorageOptions

_EXPORTS = {
    "Capabilities": "storage.base",
    "MultipartUpload": "storage.base",
    "ObjectInfo": "storage.base",
    "Storage": "storage.base",
    "UploadedPart": "storage.base",
    "StorageOptions": "storage.options",
    "open_storage": "storage.factory",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
