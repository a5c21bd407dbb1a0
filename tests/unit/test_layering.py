"""The import graph of driftlens has no circles between its top-level modules.

grimp reads every import statement, the lazy ones inside functions included, so a circle hidden
behind a function-level import fails here too. A subpackage (``train``, ``organism``, ``testing``)
counts as one module.
"""
from __future__ import annotations

import itertools

import pytest

grimp = pytest.importorskip("grimp")


def circles(graph, package: str) -> list[str]:
    """``"A -> ... -> B and B -> ... -> A"`` for each pair of ``package``'s top-level modules that import each other."""
    top = sorted(graph.find_children(package))
    out = []
    for a, b in itertools.combinations(top, 2):
        there = graph.find_shortest_chain(a, b, as_packages=True)
        back = graph.find_shortest_chain(b, a, as_packages=True) if there else None
        if there and back:
            out.append(f"{' -> '.join(there)} and {' -> '.join(back)}")
    return out


def test_circles_finds_a_lazy_or_indirect_circle():
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.sub", "pkg.sub.x"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.sub.x")
    assert circles(graph, "pkg") == []
    graph.add_import(importer="pkg.sub.x", imported="pkg.a")          # a -> b -> sub -> a
    assert circles(graph, "pkg") == ["pkg.a -> pkg.b and pkg.b -> pkg.sub.x -> pkg.a",
                                     "pkg.a -> pkg.b -> pkg.sub.x and pkg.sub.x -> pkg.a",
                                     "pkg.b -> pkg.sub.x and pkg.sub.x -> pkg.a -> pkg.b"]


def test_no_import_circle_among_driftlens_modules():
    graph = grimp.build_graph("driftlens")
    found = circles(graph, "driftlens")
    assert not found, "modules that import each other (directly or through a chain):\n" + "\n".join(found)
