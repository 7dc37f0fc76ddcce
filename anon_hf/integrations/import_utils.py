"""Whether the optional dependencies of the integrations are installed, and in the range anon_hf was tested with."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from functools import cache
from types import ModuleType

__all__ = [
    "SUPPORTED_VERSIONS",
    "is_accelerate_available",
    "is_deepspeed_available",
    "is_transformers_available",
    "package_version",
    "unsupported_version_message",
    "warn_if_unsupported",
]

logger = logging.getLogger(__name__)

# The releases `make test-compat` ran the integration tests against (oldest and newest of each range passed);
# pyproject.toml's extras declare the same ranges (tests/test_patches.py holds them equal).
SUPPORTED_VERSIONS: dict[str, str] = {
    "transformers": ">=5.0,<6",
    "accelerate": ">=1.10,<2",
    "deepspeed": ">=0.17,<0.20",
    "trl": "~=1.16.0",
}


@cache
def package_version(import_name: str, metadata_name: str | None = None) -> str | None:
    """The installed version of a package that is also importable, else None."""
    if importlib.util.find_spec(import_name) is None:
        return None
    try:
        return importlib.metadata.version(metadata_name or import_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_transformers_available() -> bool:
    return package_version("transformers") is not None


def is_accelerate_available() -> bool:
    return package_version("accelerate") is not None


def is_deepspeed_available() -> bool:
    return package_version("deepspeed") is not None


def is_supported_version(package: str, version: str | None = None) -> bool:
    """Whether ``package`` (installed ``version``, looked up if None) is inside its supported range.

    A version that cannot be read (no metadata) or a package without a declared range counts as supported.
    """
    supported = SUPPORTED_VERSIONS.get(package)
    version = version if version is not None else package_version(package)
    if supported is None or version is None:
        return True
    # packaging is a dependency of every library in SUPPORTED_VERSIONS, so it is there whenever one is imported.
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return SpecifierSet(supported).contains(Version(version), prereleases=True)


def unsupported_version_message(package: str, version: str | None = None) -> str:
    """The warning for ``package`` outside its supported range (see :func:`is_supported_version`)."""
    version = version if version is not None else package_version(package)
    supported = SUPPORTED_VERSIONS[package]
    return (
        f"anon_hf supports {package}{supported} (the range its integration tests ran against); {package} {version} "
        f"is installed, so anon_hf's patches may fail or misbehave. pip install '{package}{supported}'."
    )


_warned: set[str] = set()


def warn_if_unsupported(module: ModuleType) -> None:
    """Log one warning per process if the package of ``module`` is outside :data:`SUPPORTED_VERSIONS`."""
    package = module.__name__.partition(".")[0]
    if package in _warned:
        return
    _warned.add(package)
    try:
        supported = is_supported_version(package)
    except Exception as err:  # an unreadable version string: say so, never break the user's import
        logger.warning(
            f"anon_hf could not check the version of {package} against {SUPPORTED_VERSIONS[package]}: {err}"
        )
        return
    if not supported:
        logger.warning(unsupported_version_message(package))
