"""Run a function right after a module is imported, or at once if it already is (standard library only).

This is how anon-hf registers itself with transformers and DeepSpeed without importing them: ``import anon_hf``
costs nothing extra, and the registration happens the moment the user's script imports the library.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType

__all__ = ["when_imported"]

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_pending: dict[str, list[Callable[[ModuleType], None]]] = {}


def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once ``module_name`` has finished executing; now if it already has.

    The callback runs exactly once per registration, in the importing thread, while the import lock for the
    module is held; it should touch only that module (importing siblings from it risks an import cycle).
    """
    with _lock:
        module = sys.modules.get(module_name)
        if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
            _pending.setdefault(module_name, []).append(callback)
            if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            return
    callback(module)


def _run_callbacks(module: ModuleType) -> None:
    with _lock:
        callbacks = _pending.pop(module.__name__, [])
    for callback in callbacks:
        callback(module)


class _HookedLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the pending callbacks and puts the real loader back."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _run_callbacks(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        with _lock:
            if fullname not in _pending:
                return None
        spec = None
        for finder in sys.meta_path:  # the other finders, so editable installs of a library are found too
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _HookedLoader(spec.loader)
        return spec
