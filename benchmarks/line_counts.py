"""Lines and code lines (no docstrings, comments or blank lines) of each module of a package.

Example (the figures in the closing notes of the core redesign)::

    python benchmarks/line_counts.py sk_padim
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

_NOT_CODE = (
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
)


def docstring_lines(tree: ast.Module) -> set[int]:
    """Line numbers of the module's, classes' and functions' docstrings."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str) -> int:
    """Lines holding a token of code outside docstrings."""
    docstrings = docstring_lines(ast.parse(source))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def main(folder: str) -> None:
    total = code = 0
    for path in sorted(Path(folder).glob("*.py")):
        source = path.read_text()
        n_lines, n_code = len(source.splitlines()), code_lines(source)
        total, code = total + n_lines, code + n_code
        print(f"{path.name:24s} {n_lines:6d} {n_code:6d}")
    print(f"{'TOTAL':24s} {total:6d} {code:6d}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sk_padim")
