"""README.md's Python examples run as written: each ```python block is run in a fresh interpreter.

A block that cannot run here (it needs several processes or a download) is marked in the README by an HTML comment
on the line right above it, ``<!-- readme-test: skip (the reason) -->``; the test then skips it with that reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
    r"(?:<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\n)?```python\n(?P<code>.*?)^```", re.M | re.S
)


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` for each ```python block of ``text``."""
    return [(text.count("\n", 0, m.start("code")) + 1, m["code"], m["reason"]) for m in _BLOCK.finditer(text)]


def test_the_block_finder_sees_code_and_skip_marks():
    text = "x\n```python\nprint(1)\n```\n<!-- readme-test: skip (needs torchrun) -->\n```python\nboom\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "print(1)\n", None), (7, "boom\n", "needs torchrun")]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python block: the extraction pattern no longer matches it"


@pytest.mark.parametrize(("line", "code", "skip"), BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_python_block_runs(line, code, skip, tmp_path):
    if skip:
        pytest.skip(f"README.md:{line} is marked to skip: {skip}")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"README.md:{line} failed:\n{code}\n{result.stderr[-3000:]}"
