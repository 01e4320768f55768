"""Which of the top-level packages import which, from the source (no imports are executed).

    python -m benchmarks.tools.import_graph [--modules]

Prints one line per package edge, "src -> dst  N" (N: import statements), marking with "(lazy)"
edges whose imports all sit inside functions, and the lines of code per package folder.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("exporter", "quant", "android_runner", "benchmarks")


def package_of(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def imports(path: Path):
    """(imported module, at module level?) for every import statement in path."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, id(node) in top_level


def graph(modules: bool = False) -> dict:
    edges = defaultdict(lambda: [0, 0])  # (src, dst) -> [module-level, in functions]
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            src = ".".join(path.relative_to(REPO).with_suffix("").parts) if modules else pkg
            for mod, top in imports(path):
                dst_pkg = package_of(mod)
                if dst_pkg is None or dst_pkg == pkg and not modules:
                    continue
                dst = mod if modules else dst_pkg
                edges[(src, dst)][0 if top else 1] += 1
    return edges


def lines_of_code() -> dict[str, int]:
    out = {}
    for pkg in PACKAGES:
        for folder in sorted({p.parent for p in (REPO / pkg).rglob("*.py")}):
            out[str(folder.relative_to(REPO))] = sum(len(p.read_text().splitlines()) for p in folder.glob("*.py"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", action="store_true", help="module-to-module edges instead of package edges")
    a = ap.parse_args(argv)
    for (src, dst), (top, lazy) in sorted(graph(a.modules).items()):
        print(f"{src} -> {dst}  {top + lazy}" + ("  (lazy)" if not top else ""))
    print()
    for folder, n in lines_of_code().items():
        print(f"{folder}: {n} lines")


if __name__ == "__main__":
    main()
