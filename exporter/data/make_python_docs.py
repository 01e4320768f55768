"""Writes python-stdlib-docs.txt: the docstrings of CPython's standard library, a text of another
register than WikiText-2's encyclopedia prose (technical reference: API descriptions, argument
lists, doctest examples), for evaluating quantized models on text no method trains or calibrates on.

    python exporter/data/make_python_docs.py /path/to/lib/python3.11 > exporter/data/python-stdlib-docs.txt

The shipped file was made from CPython 3.11.7's Lib/ (PSF License, see PSF-LICENSE.txt beside it).
Top-level modules in name order, private ones (a leading underscore) and tests left out; for each,
its docstring, then every public top-level function's and class's (and their public methods'), each
headed by its dotted name. Stops after LIMIT characters.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LIMIT = 240_000


def entries(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mod = path.stem
    doc = ast.get_docstring(tree)
    if doc:
        yield mod, doc
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            if (d := ast.get_docstring(node)):
                yield f"{mod}.{node.name}", d
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_") and (d := ast.get_docstring(sub)):
                        yield f"{mod}.{node.name}.{sub.name}", d


def main(lib: Path) -> None:
    out, size = [], 0
    for path in sorted(lib.glob("*.py")):
        if path.stem.startswith("_") or path.stem.startswith("test"):
            continue
        for name, doc in entries(path):
            block = f"{name}\n\n{doc.strip()}\n"
            out.append(block)
            size += len(block) + 1
            if size >= LIMIT:
                sys.stdout.write("\n".join(out))
                return
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
