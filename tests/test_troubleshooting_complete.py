"""docs/troubleshooting.md lists every error and warning anon_hf can emit: a new message without an entry fails here.

The messages are read from the source with ``ast``, not by running anything: each ``raise X(...)``, each
``return X(...)`` of an exception class, each ``super().__init__(...)`` in an exception class, each
``logger.warning``/``logger.error``/``warnings.warn``. The message argument may be a string, an f-string, a module
constant used with ``.format``, or a call of a function or method of the same module that builds the message (its
``return`` is read); a helper's own argument at the call site is a message too. Of each message, the literal text
before its first placeholder (``{...}`` or ``%s``) must appear in the page, or, when that start is shorter than
``MIN_CHARS``, its first literal stretch of at least that length; whitespace is compared collapsed, and at most
``MAX_CHARS`` characters are required so the page can quote only the start of a long message.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "anon_hf"
PAGE = ROOT / "docs" / "troubleshooting.md"
MIN_CHARS = 12
MAX_CHARS = 80
LOG_METHODS = {"warning", "error", "critical", "exception"}
_PERCENT = re.compile(r"%[-+ #0]*\d*(?:\.\d+)?[sdifgreExX%]")
_FORMAT_FIELD = re.compile(r"\{[^{}]*\}")


def _segments(node: ast.AST, constants: dict[str, ast.AST], percent: bool) -> list[str] | None:
    """The literal pieces of a message expression, split at its placeholders; None if it is not a string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
        return _PERCENT.split(text) if percent else [text]
    if isinstance(node, ast.JoinedStr):
        pieces, current = [], ""
        for value in node.values:
            if isinstance(value, ast.Constant):
                current += value.value
            elif _is_string_constant(value, constants):
                current += constants[value.value.id].value  # a module constant's text, e.g. shared advice
            else:
                pieces.append(current)
                current = ""
        return [*pieces, current]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _segments(node.left, constants, percent)
        right = _segments(node.right, constants, percent)
        if left is None or right is None:
            return left or right
        return [*left[:-1], left[-1] + right[0], *right[1:]]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        template = node.func.value
        if isinstance(template, ast.Name):
            template = constants.get(template.id)
        if isinstance(template, ast.Constant) and isinstance(template.value, str):
            return _FORMAT_FIELD.split(template.value.replace("{{", "\0").replace("}}", "\1"))
    if isinstance(node, ast.Name) and node.id in constants:
        return _segments(constants[node.id], constants, percent)
    return None


def _is_string_constant(value: ast.AST, constants: dict[str, ast.AST]) -> bool:
    if not (isinstance(value, ast.FormattedValue) and value.conversion == -1 and value.format_spec is None):
        return False
    target = constants.get(value.value.id) if isinstance(value.value, ast.Name) else None
    return isinstance(target, ast.Constant) and isinstance(target.value, str)


def _fragments(segments: list[str]) -> list[str]:
    """The start of the message (its first literal stretch of MIN_CHARS or more when the start is shorter) and
    its longest literal stretch, which tells apart messages that start alike; each cut to MAX_CHARS."""
    # Punctuation at a placeholder's edge ("): the state dict ...") belongs to the surrounding text: trimmed.
    cleaned = [" ".join(piece.replace("\0", "{").replace("\1", "}").split()).strip(" .,;:()") for piece in segments]
    first = cleaned[0] if cleaned else ""
    if len(first) < MIN_CHARS:
        first = next((piece for piece in cleaned if len(piece) >= MIN_CHARS), first)
    longest = max(cleaned, key=len, default="")
    return [fragment[:MAX_CHARS] for fragment in dict.fromkeys((first, longest)) if fragment]


def _is_exception_name(name: str | None) -> bool:
    return bool(name) and name.endswith(("Error", "Exception", "Warning"))


def _callee_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


class _Collector(ast.NodeVisitor):
    def __init__(self, path: Path, tree: ast.Module):
        self.path = path
        self.constants = {
            target.id: node.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        self.functions = {
            node.name: node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        self.exception_classes = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            and any(isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception"))) for b in node.bases)
        }
        self.found: list[tuple[str, str | None]] = []
        self._class: list[str] = []

    def _where(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(ROOT)}:{node.lineno}"

    def _add_message(self, node: ast.AST, arg: ast.AST, percent: bool = False, depth: int = 0) -> None:
        segments = _segments(arg, self.constants, percent)
        if segments is not None:
            fragments = _fragments(segments)
            self.found += [(self._where(node), fragment) for fragment in fragments] or [(self._where(node), None)]
            return
        if isinstance(arg, ast.Call) and depth < 3:
            self._add_call(node, arg, depth + 1)
            return
        self.found.append((self._where(node), None))

    def _add_call(self, node: ast.AST, call: ast.Call, depth: int) -> None:
        """A helper that builds the message or the exception: read its returns, and its own message argument."""
        function = self.functions.get(_callee_name(call) or "")
        if function is None:
            self.found.append((self._where(node), None))
            return
        for inner in ast.walk(function):
            if isinstance(inner, ast.Return) and inner.value is not None:
                value = inner.value
                if isinstance(value, ast.Call) and value.args and _is_exception_name(_callee_name(value)):
                    value = value.args[0]
                self._add_message(node, value, depth=depth)
        for arg in call.args[:1]:
            if _segments(arg, self.constants, False) is not None:
                self._add_message(node, arg)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._class.append(node.name)
        self.generic_visit(node)
        self._class.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name == "__str__" and self._class and self._class[-1] in STR_CLASSES:
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and inner.value is not None:
                    self._add_message(inner, inner.value)
        self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        exc = node.exc
        if isinstance(exc, ast.Call) and exc.args:
            if _callee_name(exc) in STR_CLASSES:
                pass  # the class's __str__ writes the message (read above), not the arguments
            elif _callee_name(exc) in self.functions and _callee_name(exc) not in self.exception_classes:
                self._add_call(node, exc, depth=1)  # `raise _make_error(...)`
            else:
                self._add_message(node, exc.args[0])
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = _callee_name(node)
        owner = node.func.value if isinstance(node.func, ast.Attribute) else None
        if name in LOG_METHODS and isinstance(owner, ast.Name) and owner.id in ("logger", "log", "_logger"):
            if node.args:
                self._add_message(node, node.args[0], percent=True)
        elif name == "warn" and isinstance(owner, ast.Name) and owner.id == "warnings" and node.args:
            self._add_message(node, node.args[0])
        elif (
            name == "__init__"
            and isinstance(owner, ast.Call)
            and _callee_name(owner) == "super"
            and self._class
            and self._class[-1] in self.exception_classes
            and self._class[-1] not in STR_CLASSES
            and node.args
        ):
            self._add_message(node, node.args[0])
        self.generic_visit(node)


def _classes_with_str(trees: dict[Path, ast.Module]) -> set[str]:
    return {
        node.name
        for tree in trees.values()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(isinstance(item, ast.FunctionDef) and item.name == "__str__" for item in node.body)
    }


STR_CLASSES: set[str] = set()


def emitted_messages() -> list[tuple[str, str | None]]:
    """(file:line, a fragment the page must contain) for every message in anon_hf; None: no literal text."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in PACKAGE.rglob("*.py")}
    STR_CLASSES.clear()
    STR_CLASSES.update(_classes_with_str(trees))
    found = []
    for path, tree in sorted(trees.items()):
        collector = _Collector(path, tree)
        collector.visit(tree)
        found += collector.found
    return found


def page_text() -> str:
    return " ".join(PAGE.read_text(encoding="utf-8").split())


def test_the_extractor_finds_the_messages_it_must():
    """The extractor itself: known messages of each kind are found, so an empty scan cannot pass the test below."""
    fragments = {fragment for _, fragment in emitted_messages()}
    assert "Invalid gamma value" in fragments  # f-string, constructor
    assert "allowed: any finite real number, e.g. -0.1, 0, 1, 1.1" in fragments  # its longest literal stretch
    assert "This state dict was not written by Anon: param group" in fragments  # load_state_dict
    assert "Invalid optim_args for optim=" in fragments  # built by a helper, raised at its call sites
    assert "unknown key" in fragments  # the helper's argument at one call site
    assert any(f and f.startswith("Anon: the preconditioner refreshed at step") for f in fragments)  # __str__
    assert "Invalid ANON_HF_SYNC_TIMEOUT value" in fragments  # a module constant inside an f-string
    assert any(
        f and f.startswith("accelerate would silently replace the Anon optimizer") for f in fragments
    )  # .format
    assert any(f and f.startswith("adam_epsilon=") for f in fragments)  # logger.warning with %-formatting
    assert len(fragments) >= 60


def test_every_message_has_literal_text():
    bare = [where for where, fragment in emitted_messages() if fragment is None]
    assert bare == [], f"messages without literal text, which the page cannot be checked against: {bare}"


def test_troubleshooting_page_lists_every_message():
    if not PAGE.is_file():
        pytest.fail(f"{PAGE.relative_to(ROOT)} is missing")
    text = page_text()
    missing = sorted(
        {f"{where}: {fragment!r}" for where, fragment in emitted_messages() if fragment and fragment not in text}
    )
    assert missing == [], "docs/troubleshooting.md lacks these messages:\n" + "\n".join(missing)
