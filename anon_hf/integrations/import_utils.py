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

# The libraries anon_hf patches (the rows of _patches.py) and the releases `make test-compat` ran the integration
# tests against (oldest and newest of each range passed); pyproject.toml's extras declare the same ranges
# (tests/test_patches.py holds them equal). Only these are checked: a library anon_hf does not patch (TRL, PEFT)
# cannot break a patch, and a frameworks' pin on it is not anon_hf's business.
SUPPORTED_VERSIONS: dict[str, str] = {
    "transformers": ">=5.0,<6",
    "accelerate": ">=1.10,<2",
    "deepspeed": ">=0.17,<0.20",
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


def unsupported_version_message(package: str, version: str | None = None, what_may_break: str = "") -> str:
    """The warning for ``package`` outside its supported range (see :func:`is_supported_version`).

    It says what may break (``what_may_break``: the features whose patches touch ``package``) and what happens if
    it does, and gives no install advice: the user's framework may pin ``package`` for reasons of its own.
    """
    version = version if version is not None else package_version(package)
    supported = SUPPORTED_VERSIONS[package]
    features = f" ({what_may_break})" if what_may_break else ""
    return (
        f"anon_hf patches {package}, and {package} {version} is outside {supported}, the releases its integration "
        f"tests ran against. Should a patch no longer fit this release, the feature that needs it{features} raises "
        "a PatchError naming the patch when it is used; nothing else changes. See "
        "docs/troubleshooting.md#patches-supported-versions-and-optim_args-types."
    )


_warned: set[str] = set()


def warn_if_unsupported(module: ModuleType, what_may_break: str = "") -> None:
    """Log one warning per process if the package of ``module`` is outside :data:`SUPPORTED_VERSIONS`.

    Packages without a range (those anon_hf does not patch) are never warned about.
    """
    package = module.__name__.partition(".")[0]
    if package in _warned or package not in SUPPORTED_VERSIONS:
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
        logger.warning(unsupported_version_message(package, what_may_break=what_may_break))
