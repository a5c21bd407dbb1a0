#!/usr/bin/env python3
"""The import map of driftlens, drawn from the code: which module imports which, in layers.

    python tools/import_map.py            # print the map
    python tools/import_map.py --write    # rewrite the map in ARCHITECTURE.md (between its markers)
    python tools/import_map.py --check    # exit 1 when ARCHITECTURE.md's map is not the code's

Modules are the package's top-level modules and subpackages (``driftlens.train``, ``driftlens.stats``
... count as one node each; ``driftlens`` itself, which only re-exports, is left out). Imports inside
functions count (grimp reads them too). A module's layer is one more than the highest layer it
imports, so layer 0 imports no other driftlens module and every arrow points to a lower layer; an
import circle makes the map impossible and is reported instead. ``tests/unit/test_architecture.py``
runs ``--check``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "ARCHITECTURE.md"
BEGIN, END = "<!-- import-map:begin -->", "<!-- import-map:end -->"


def node(module: str) -> str | None:
    """``driftlens.train.anchor`` -> ``train``; None for the package root itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def module_graph(package: str = "driftlens") -> dict[str, set[str]]:
    """``{node: {nodes it imports}}`` over the package's top-level modules and subpackages."""
    import grimp

    g = grimp.build_graph(package)
    edges: dict[str, set[str]] = {}
    for m in g.modules:
        a = node(m)
        if a is None:
            continue
        edges.setdefault(a, set())
        for imported in g.find_modules_directly_imported_by(m):
            b = node(imported)
            if b is not None and b != a:
                edges[a].add(b)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the list of its nodes (strongly connected components of size > 1)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layers(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each node's layer: 0 for a node importing no other, else 1 + the highest layer it imports."""
    level: dict[str, int] = {}

    def depth(v):
        if v not in level:
            level[v] = 1 + max((depth(w) for w in edges[v]), default=-1)
        return level[v]

    for v in edges:
        depth(v)
    return level


def render(edges: dict[str, set[str]]) -> str:
    """The map as Markdown: one line per layer, then each module's imports."""
    level = layers(edges)
    lines = ["```"]
    for k in range(max(level.values()) + 1):
        names = sorted(v for v in edges if level[v] == k)
        lines.append(f"layer {k}: {', '.join(names)}")
    lines.append("```")
    lines.append("")
    lines.append("| module | imports |")
    lines.append("|---|---|")
    for v in sorted(edges, key=lambda v: (-level[v], v)):
        lines.append(f"| `{v}` | {', '.join(sorted(edges[v])) or '--'} |")
    return "\n".join(lines)


def current_section(text: str) -> str:
    """The map now in ARCHITECTURE.md (between the markers)."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: markers {BEGIN} / {END} not found")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str]) -> int:
    """Print, write or check the map (see the module docstring); the exit code."""
    edges = module_graph()
    circles = cycles(edges)
    if circles:
        print("import circles (no layered map exists):", "; ".join(" <-> ".join(c) for c in circles))
        return 1
    text = render(edges)
    if "--write" in argv:
        doc = DOC.read_text()
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        print(f"wrote the import map into {DOC}")
        return 0
    if "--check" in argv:
        if current_section(DOC.read_text()) != text:
            print(f"{DOC}'s import map is not the code's; run `python tools/import_map.py --write`\n\n{text}")
            return 1
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
