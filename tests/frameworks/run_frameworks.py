"""``make test-frameworks``: Anon inside LLaMA-Factory, axolotl and torchtune, through their own console commands.

For each framework of ``harness.FRAMEWORKS`` (or those named by ``--frameworks``) this builds its venv under
``.frameworks/<name>`` once (``harness.setup``: on top of the environment running this script, torch reused), then
runs ``tests/frameworks/test_<name>.py`` with the opt-in variable set. The quick checks (the docs' YAML blocks,
the axolotl config check) run first. One framework at a time, to spare the cores.

Results go to ``.frameworks/results.json`` and, as a Markdown table, to stdout. Exit status 1 if any failed.
Usage: ``python tests/frameworks/run_frameworks.py [--frameworks llamafactory axolotl torchtune]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import harness

PYTEST_ARGS = ["-v", "-p", "no:cacheprovider", "-o", "addopts=", "-rs"]
# The versions shown in the results: the framework and what it pins that anon-hf touches.
REPORTED = ("transformers", "accelerate", "trl", "peft", "datasets", "torch")


def installed_versions(framework: harness.Framework) -> dict[str, str]:
    names = [requirement.split("==")[0] for requirement in framework.requirements] + list(REPORTED)
    code = (
        "import importlib.metadata as m, json\n"
        f"names = {names!r}\n"
        "out = {}\n"
        "for name in names:\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    result = subprocess.run([str(framework.bin / "python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def run_tests(paths: list[Path], marker: list[str]) -> tuple[bool, str, str]:
    """pytest on ``paths`` in this interpreter; (passed, summary line, tail of the output)."""
    env = dict(os.environ, **{harness.OPT_IN: "1"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *map(str, paths), *marker, *PYTEST_ARGS],
        capture_output=True,
        text=True,
        env=env,
        cwd=harness.ROOT,
    )
    print(result.stdout[-4000:], flush=True)
    summary = next(
        (line for line in reversed(result.stdout.splitlines()) if re.search(r"\b(passed|failed|error|skipped)", line)),
        "",
    )
    return result.returncode == 0, summary.strip("= "), result.stdout[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", default=list(harness.FRAMEWORKS), choices=list(harness.FRAMEWORKS))
    args = parser.parse_args(argv)
    harness.VENVS.mkdir(exist_ok=True)
    here = Path(__file__).parent
    ok, summary, _ = run_tests([here / "test_snippets.py", here / "test_axolotl_check.py"], [])
    results = {"snippets": {"passed": ok, "summary": summary}}
    for name in args.frameworks:
        framework = harness.FRAMEWORKS[name]
        start = time.monotonic()
        print(f"{framework.title}: setting up {framework.venv} ...", flush=True)
        harness.setup(framework)
        setup_seconds = round(time.monotonic() - start)
        ok, summary, tail = run_tests([here / f"test_{name}.py"], ["-m", "frameworks"])
        results[name] = {
            "passed": ok,
            "summary": summary,
            "versions": installed_versions(framework),
            "setup_seconds": setup_seconds,
            "test_seconds": round(time.monotonic() - start) - setup_seconds,
            "tail": "" if ok else tail,
        }
        (harness.VENVS / "results.json").write_text(json.dumps(results, indent=1))
        print(f"  -> {'PASS' if ok else 'FAIL'}: {summary}", flush=True)
    print("\n| framework | versions | result | seconds (setup + tests) |\n|---|---|---|---|")
    for name, record in results.items():
        versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items())
        seconds = f"{record['setup_seconds']} + {record['test_seconds']}" if "versions" in record else ""
        print(f"| {name} | {versions} | {'pass' if record['passed'] else 'FAIL'}: {record['summary']} | {seconds} |")
    return 0 if all(record["passed"] for record in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
