"""Griffe extension for the API page: turn the torch-style reStructuredText in anon_hf's docstrings into Markdown.

The docstrings follow torch.optim (``.. math::`` blocks, ``:math:`` and ``:class:`` roles, double backticks), which
mkdocstrings would otherwise print verbatim. Used only by mkdocs.yml; the library does not import it.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_MATH_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+\S.*\n|[ \t]*\n)+)", re.M
)
_ROLE = re.compile(r":(?P<role>math|class|meth|func|attr|mod|exc):`~?(?P<text>[^`]+)`")
_LINK = re.compile(r"`(?P<text>[^`<]+?)\s*<(?P<url>https?://[^>]+)>`_")
_LITERAL = re.compile(r"``(?P<text>[^`]+)``")


def rst_to_markdown(text: str) -> str:
    """Convert the few reStructuredText forms anon_hf's docstrings use; everything else passes through."""

    def math_block(match: re.Match) -> str:
        body = textwrap.dedent(match.group("body")).strip("\n")
        indent = match.group("indent")
        return f"{indent}$$\n{textwrap.indent(body, indent)}\n{indent}$$\n\n"

    text = _MATH_BLOCK.sub(math_block, text)
    text = _ROLE.sub(lambda m: f"${m['text']}$" if m["role"] == "math" else f"`{m['text']}`", text)
    text = _LINK.sub(lambda m: f"[{m['text']}]({m['url']})", text)
    return _LITERAL.sub(lambda m: f"`{m['text']}`", text)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
