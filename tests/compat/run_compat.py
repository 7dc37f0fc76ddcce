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

The torch axis is opt-in (``--torch``, ``make test-compat-torch``): for the oldest and the newest torch release in
pyproject.toml's ``dependencies`` range, a venv under ``.compat/torch-<version>`` gets that torch (the registry's
wheel: a CUDA build of several GB that runs on CPU) in front of the base environment, then builds both C++
kernels with that torch's headers (a failed build is a failure here, not a skip) and runs ``TORCH_TESTS``: the
kernels and the compiled graphs against the literal references.

Results go to ``.compat/results.json`` and, as a Markdown table, to stdout. Exit status 1 if any run failed.
Usage: ``python tests/compat/run_compat.py [--libraries transformers deepspeed] [--which oldest newest] [--torch]``.
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
# The torch axis: the C++ kernels (built with that torch's headers) and the compiled graphs (that torch's inductor),
# each against the literal reference; about 10 minutes per torch on 2 cores, most of it compiling.
TORCH_TESTS = [
    "tests/test_cpu_kernel.py::test_every_tail_length_matches_the_forloop_path",
    "tests/test_fused.py::test_fused_matches_reference_fp32",
    "tests/test_fused.py::test_the_compiled_path_really_runs_and_says_so_once",
    "tests/test_anon8bit.py::test_matches_literal_8bit_reference",
    "tests/test_anon8bit.py::test_the_compiled_8bit_graph_matches_the_literal_reference",
]
# Both kernels must build: the kernel tests would otherwise skip, and a skip is no evidence for a torch release.
KERNEL_PROBE = (
    "from anon_hf.backends import cpu_kernel as k; import torch; "
    "reasons = [k.kernel_unavailable_reason(), k.kernel8_unavailable_reason()]; "
    "print('torch', torch.__version__ + ':', 'both C++ kernels built' if not any(reasons) else reasons); "
    "raise SystemExit(any(reasons))"
)


def declared_ranges(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Library -> the specifier pyproject declares: extras for ``SUPPORTED`` (the first found), dependencies for torch."""
    project = tomllib.loads(pyproject.read_text())["project"]
    ranges: dict[str, str] = {}
    for requirements in [project.get("dependencies", []), *project["optional-dependencies"].values()]:
        for text in requirements:
            requirement = Requirement(text)
            if requirement.name in (*SUPPORTED, "torch") and str(requirement.specifier):
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
    """Create the venv (once) and install ``library==version``; (ok, tail of pip's output).

    torch is pinned to the base's release unless ``library`` is torch itself (the torch axis).
    """
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
    constraints.write_text("" if library == "torch" else f"torch=={torch.__version__.split('+')[0]}\n")
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), f"{library}=={version}"]
    result = subprocess.run(pip, capture_output=True, text=True)
    return result.returncode == 0, (result.stdout + result.stderr)[-2000:]


def _test_env(env_dir: Path) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TORCH_EXTENSIONS_DIR=str(env_dir / "torch_extensions"),
    )


def _pytest(env_dir: Path, tests: list[str], library: str) -> dict[str, object]:
    python = env_dir / "bin" / "python"
    start = time.monotonic()
    result = subprocess.run(
        [str(python), "-m", "pytest", *tests, *PYTEST_ARGS], capture_output=True, text=True, env=_test_env(env_dir),
        cwd=ROOT,
    )  # fmt: skip
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


def run_torch_tests(env_dir: Path) -> dict[str, object]:
    """Build both C++ kernels with this torch (a failure is recorded, not skipped), then run ``TORCH_TESTS``."""
    start = time.monotonic()
    probe = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", KERNEL_PROBE], capture_output=True, text=True, env=_test_env(env_dir)
    )
    kernels = (probe.stdout.strip().splitlines() or [""])[-1]
    if probe.returncode != 0:
        return {"passed": False, "summary": f"kernel build failed: {kernels}", "tail": probe.stderr[-3000:]}
    record = _pytest(env_dir, [t for t in TORCH_TESTS if (ROOT / t.partition("::")[0]).exists()], "torch")
    record["summary"] = f"{record['summary']}; {kernels}"
    record["seconds"] = round(time.monotonic() - start)
    return record


def run_tests(env_dir: Path, library: str) -> dict[str, object]:
    return _pytest(env_dir, [t for t in TESTS if (ROOT / t).exists()], library)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libraries", nargs="+", default=list(SUPPORTED), choices=[*SUPPORTED, "torch"])
    parser.add_argument("--which", nargs="+", default=["oldest", "newest"], choices=["oldest", "newest"])
    parser.add_argument("--dir", type=Path, default=ROOT / ".compat")
    parser.add_argument(
        "--torch", action="store_true", help="only the torch axis: the oldest and newest torch of the declared range"
    )
    args = parser.parse_args(argv)
    if args.torch:
        args.libraries = ["torch"]
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
                record.update(run_torch_tests(env_dir) if library == "torch" else run_tests(env_dir, library))
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
