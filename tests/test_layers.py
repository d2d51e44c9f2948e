"""The package is strictly layered: every import points down (or stays in its layer), and none is circular.

Layers, lowest first (docs/ARCHITECTURE.md draws the same map):

0. infrastructure: errors, lazy, progress, memory, choices, sources, device, io/
1. inputs: checkpoints, task_vectors, lowrank, data/
2. pure methods: merging/, smile, adapter_options, heads/ (but the zoo), the torch-light part of mass/ (settings,
   factors, storage, budget, set merges, router, pooling, the LRU)
3. the MASS engine: mass/ routed wrappers, first and second pass, model, serving, build; mass/__init__
4. model families: adapters/, heads/zoo
5. artifacts: artifact/
6. experiments and the server: experiments/, server/
7. the command line: cli/, __main__

The test parses every module (no import is run) and follows every import, function-local ones included: a
local import may only be there for start-up time, never to hide an upward or circular one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import massmerge

PACKAGE = Path(massmerge.__file__).resolve().parent
ENGINE = ("routed", "restart", "first_pass", "second_pass", "seam", "shared", "reference", "checks", "clock", "outputs",
          "model", "serving", "build")
LAYERS: list[tuple[str, ...]] = [
    ("massmerge", "massmerge.errors", "massmerge.lazy", "massmerge.progress", "massmerge.memory", "massmerge.choices",
     "massmerge.sources", "massmerge.device", "massmerge.io"),
    ("massmerge.checkpoints", "massmerge.task_vectors", "massmerge.lowrank", "massmerge.data"),
    ("massmerge.merging", "massmerge.smile", "massmerge.adapter_options", "massmerge.heads", "massmerge.mass.config", "massmerge.mass.experts", "massmerge.mass.stream",
     "massmerge.mass.storage", "massmerge.mass.budget", "massmerge.mass.lru", "massmerge.mass.setmerge",
     "massmerge.mass.router", "massmerge.mass.pooling", "massmerge.mass.batch"),
    ("massmerge.mass", *(f"massmerge.mass.{name}" for name in ENGINE)),
    ("massmerge.adapters", "massmerge.heads.zoo"),
    ("massmerge.artifact",),
    ("massmerge.experiments", "massmerge.server"),
    ("massmerge.cli", "massmerge.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names ``module`` (``massmerge.heads.zoo`` before ``massmerge.heads``)."""
    best, found = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "massmerge" and module.startswith(prefix + "."))
            if covers and len(prefix) > best:  # the package root covers only itself
                best, found = len(prefix), index
    if found is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to the map")
    return found


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported massmerge module, line) for every import in the file, resolved to a known module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "massmerge":
                while name not in known and "." in name:
                    name = name.rpartition(".")[0]
                found.append((name, node.lineno))
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_imports_never_point_up() -> None:
    upward = []
    for module, imports in graph().items():
        for target, line in imports:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module}:{line} imports {target} (layer {layer_of(target)} > {layer_of(module)})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    edges = {module: sorted({t for t, _ in imports if t != module}) for module, imports in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in edges.get(node, []):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_checker_sees_a_local_upward_import(tmp_path: Path) -> None:
    """The rule is enforced on function-local imports too (the two hidden cycles of issue 19 were local)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from massmerge.artifact import load\n    return load\n")
    found = imports_of("massmerge.mass.budget", source, set(modules()))
    assert found == [("massmerge.artifact", 2)] and layer_of("massmerge.artifact") > layer_of("massmerge.mass.budget")
