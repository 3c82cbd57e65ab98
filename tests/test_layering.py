"""The import graph of `rsd`: no import reaches a lower layer than its own, and there is no cycle.

The layers are the table under "## Layers" in docs/architecture.md (parsed here, so the document and the check
cannot drift apart). Every `import` and `from ... import` of every module under rsd/ is read with `ast`,
including imports inside functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rsd"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layer_table() -> dict[str, tuple[int, str]]:
    """`{module prefix: (rank, layer name)}` from the table under "## Layers" in docs/architecture.md."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[int, str]] = {}
    for rank, name, modules in re.findall(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|\s*$", section, flags=re.M):
        for module in re.findall(r"`([\w.]+)`", modules):
            table[module] = (int(rank), name)
    return table


def module_name(path: Path) -> str:
    """The dotted name of a module file under rsd/ (a package's `__init__.py` is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """`(imported rsd module, line)` for every import in the file, resolved to the deepest module that exists."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "rsd" or target.startswith("rsd."):
                while target not in known:
                    target = target.rpartition(".")[0]
                found.append((target, node.lineno))
    return found


def rank_of(module: str, table: dict[str, tuple[int, str]]) -> tuple[int, str]:
    """The layer of a module: the entry of the longest table prefix that names it or a package above it."""
    for candidate in sorted(table, key=len, reverse=True):
        if module == candidate or module.startswith(candidate + "."):
            return table[candidate]
    raise KeyError(module)


def graph() -> dict[str, list[tuple[str, int]]]:
    """`{module: [(imported module, line), ...]}` over the whole package."""
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_the_table_names_the_layers_in_order() -> None:
    table = layer_table()
    assert table["rsd.errors"][0] == 0 and table["rsd.cli"][0] == max(rank for rank, _ in table.values())
    assert table["rsd.data"][0] < table["rsd.models"][0] < table["rsd.bundle"][0] < table["rsd.runtime"][0] < table["rsd.export"][0]


def test_every_module_has_a_layer() -> None:
    table = layer_table()
    missing = []
    for name in modules():
        try:
            rank_of(name, table)
        except KeyError:
            missing.append(name)
    assert not missing, f"modules without a layer in docs/architecture.md: {missing}"


def test_no_import_reaches_a_lower_layer() -> None:
    table = layer_table()
    violations = []
    for name, targets in graph().items():
        rank, layer = rank_of(name, table)
        for target, line in targets:
            target_rank, target_layer = rank_of(target, table)
            if target_rank > rank:
                violations.append(f"{name}:{line} ({layer}, {rank}) imports {target} ({target_layer}, {target_rank})")
    assert not violations, "imports from a higher layer to a lower one:\n" + "\n".join(violations)


def test_the_import_graph_has_no_cycle() -> None:
    edges = {name: sorted({t for t, _ in targets if t != name}) for name, targets in graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in edges[node]:
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "rsd" / "data" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from rsd.runtime.policy import MainOnlyPolicy\n    return MainOnlyPolicy\n")
    found = imports("rsd.data.probe", source, {"rsd", "rsd.runtime", "rsd.runtime.policy", "rsd.data", "rsd.data.probe"})
    assert found == [("rsd.runtime.policy", 2)]
    assert rank_of("rsd.runtime.policy", layer_table())[0] > rank_of("rsd.data.probe", layer_table())[0]
