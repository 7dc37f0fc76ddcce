"""Whether the optional dependencies of the integrations are installed, without importing them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache

__all__ = [
    "is_accelerate_available",
    "is_deepspeed_available",
    "is_transformers_available",
    "package_version",
]


@cache
def package_version(import_name: str, metadata_name: str | None = None) -> str | None:
    """The installed version of a package that is also importable, else None."""
    if importlib.util.find_spec(import_name) is None:
        return None
    try:
        return importlib.metadata.version(metadata_name or import_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_available(import_name: str, min_version: str | None = None) -> bool:
    version = package_version(import_name)
    if version is None:
        return False
    if min_version is None:
        return True
    from packaging.version import Version

    return Version(version) >= Version(min_version)


def is_transformers_available(min_version: str | None = None) -> bool:
    return _is_available("transformers", min_version)


def is_accelerate_available(min_version: str | None = None) -> bool:
    return _is_available("accelerate", min_version)


def is_deepspeed_available(min_version: str | None = None) -> bool:
    return _is_available("deepspeed", min_version)
