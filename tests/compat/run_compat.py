"""``make test-compat``: the integration tests against the oldest and newest release of each declared range.

For every library of ``SUPPORTED`` (transformers, accelerate, DeepSpeed, TRL) this reads its range from
pyproject.toml's extras, asks the package index (``pip index versions``) for the releases, and for the oldest and
the newest release in the range:

* makes a venv under ``.compat/<library>-<version>`` that sees the base environment (the one running this script,
  ``.venv`` for ``make``) through a ``.pth`` file, so torch and every other dependency are reused: torch is
  pinned to the base's version in a constraints file, so no other torch (and never a CUDA build) is downloaded;
* installs only ``<library>==<version>`` (with whatever of its requirements the base does not satisfy) into it;
  the venv's own site-packages comes first on ``sys.path``, so that release shadows the base's;
* runs the integration tests (``TESTS``) there, with this checkout first on ``PYTHONPATH``.

Results go to ``.compat/results.json`` and, as a Markdown table, to stdout. Exit status 1 if any run failed.
Usage: ``python tests/compat/run_compat.py [--libraries transformers deepspeed] [--which oldest newest]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED = ("transformers", "accelerate", "deepspeed", "trl")
# The integration tests that are quick on 2 CPU cores (about 2 minutes per environment); the multi-process ones
# (`-m distributed`) stay in `make test-dist`.
TESTS = [
    "tests/test_transformers.py",
    "tests/test_bad_config.py",
    "tests/test_patches.py",
    "tests/test_trl_config.py",
    "tests/test_distributed.py",
]
PYTEST_ARGS = ["-m", "not distributed and not slow", "-q", "-p", "no:cacheprovider", "-o", "addopts="]


def declared_ranges(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Library -> the specifier its pyproject extras declare (the first declaration found)."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    ranges: dict[str, str] = {}
    for requirements in extras.values():
        for text in requirements:
            requirement = Requirement(text)
            if requirement.name in SUPPORTED and str(requirement.specifier):
                ranges.setdefault(requirement.name, str(requirement.specifier))
    return ranges


def released_versions(library: str) -> list[Version]:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", library], capture_output=True, text=True, check=True
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("Available versions:"))
    return sorted(Version(text.strip()) for text in line.partition(":")[2].split(","))


def oldest_and_newest(library: str, specifier: str) -> dict[str, str]:
    from packaging.specifiers import SpecifierSet

    inside = [v for v in released_versions(library) if not v.is_prerelease and v in SpecifierSet(specifier)]
    if not inside:
        raise SystemExit(f"no release of {library} in {specifier}")
    return {"oldest": str(inside[0]), "newest": str(inside[-1])}


def make_env(env_dir: Path, library: str, version: str) -> tuple[bool, str]:
    """Create the venv (once) and install ``library==version``; (ok, tail of pip's output)."""
    python = env_dir / "bin" / "python"
    if not python.exists():
        subprocess.run([sys._base_executable, "-m", "venv", str(env_dir)], check=True)
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        Path(site, "_anon_hf_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    import torch

    constraints = env_dir / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), f"{library}=={version}"]
    result = subprocess.run(pip, capture_output=True, text=True)
    return result.returncode == 0, (result.stdout + result.stderr)[-2000:]


def run_tests(env_dir: Path, library: str) -> dict[str, object]:
    python = env_dir / "bin" / "python"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TORCH_EXTENSIONS_DIR=str(env_dir / "torch_extensions"),
    )
    tests = [t for t in TESTS if (ROOT / t).exists()]
    start = time.monotonic()
    result = subprocess.run(
        [str(python), "-m", "pytest", *tests, *PYTEST_ARGS], capture_output=True, text=True, env=env, cwd=ROOT
    )
    summary = next(
        (line for line in reversed(result.stdout.splitlines()) if re.search(r"\b(passed|failed|error)", line)), ""
    )
    versions = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({library!r}))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {
        "passed": result.returncode == 0,
        "summary": summary.strip("= "),
        "imported_version": versions,
        "failed_tests": failed,
        "seconds": round(time.monotonic() - start),
        "tail": result.stdout[-3000:] if result.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libraries", nargs="+", default=list(SUPPORTED), choices=SUPPORTED)
    parser.add_argument("--which", nargs="+", default=["oldest", "newest"], choices=["oldest", "newest"])
    parser.add_argument("--dir", type=Path, default=ROOT / ".compat")
    args = parser.parse_args(argv)
    args.dir.mkdir(exist_ok=True)
    results_path = args.dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    ranges = declared_ranges()
    for library in args.libraries:
        if library not in ranges:
            print(f"{library}: no range declared in pyproject.toml; skipped", flush=True)
            continue
        picks = oldest_and_newest(library, ranges[library])
        versions: dict[str, list[str]] = {}
        for which in args.which:  # a range with one release runs it once, as both
            versions.setdefault(picks[which], []).append(which)
        for version, whiches in versions.items():
            which = " = ".join(whiches)
            env_dir = args.dir / f"{library}-{version}"
            print(f"{library} {version} ({which} of {ranges[library]}): installing ...", flush=True)
            ok, pip_tail = make_env(env_dir, library, version)
            record = {"library": library, "range": ranges[library], "which": which, "version": version}
            if ok:
                record.update(run_tests(env_dir, library))
            else:
                record.update(passed=False, summary="install failed", tail=pip_tail)
            results[f"{library}-{version}"] = record
            results_path.write_text(json.dumps(results, indent=1))
            print(f"  -> {'PASS' if record['passed'] else 'FAIL'}: {record['summary']}", flush=True)
    print("\n| library | range | release | result |\n|---|---|---|---|")
    for record in results.values():
        verdict = "pass" if record["passed"] else "FAIL"
        print(
            f"| {record['library']} | {record['range']} | {record['version']} ({record['which']}) | {verdict}: "
            f"{record['summary']} |"
        )
    return 0 if all(record["passed"] for record in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
