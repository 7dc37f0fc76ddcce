"""Register Anon in every interpreter a run starts, at the cost of a dictionary lookup at start-up.

Standard library only, and loaded by file path as the top-level module ``_anon_hf_startup`` (importing it as
``anon_hf.launcher.startup`` would run ``anon_hf/__init__.py``, which imports torch: seconds, in every interpreter).

At interpreter start-up, :func:`install` puts a finder first on ``sys.meta_path`` that waits for the first import
of ``transformers`` or ``deepspeed`` and then runs ``import anon_hf`` (whose own post-import hooks register
``--optim anon``, the Trainer callback and the DeepSpeed patches as those libraries' modules load). A process that
never imports either library never imports anon_hf or torch because of this. Two ways reach start-up:

* ``anon-hf run`` sets ``ANON_HF_AUTO_REGISTER=1`` and puts :func:`site_dir` (a folder holding only a
  ``sitecustomize.py``, which chains to any other ``sitecustomize``) first on ``PYTHONPATH``; every Python child
  inherits both: the interpreters that ``trl sft``, torchrun, ``accelerate launch`` and the DeepSpeed launcher
  start, and spawned DataLoader workers.
* ``anon-hf enable`` writes :data:`PTH_NAME` into site-packages (:func:`enable`), so every interpreter of that
  environment installs the finder unless ``ANON_HF_AUTO_REGISTER=0``; ``anon-hf disable`` removes it.

``ANON_HF_AUTO_REGISTER=0`` turns both off in a process and its children.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ENV_VAR", "PTH_NAME", "disable", "enable", "install", "site_dir", "wanted"]

ENV_VAR = "ANON_HF_AUTO_REGISTER"
PTH_NAME = "anon_hf_autoregister.pth"
# The libraries whose import makes a process a training process that may parse `--optim anon`.
TRIGGERS = frozenset({"transformers", "deepspeed"})
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
_MARK = "_anon_hf_startup_trigger"


def wanted(default: bool, environ: dict[str, str] | None = None) -> bool:
    """Whether this process asked for registration: ``ANON_HF_AUTO_REGISTER`` if set, else ``default``.

    An unreadable value warns and counts as off: start-up code must never stop an interpreter.
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if not value:
        return default
    if value in _ON:
        return True
    if value not in _OFF:
        import warnings

        warnings.warn(
            f"{ENV_VAR}={value!r} is neither of {_ON} nor of {_OFF}; anon_hf does not register", stacklevel=2
        )
    return False


class _Trigger:
    """A meta-path finder that finds nothing: the first import of a trigger library imports anon_hf first."""

    _anon_hf_startup_trigger = True

    def __init__(self) -> None:
        self.fired = False

    def find_spec(self, fullname, path=None, target=None):
        if self.fired or fullname not in TRIGGERS:
            return None
        # Stays on sys.meta_path, inert: removing it while the import system iterates over that list would make
        # the iteration skip the next finder.
        self.fired = True
        _import_anon_hf()
        return None


def _import_anon_hf() -> None:
    try:
        __import__("anon_hf")
    except Exception as err:  # a start-up hook must not break the user's import of transformers
        import warnings

        warnings.warn(
            f"{ENV_VAR} asks for --optim anon, but `import anon_hf` failed ({type(err).__name__}: {err}); "
            f"Anon is not registered in this process (set {ENV_VAR}=0 to silence this)",
            stacklevel=2,
        )


def install(default: bool) -> bool:
    """Install the trigger in this interpreter if it asked (see :func:`wanted`); return whether it did.

    Idempotent across copies of this module. If a trigger library is already imported, import anon_hf now.
    """
    if not wanted(default):
        return False
    if "anon_hf" in sys.modules or any(getattr(finder, _MARK, False) for finder in sys.meta_path):
        return True
    if TRIGGERS.intersection(sys.modules):
        _import_anon_hf()
        return True
    sys.meta_path.insert(0, _Trigger())
    return True


def site_dir() -> str:
    """The folder holding anon-hf's ``sitecustomize.py``, which ``anon-hf run`` puts first on ``PYTHONPATH``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_startup_site")


def chain_sitecustomize(own_dir: str) -> None:
    """Run the ``sitecustomize`` that ours shadows, if any, as Python would have run it.

    Called by our ``sitecustomize.py``: the next module of that name on ``sys.path`` after ``own_dir`` becomes
    ``sys.modules["sitecustomize"]``.
    """
    from importlib.machinery import PathFinder

    own = os.path.normcase(os.path.abspath(own_dir))
    rest = [entry for entry in sys.path if os.path.normcase(os.path.abspath(entry or os.curdir)) != own]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    # Not importlib.util.module_from_spec: importlib.util imports contextlib and collections, a few ms at start-up.
    module = type(sys)(spec.name)
    module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def pth_line(startup_file: str | None = None) -> str:
    """The one line of :data:`PTH_NAME`: load this file by path and install the trigger, on by default.

    Does nothing (and says nothing) when the file has gone, e.g. after ``pip uninstall anon-hf``.
    """
    path = os.path.abspath(startup_file or __file__)
    return (
        f"import os, sys, importlib.machinery as _im; _p = {path!r}; "
        "_m = os.path.isfile(_p) and type(sys)('_anon_hf_startup'); "
        "_m and (setattr(_m, '__file__', _p) or _im.SourceFileLoader('_anon_hf_startup', _p).exec_module(_m) "
        "or _m.install(default=True))\n"
    )


def _site_packages(site_packages: str | None) -> str:
    import sysconfig

    return site_packages or sysconfig.get_path("purelib")


def enable(site_packages: str | None = None) -> str:
    """Write :data:`PTH_NAME` into ``site_packages`` (default: this interpreter's); return its path.

    From then on every interpreter of that environment registers Anon when it imports transformers or DeepSpeed,
    with no launcher, unless ``ANON_HF_AUTO_REGISTER=0``. Undo with :func:`disable`.
    """
    target = os.path.join(_site_packages(site_packages), PTH_NAME)
    with open(target, "w", encoding="utf-8") as handle:
        handle.write(pth_line())
    return target


def disable(site_packages: str | None = None) -> str | None:
    """Remove :data:`PTH_NAME` from ``site_packages``; return the removed path, or None if it was not there."""
    target = os.path.join(_site_packages(site_packages), PTH_NAME)
    if not os.path.exists(target):
        return None
    os.remove(target)
    return target
