"""The package's layers, read from its source: no import circle, and no import from a layer above.

Every ``from .x import y`` in ``anon_hf/`` (at module level or inside a function) is an arrow; the layers are those
of docs/contributing.md. The only arrows allowed to point up are listed in ``LAZY_EDGES``, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import anon_hf

PACKAGE = Path(anon_hf.__file__).parent

# Lowest first; a module may import its own layer or a lower one. Matched by longest prefix.
LAYERS = [
    ["anon_hf.schedule", "anon_hf.distributed.dtensor"],
    ["anon_hf.hyper", "anon_hf._docs"],
    ["anon_hf.refresh", "anon_hf.distributed"],
    ["anon_hf.storage"],
    ["anon_hf.backends"],
    ["anon_hf.functional"],
    ["anon_hf.optimizer", "anon_hf.optimizer8bit", "anon_hf.param_groups"],
    ["anon_hf.integrations"],
    ["anon_hf.launcher"],
    ["anon_hf", "anon_hf.__main__"],
]
# Upward arrows, each inside a function: the launcher prints the package version (importing anon_hf there would
# import torch at start-up of every interpreter it launches, so it is deferred to the one command that needs it).
LAZY_EDGES = {("anon_hf.launcher.cli", "anon_hf")}


def _module_name(path: Path) -> tuple[str, str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        name = ".".join(parts[:-1])
        return name, name
    name = ".".join(parts)
    return name, name.rsplit(".", 1)[0]


def _exists(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _edges() -> set[tuple[str, str]]:
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        if "_startup_site" in path.parts:  # loaded by file path in child interpreters, never imported
            continue
        module, package = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    edges.add((module, candidate if _exists(candidate) else target))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "anon_hf":
                edges.add((module, node.module))
            elif isinstance(node, ast.Import):
                edges.update((module, alias.name) for alias in node.names if alias.name.split(".")[0] == "anon_hf")
    return {(a, b) for a, b in edges if a != b and not b.startswith(a + ".")}


def _layer(module: str) -> int:
    best, rank = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} is in no layer of LAYERS"
    return rank


def test_the_edge_reader_sees_known_arrows():
    edges = _edges()
    assert ("anon_hf.optimizer", "anon_hf.functional") in edges
    assert ("anon_hf.functional", "anon_hf.backends.fused") in edges  # a function-level import counts too


def test_no_module_imports_a_layer_above_it():
    upward = sorted((a, b) for a, b in _edges() - LAZY_EDGES if b.startswith("anon_hf") and _layer(a) < _layer(b))
    assert upward == []


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for a, b in _edges() - LAZY_EDGES:
        graph.setdefault(a, set()).add(b)
    visiting, done, cycles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(path[path.index(node) :] + [node])
            return
        visiting.add(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [nxt])
        visiting.discard(node)
        done.add(node)

    for start in sorted(graph):
        visit(start, [start])
    assert cycles == []
