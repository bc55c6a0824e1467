"""The package layout: the README's module table is complete, and imports flow one way without cycles.

The table in README.md ("Architecture") gives every module a layer; a module may import only from
its own layer or a lower one (``cli`` → ``app`` → ``verb`` → ``stage`` → ``support`` → ``base``).
Every import counts, also those inside functions; only ``if TYPE_CHECKING:`` blocks are skipped.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "volseg_dask"
LAYERS = ["base", "support", "stage", "verb", "app", "cli"]
TABLE = re.compile(r"<!-- modules:start -->\n(.*?)<!-- modules:end -->", re.S)


def readme_table() -> dict[str, str]:
    """``{"io/reader.py": "stage", ...}`` from the README's module table."""
    match = TABLE.search((ROOT / "README.md").read_text())
    assert match, "README.md lost its modules:start/end markers"
    rows = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from .x import y`` counts as ``x.y`` when that is a module)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "volseg_dask")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "volseg_dask":
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in found if m in known and m != name}


def table_key(name: str, path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def test_readme_module_table_lists_every_module_and_only_those():
    table = readme_table()
    on_disk = {table_key(n, p) for n, p in modules().items()}
    assert sorted(on_disk - set(table)) == [], "modules without a line in README.md's Architecture table"
    assert sorted(set(table) - on_disk) == [], "lines in README.md's Architecture table for modules that do not exist"
    bad = {m: layer for m, layer in table.items() if layer not in LAYERS}
    assert not bad, f"unknown layers (use one of {LAYERS}): {bad}"


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_imports_flow_down_the_layers():
    table = readme_table()
    known = modules()
    layer = {name: LAYERS.index(table[table_key(name, path)]) for name, path in known.items()}
    upward = sorted(f"{a} ({LAYERS[layer[a]]}) imports {b} ({LAYERS[layer[b]]})"
                    for a, targets in import_graph().items() for b in targets if layer[b] > layer[a])
    assert upward == []


def test_no_import_cycles():
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("rule", ["click", "torch"])
def test_heavy_imports_stay_where_they_belong(rule):
    """Only cli imports click; torch only where models run (convert, merge and info start fast)."""
    allowed = {"click": {"volseg_dask.cli"},
               "torch": {"volseg_dask.models", "volseg_dask.device", "volseg_dask.training",
                         "volseg_dask.prediction.inference"}}
    offenders = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and not n.level}
        if rule in top and not any(name == a or name.startswith(a + ".") for a in allowed[rule]):
            offenders.append(name)
    assert offenders == []


def test_convert_merge_evaluate_and_the_cli_start_without_torch():
    code = ("import sys, volseg_dask as vs, volseg_dask.cli, volseg_dask.prediction.merging, volseg_dask.metrics\n"
            "vs.convert, vs.export, vs.merge, vs.evaluate, vs.open_volume, vs.volume_info\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_the_layout_test_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with a cycle and an upward import is caught."""
    pkg = tmp_path / "volseg_dask"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import y\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from .. import b\n")
    (tmp_path / "README.md").write_text("<!-- modules:start -->\n| module | layer | owns |\n| --- | --- | --- |\n"
                                        "| `__init__.py` | app | x |\n| `a.py` | stage | x |\n| `b.py` | stage | x |\n"
                                        "| `sub/__init__.py` | base | x |\n| `sub/c.py` | base | x |\n"
                                        "<!-- modules:end -->\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    graph = import_graph()
    assert graph["volseg_dask.a"] == {"volseg_dask.b"} and graph["volseg_dask.b"] == {"volseg_dask.a"}
    assert graph["volseg_dask.sub.c"] == {"volseg_dask.a"}  # the TYPE_CHECKING import is not counted
    test_readme_module_table_lists_every_module_and_only_those()
    with pytest.raises(AssertionError, match="volseg_dask.a"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match=r"sub.c \(base\) imports volseg_dask.a \(stage\)"):
        test_imports_flow_down_the_layers()
    (pkg / "d.py").write_text("")
    with pytest.raises(AssertionError, match="without a line"):
        test_readme_module_table_lists_every_module_and_only_those()
