"""``anon-hf run``: run a training script, module or console command with ``--optim anon`` available.

For scripts the user cannot edit (a library's example, TRL's CLI, ...)::

    anon-hf run train.py --optim anon ...              # a Python file
    anon-hf run -m package.module --optim anon ...     # a module, as `python -m`
    anon-hf run trl sft --optim anon ...               # a console-script entry point, by name

``import anon_hf`` installs post-import hooks, so the target registers Anon the moment it imports transformers;
then the target runs in this process with its own ``sys.argv``, as ``python`` would run it. There is no
training logic here. Every Python interpreter the target starts registers too: ``run`` sets
``ANON_HF_AUTO_REGISTER=1`` and puts anon-hf's ``sitecustomize`` first on ``PYTHONPATH`` (``anon_hf/launcher/startup.py``),
so launchers and CLIs that re-spawn themselves work from outside::

    anon-hf run torchrun --nproc_per_node 2 train.py --optim anon ...
    anon-hf run accelerate launch --multi_gpu --num_processes 2 train.py --optim anon ...
    anon-hf run deepspeed --num_gpus 2 train.py --optim anon ...
    anon-hf run trl sft --optim anon ...          # trl re-runs trl/scripts/sft.py through accelerate launch

and from inside (``torchrun --nproc_per_node 2 -m anon_hf run train.py ...``). The ``--local_rank=N`` that the
DeepSpeed launcher inserts after the program is handed on to the target. Also available as ``python -m anon_hf``.

``anon-hf enable`` / ``anon-hf disable`` add / remove a ``.pth`` in site-packages that does the same for every
interpreter of the environment, with no launcher.

``anon-hf build-kernels`` builds anon_hf's C++ CPU kernels for this machine ahead of time (a Docker image, a
cluster's shared disk), so that no run waits for a build; it says where they are and how to point
``TORCH_EXTENSIONS_DIR`` at them.
"""

from __future__ import annotations

import importlib.metadata
import os
import runpy
import shutil
import subprocess
import sys

from . import startup

__all__ = ["main"]

USAGE = """\
usage: anon-hf run SCRIPT.py [ARGS ...]
       anon-hf run -m MODULE [ARGS ...]
       anon-hf run COMMAND [ARGS ...]      (an installed console script, e.g. a library's CLI)
       anon-hf enable [--site-packages DIR]   (every script of this environment: --optim anon, no launcher)
       anon-hf disable [--site-packages DIR]  (undo enable)
       anon-hf build-kernels [--dir DIR]      (build the C++ CPU kernels now, into TORCH_EXTENSIONS_DIR or DIR)
       anon-hf --version

Runs the target in this process with its own arguments, after `import anon_hf`, so that
`--optim anon` works in transformers' TrainingArguments, HfArgumentParser and Trainer.
Every Python process the target starts registers too (ANON_HF_AUTO_REGISTER=1 and anon-hf's
sitecustomize on PYTHONPATH; ANON_HF_AUTO_REGISTER=0 turns that off), so launchers work from outside:
  anon-hf run torchrun --nproc_per_node 2 train.py --optim anon ...
  anon-hf run trl sft --optim anon ..."""


class UsageError(Exception):
    """A command line this launcher cannot run; the message says why."""


def _console_script(name: str) -> importlib.metadata.EntryPoint | None:
    matches = importlib.metadata.entry_points(group="console_scripts", name=name)
    return next(iter(matches), None)


def _run_path(path: str, args: list[str]) -> None:
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # as `python path` puts the script's folder first
    runpy.run_path(path, run_name="__main__")


def _run_module(module: str, args: list[str]) -> None:
    sys.argv = [module, *args]  # runpy replaces argv[0] with the module's file, as `python -m` does
    sys.path.insert(0, os.getcwd())
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _run_entry_point(name: str, entry_point: importlib.metadata.EntryPoint, args: list[str]) -> int:
    function = entry_point.load()
    sys.argv = [name, *args]
    result = function()
    return result if isinstance(result, int) else 0 if result is None else 1


def _split_launcher_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take the ``--local_rank=N`` the DeepSpeed launcher puts right after the program, to hand to the target."""
    forwarded: list[str] = []
    while argv and argv[0].split("=")[0] in ("--local_rank", "--local-rank"):
        take = 1 if "=" in argv[0] else 2
        forwarded += argv[:take]
        argv = argv[take:]
    return forwarded, argv


def _close_process_group() -> None:
    """End a process group the target left open: gloo can abort the process at exit otherwise
    ("terminate called without an active exception"), which torchrun reports as a failed rank."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _register_children() -> None:
    """Make every Python interpreter the target starts register Anon as well (see :mod:`anon_hf.launcher.startup`).

    ``ANON_HF_AUTO_REGISTER=0`` keeps the registration in this process only.
    """
    if not startup.wanted(default=True):
        return
    os.environ[startup.ENV_VAR] = "1"
    site_dir, pythonpath = startup.site_dir(), os.environ.get("PYTHONPATH", "")
    if site_dir not in pythonpath.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([site_dir, pythonpath]) if pythonpath else site_dir


def _run_executable(path: str, args: list[str]) -> int:
    """A command on PATH that is not a console-script entry point (e.g. ``deepspeed``): a Python script runs in
    this process, as its shebang's interpreter would run it; anything else runs as a child with this environment."""
    with open(path, "rb") as handle:
        first_line = handle.readline()
    if first_line.startswith(b"#!") and b"python" in first_line:
        _run_path(path, args)
        return 0
    return subprocess.call([path, *args])


ACCELERATE_CPU_WARNING = (
    "anon-hf: warning: `accelerate launch --cpu --num_processes {n}` starts ONE process (accelerate's behaviour), "
    "not {n}. For {n} processes on CPU use `accelerate launch --multi_gpu --num_processes {n} SCRIPT.py ... "
    "--use_cpu true`."
)


def accelerate_cpu_processes(argv: list[str]) -> int | None:
    """The ``--num_processes`` of an ``accelerate launch --cpu`` command line (options before the ``.py`` script),
    when above 1: accelerate then starts a single process without a word. None otherwise."""
    if len(argv) < 2 or os.path.basename(argv[0]) != "accelerate" or argv[1] != "launch":
        return None
    options = []
    for arg in argv[2:]:
        if arg.endswith(".py"):
            break
        options += arg.split("=", 1) if arg.startswith("--") else [arg]
    if "--cpu" not in options:
        return None
    for flag in ("--num_processes", "--num-processes"):
        if flag in options[:-1]:
            value = options[options.index(flag) + 1]
            return int(value) if value.isdigit() and int(value) > 1 else None
    return None


def run(argv: list[str], forwarded: list[str] | None = None) -> int:
    """Run ``argv`` (``SCRIPT.py ARGS``, ``-m MODULE ARGS`` or ``COMMAND ARGS``) after ``import anon_hf``.

    ``forwarded`` (a launcher's ``--local_rank=N``) goes first in the target's arguments, where the launcher
    would have put it had it started the target itself.
    """
    if not argv:
        raise UsageError("anon-hf run: missing the script, -m MODULE or command to run")
    import anon_hf  # noqa: F401  (installs the post-import hooks that register Anon)

    _register_children()
    processes = accelerate_cpu_processes(argv)
    if processes is not None:
        print(ACCELERATE_CPU_WARNING.format(n=processes), file=sys.stderr)
    forwarded = forwarded or []
    if argv[0] == "-m":
        if len(argv) < 2:
            raise UsageError("anon-hf run -m: missing the module name")
        _run_module(argv[1], forwarded + argv[2:])
        _close_process_group()
        return 0
    target, args = argv[0], forwarded + argv[1:]
    if target.startswith("-"):
        raise UsageError(f"anon-hf run: unknown option {target!r}; the target comes first, its options after it")
    if os.path.isfile(target):
        _run_path(target, args)
        _close_process_group()
        return 0
    entry_point = _console_script(target)
    if entry_point is not None:
        status = _run_entry_point(target, entry_point, args)
        _close_process_group()
        return status
    # This interpreter's scripts folder first (the deepspeed launcher lives there, not in the entry points).
    executable = shutil.which(target, path=os.path.dirname(sys.executable)) or shutil.which(target)
    if executable is not None:
        status = _run_executable(executable, args)
        _close_process_group()
        return status
    raise UsageError(
        f"anon-hf run: {target!r} is neither a file nor an installed console script or command "
        "(check the path, or that the package providing the command is installed in this environment)"
    )


def _site_packages_option(argv: list[str]) -> str | None:
    if not argv:
        return None
    if len(argv) == 2 and argv[0] == "--site-packages":
        return argv[1]
    raise UsageError(f"anon-hf: unexpected arguments {argv!r} (allowed: --site-packages DIR)")


def toggle(command: str, argv: list[str]) -> int:
    """``anon-hf enable`` / ``anon-hf disable``: add or remove the start-up ``.pth`` in site-packages."""
    site_packages = _site_packages_option(argv)
    if command == "enable":
        path = startup.enable(site_packages)
        print(
            f"anon-hf: wrote {path}: every Python process of this environment now registers Anon when it imports "
            f"transformers or deepspeed (--optim anon works with no launcher). {startup.ENV_VAR}=0 turns it off "
            "for one process; `anon-hf disable` removes it."
        )
        return 0
    path = startup.disable(site_packages)
    print(f"anon-hf: removed {path}" if path else "anon-hf: nothing to remove (not enabled)")
    return 0


def build_kernels(argv: list[str]) -> int:
    """``anon-hf build-kernels [--dir DIR]``: build (or find) every C++ kernel for this source, torch and CPU."""
    if argv and (len(argv) != 2 or argv[0] != "--dir"):
        raise UsageError(f"anon-hf build-kernels: unexpected arguments {argv!r} (allowed: --dir DIR)")
    if argv:
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.abspath(argv[1])
    from anon_hf.backends import cpu_kernel

    root = cpu_kernel.cache_root()
    print(f"anon-hf: building anon_hf's C++ kernels for {cpu_kernel.capability()} in {root} (about 1-3 minutes each)")
    try:
        built = cpu_kernel.build_all()
    except Exception as err:  # the compiler's or ninja's message says what is missing
        print(f"anon-hf: a kernel could not be built: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    for item in built:
        how = "already built" if item.build_seconds is None else f"built in {item.build_seconds:.0f} s"
        print(f"anon-hf: {item.kernel.title}: {how}: {item.directory}")
    print(
        f"anon-hf: runs with this anon-hf source, torch, Python and CPU instruction set load these kernels from {root} "
        f"without building (no compiler or ninja needed). Elsewhere (a Docker image, another machine with the same "
        f"environment), copy that folder and set\n  export TORCH_EXTENSIONS_DIR={root}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``anon-hf`` console script and of ``python -m anon_hf``."""
    argv = sys.argv[1:] if argv is None else argv
    forwarded, argv = _split_launcher_args(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from anon_hf import __version__

        print(f"anon-hf {__version__}")
        return 0
    if argv[0] not in ("run", "enable", "disable", "build-kernels"):
        print(f"anon-hf: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        if argv[0] == "build-kernels":
            return build_kernels(argv[1:])
        if argv[0] != "run":
            return toggle(argv[0], argv[1:])
        return run(argv[1:], forwarded)
    except UsageError as err:
        print(f"{err}\n{USAGE}", file=sys.stderr)
        return 2
