"""The project's import structure, from the source (no imports are executed).

    python -m benchmarks.tools.import_graph [--modules] [--check]

Prints one line per package edge, "src -> dst  N" (N: import statements), marking with "(lazy)"
edges whose imports all sit inside functions, and the lines of code per package folder.

--check prints instead what breaks the layering and exits 1 when anything does: cycles among the
module-level imports of the project's modules, module-level imports that point up the layer order
(LAYERS), and modules that no layer names. Imports inside functions are lazy (they run when the
function does) and count for neither; tests/test_layers.py runs the same checks.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("exporter", "quant", "android_runner", "benchmarks")

# Lowest first. A module-level import may point down the list or stay within its layer, never up.
# A module takes the layer of the first pattern it matches (fnmatch).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Leaf helpers: errors, files, paths and constants, logging, progress bars, the manifest, the
    # runtime's OpenMP threads.
    ("core", ("exporter", "exporter.errors", "exporter.atomic", "exporter.defaults", "exporter.log",
              "exporter.manifest", "exporter.progress", "exporter.quiet", "exporter.openmp")),
    # The model, what reads it from disk, and the memory its shape needs.
    ("model", ("exporter.config", "exporter.model", "exporter.checkpoint", "exporter.tokenizer",
               "exporter.gguf_import", "exporter.memory")),
    # The scheme and the methods (torch and torchao only, never executorch).
    ("quant", ("quant", "quant.*")),
    # What turns a model into a .pte and runs or measures one.
    ("pipeline", ("exporter.pipeline", "exporter.lower", "exporter.runtime", "exporter.generate",
                  "exporter.evaluate", "exporter.inspect_pte")),
    # Entry points: the command line and the phone harness (whose `bench` command the CLI registers).
    ("apps", ("exporter.cli", "android_runner", "android_runner.*")),
    # The benchmark suite and the investigation scripts, which compose all of the above; nothing
    # installed as a command imports them.
    ("benchmarks", ("benchmarks", "benchmarks.*")),
)


@dataclass(frozen=True)
class Import:
    src: str  # the importing module
    dst: str  # the project module imported
    top: bool  # runs when src is imported (not inside a function, not under `if TYPE_CHECKING:`)
    where: str  # path:line


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """{dotted name: file} for every module in the packages (folders without __init__.py are not packages)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            if not all((root / Path(*rel.parts[:i]) / "__init__.py").is_file() for i in range(1, len(rel.parts))):
                continue
            parts = rel.with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_statements(tree: ast.AST):
    """(import statement, runs at module import?) for every import in tree."""

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, top
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), top)
            else:
                yield from visit(child, top)

    yield from visit(tree, True)


def imports_in(source: str, module: str, known: set[str], path: str = "", is_package: bool = False) -> list[Import]:
    """The imports of the project's modules (those in `known`) that `module`'s source makes.

    `from pkg import name` is an import of pkg.name when that is a module, else of pkg."""

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    out = []
    for node, top in import_statements(ast.parse(source, path or module)):
        where = f"{path or module}:{node.lineno}"
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in dict.fromkeys(targets):
            dst = resolve(t)
            if dst is not None and dst != module:
                out.append(Import(module, dst, top, where))
    return out


def project_imports(root: Path = REPO) -> list[Import]:
    mods = project_modules(root)
    known = set(mods)
    out = []
    for mod, path in mods.items():
        out += imports_in(path.read_text(), mod, known, str(path.relative_to(root)), path.name == "__init__.py")
    return out


def layer_of(module: str) -> int | None:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    return None


def upward(imports: list[Import]) -> list[Import]:
    """Module-level imports of a module in a higher layer than the importer's."""
    out = []
    for imp in imports:
        src, dst = layer_of(imp.src), layer_of(imp.dst)
        if imp.top and src is not None and dst is not None and dst > src:
            out.append(imp)
    return out


def unplaced(modules) -> list[str]:
    return sorted(m for m in modules if layer_of(m) is None)


def cycles(imports: list[Import]) -> list[list[str]]:
    """One cycle, as a path a -> ... -> a, for each group of modules whose module-level imports reach
    one another (Tarjan's strongly connected components)."""
    graph = defaultdict(set)
    for imp in imports:
        if imp.top:
            graph[imp.src].add(imp.dst)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):
        # Iterative, so a long chain of imports cannot reach the recursion limit.
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        group.append(w)
                        if w == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))

    for v in sorted(list(graph)):
        if v not in index:
            connect(v)
    return [_cycle_through(g, graph) for g in sorted(groups)]


def _cycle_through(group: list[str], graph) -> list[str]:
    """The shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    prev, frontier = {}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return group  # unreachable for a strongly connected group


def problems(root: Path = REPO) -> list[str]:
    """Every break of the layering, one line each; empty when there is none."""
    imports = project_imports(root)
    out = [f"cycle: {' -> '.join(c)}" for c in cycles(imports)]
    out += [f"upward: {i.where}: {i.src} ({LAYERS[layer_of(i.src)][0]}) imports {i.dst} ({LAYERS[layer_of(i.dst)][0]})"
            for i in upward(imports)]
    out += [f"no layer: {m} (add it to LAYERS in benchmarks/tools/import_graph.py)" for m in unplaced(project_modules(root))]
    return out


def graph(modules: bool = False, root: Path = REPO) -> dict:
    """{(src, dst): [module-level imports, imports in functions]}: package edges, or module edges."""
    edges = defaultdict(lambda: [0, 0])
    for imp in project_imports(root):
        src, dst = (imp.src, imp.dst) if modules else (imp.src.split(".")[0], imp.dst.split(".")[0])
        if src != dst:
            edges[(src, dst)][0 if imp.top else 1] += 1
    return edges


def lines_of_code(root: Path = REPO) -> dict[str, int]:
    out = {}
    for pkg in PACKAGES:
        for folder in sorted({p.parent for p in (root / pkg).rglob("*.py")}):
            out[str(folder.relative_to(root))] = sum(len(p.read_text().splitlines()) for p in folder.glob("*.py"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", action="store_true", help="module-to-module edges instead of package edges")
    ap.add_argument("--check", action="store_true", help="only the cycles, upward imports and unplaced modules")
    a = ap.parse_args(argv)
    if a.check:
        found = problems()
        print("\n".join(found) if found else
              f"no module-level cycles, no upward imports ({' <- '.join(name for name, _ in LAYERS)})")
        return 1 if found else 0
    for (src, dst), (top, lazy) in sorted(graph(a.modules).items()):
        print(f"{src} -> {dst}  {top + lazy}" + ("  (lazy)" if not top else ""))
    print()
    for folder, n in lines_of_code().items():
        print(f"{folder}: {n} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
