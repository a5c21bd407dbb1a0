"""ARCHITECTURE.md against the code: its import map is the import graph, and every module is described.

(No circles: tests/unit/test_layering.py.)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def import_map():
    spec = importlib.util.spec_from_file_location("import_map", ROOT / "tools" / "import_map.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["import_map"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_layers_of_a_planted_graph(import_map):
    """The map's layers: 0 imports nothing, each module one above the highest it imports; a circle is found."""
    assert import_map.layers({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}) == {"a": 2, "b": 1, "c": 0, "d": 1}
    assert import_map.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_architecture_md_map_is_the_code(import_map):
    """The map in ARCHITECTURE.md is what ``tools/import_map.py`` draws from the code today."""
    edges = import_map.module_graph()
    doc = import_map.current_section(import_map.DOC.read_text())
    assert doc == import_map.render(edges), "run `python tools/import_map.py --write` and review the change"


def test_every_module_is_described(import_map):
    """Each top-level module and subpackage of driftlens is named (bold, as **`name`**) in ARCHITECTURE.md."""
    text = import_map.DOC.read_text()
    named = {f"**`{form}`**" for form in ("{m}", "{m}/", "driftlens.{m}")}
    missing = [m for m in import_map.module_graph()
               if not m.startswith("_") and not any(n.format(m=m) in text for n in named)]
    assert missing == []


def private_imports(root: Path) -> list[str]:
    """``file:line name`` for each ``from driftlens.X import _y`` (or ``driftlens.X._y`` attribute read
    through an imported module) in the package: a module's private helper used from another module."""
    import ast

    found = []
    for f in sorted(root.rglob("*.py")):
        tree = ast.parse(f.read_text())
        aliases = {}                                       # local name -> driftlens module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("driftlens"):
                for a in node.names:
                    if a.name.startswith("_") and a.name != "__version__":
                        found.append(f"{f.relative_to(root.parent)}:{node.lineno} {node.module}.{a.name}")
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("driftlens"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in aliases:
                found.append(f"{f.relative_to(root.parent)}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names(tmp_path):
    planted = tmp_path / "driftlens"
    planted.mkdir()
    (planted / "a.py").write_text("from driftlens.b import _helper\nfrom driftlens import c as C\nC._x()\n")
    assert private_imports(planted) == ["driftlens/a.py:1 driftlens.b._helper", "driftlens/a.py:3 driftlens.c._x"]
    assert private_imports(ROOT / "driftlens") == []
