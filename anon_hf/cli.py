"""``anon-hf run``: run a training script, module or console command with ``--optim anon`` available.

For scripts the user cannot edit (a library's example, TRL's CLI, ...)::

    anon-hf run train.py --optim anon ...              # a Python file
    anon-hf run -m package.module --optim anon ...     # a module, as `python -m`
    anon-hf run trl sft --optim anon ...               # a console-script entry point, by name

``import anon_hf`` installs post-import hooks, so the target registers Anon the moment it imports transformers;
then the target runs in this process with its own ``sys.argv``, as ``python`` would run it. There is no
training logic here. Every process of a multi-process launch registers, because every process runs this:

    torchrun --nproc_per_node 2 -m anon_hf run train.py --optim anon ...
    torchrun --nproc_per_node 2 $(which anon-hf) run train.py --optim anon ...
    accelerate launch --num_processes 2 -m anon_hf run train.py --optim anon ...
    deepspeed --num_gpus 2 --module anon_hf run train.py --optim anon ...

The ``--local_rank=N`` that the DeepSpeed launcher inserts after the program is handed on to the target. Also available as ``python -m anon_hf``.
"""

from __future__ import annotations

import importlib.metadata
import os
import runpy
import sys

__all__ = ["main"]

USAGE = """\
usage: anon-hf run SCRIPT.py [ARGS ...]
       anon-hf run -m MODULE [ARGS ...]
       anon-hf run COMMAND [ARGS ...]      (an installed console script, e.g. a library's CLI)
       anon-hf --version

Runs the target in this process with its own arguments, after `import anon_hf`, so that
`--optim anon` works in transformers' TrainingArguments, HfArgumentParser and Trainer.
Works as the program of torchrun, accelerate launch and the deepspeed launcher:
  torchrun --nproc_per_node 2 -m anon_hf run train.py --optim anon ..."""


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


def run(argv: list[str], forwarded: list[str] | None = None) -> int:
    """Run ``argv`` (``SCRIPT.py ARGS``, ``-m MODULE ARGS`` or ``COMMAND ARGS``) after ``import anon_hf``.

    ``forwarded`` (a launcher's ``--local_rank=N``) goes first in the target's arguments, where the launcher
    would have put it had it started the target itself.
    """
    if not argv:
        raise UsageError("anon-hf run: missing the script, -m MODULE or command to run")
    import anon_hf  # noqa: F401  (installs the post-import hooks that register Anon)

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
    raise UsageError(
        f"anon-hf run: {target!r} is neither a file nor an installed console script "
        "(check the path, or that the package providing the command is installed in this environment)"
    )


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
    if argv[0] != "run":
        print(f"anon-hf: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return run(argv[1:], forwarded)
    except UsageError as err:
        print(f"{err}\n{USAGE}", file=sys.stderr)
        return 2
