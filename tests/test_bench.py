"""The benchmarks use massmerge only through its public API: no private names, no patching of its objects.

Why: a figure measured through a patched engine is not the figure users get (docs/BENCHMARKS.md cites these
scripts). The check parses bench/ (nothing is run): no ``from massmerge... import _name``, no ``obj._name``
read on anything but the script's own ``self``, and no assignment to an attribute of anything imported from
massmerge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.rglob("*.py") if ".venvs" not in p.parts)  # not the peers' venvs


def massmerge_names(tree: ast.AST) -> set[str]:
    """Local names bound to massmerge modules or objects by the script's imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("massmerge")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("massmerge"):
            names |= {a.asname or a.name for a in node.names}
    return names


def problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = massmerge_names(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(BENCH)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("massmerge"):
            found += [f"{where} imports the private {a.name}" for a in node.names if a.name.startswith("_")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{where} reads the private attribute {node.attr}")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for part in ast.walk(target):
                    if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) and part.value.id in imported:
                        found.append(f"{where} assigns {part.value.id}.{part.attr} (patches massmerge)")
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(BENCH)))
def test_benchmarks_use_only_the_public_api(path: Path) -> None:
    assert not problems(path)


def test_the_check_catches_patching(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from massmerge.mass import model as engine\nengine.MASSModel.route = None\nx = m._shared\n")
    global BENCH
    saved, BENCH = BENCH, tmp_path
    try:
        assert len(problems(probe)) == 2
    finally:
        BENCH = saved
