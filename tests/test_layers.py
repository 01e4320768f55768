"""The packages' layering, read from the source with ast (nothing is imported): no cycles among
module-level imports, and no module-level import of a higher layer (LAYERS in
benchmarks/tools/import_graph.py: core <- model <- quant <- pipeline <- apps <- benchmarks)."""

from __future__ import annotations

import ast

from benchmarks.tools import import_graph as g


def _known() -> set[str]:
    return set(g.project_modules())


def test_every_module_has_a_layer():
    assert g.unplaced(g.project_modules()) == []


def test_no_module_level_import_cycles():
    assert g.cycles(g.project_imports()) == []


def test_no_module_level_import_points_up_a_layer():
    found = g.upward(g.project_imports())
    assert found == [], "\n".join(f"{i.where}: {i.src} imports {i.dst}" for i in found)


def test_the_checks_see_what_they_guard_against():
    known = _known()
    imports = g.project_imports()
    # A quant module importing the pipeline at module level points up two layers...
    added = g.imports_in("from exporter.pipeline import export\n", "quant.ptq", known)
    assert [(i.src, i.dst, i.top) for i in added] == [("quant.ptq", "exporter.pipeline", True)]
    assert g.upward(imports + added) == added
    # ...inside a function it is lazy, and allowed.
    lazy = g.imports_in("def f():\n    from exporter.pipeline import export\n", "quant.ptq", known)
    assert [i.top for i in lazy] == [False] and g.upward(imports + lazy) == []
    # `from package import module` is an import of the module; TYPE_CHECKING imports never run.
    typed = g.imports_in("from typing import TYPE_CHECKING\nfrom exporter import pipeline\n"
                         "if TYPE_CHECKING:\n    from exporter.lower import lower\n", "quant.ptq", known)
    assert [(i.dst, i.top) for i in typed] == [("exporter.pipeline", True), ("exporter.lower", False)]
    # exporter.manifest imports exporter.atomic at module level: the reverse closes a cycle.
    back = g.imports_in("from exporter.manifest import file_sha256\n", "exporter.atomic", known)
    assert g.cycles(imports + back) == [["exporter.atomic", "exporter.manifest", "exporter.atomic"]]


def test_the_command_line_needs_neither_the_suite_nor_torch_to_start():
    """`ptekit --help` loads exporter.cli and what it imports at module level: none of it is in
    benchmarks/, and none of it imports torch before a command runs."""
    known = _known()
    mods = g.project_modules()
    seen, todo = set(), ["exporter.cli"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        source = mods[m].read_text()
        todo += [i.dst for i in g.imports_in(source, m, known) if i.top]
        assert not [n for n, top in g.import_statements(ast.parse(source)) if top and _names_torch(n)], m
    assert not [m for m in seen if m.split(".")[0] == "benchmarks"], sorted(seen)


def _names_torch(node) -> bool:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return any(n.split(".")[0] == "torch" for n in names)
