"""Code-shape figures of the four layers (issue 22's before/after): ``dict[str, Any]`` per package,
imports inside function bodies, the largest module and the longest function.

Run: ``.venv/bin/python scripts/code_metrics.py`` (from the repository root).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("retrieval", "indexer", "eval", "api")


def _lazy_imports(tree: ast.AST) -> int:
    count = 0

    def visit(node: ast.AST, in_function: bool) -> None:
        nonlocal count
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                count += 1
            visit(child, inside)

    visit(tree, False)
    return count


def main(root: Path) -> int:
    lazy_total = 0
    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for pkg in PACKAGES:
        any_dicts = lazy = 0
        for path in sorted((root / pkg).rglob("*.py")):
            text = path.read_text()
            rel = str(path.relative_to(root))
            any_dicts += text.count("dict[str, Any]")
            tree = ast.parse(text)
            lazy += _lazy_imports(tree)
            modules.append((len(text.splitlines()), rel))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                    functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
        lazy_total += lazy
        print(f"{pkg:10s} dict[str, Any]: {any_dicts:3d}   imports inside functions: {lazy:3d}")
    print(f"{'all':10s} dict[str, Any]: {sum(p.read_text().count('dict[str, Any]') for g in PACKAGES for p in (root / g).rglob('*.py')):3d}"
          f"   imports inside functions: {lazy_total:3d}")
    for n, name in sorted(modules, reverse=True)[:3]:
        print(f"module   {n:4d} lines  {name}")
    for n, name in sorted(functions, reverse=True)[:3]:
        print(f"function {n:4d} lines  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")))
