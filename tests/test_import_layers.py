"""The package's import layers: errors/folders/locks < config < data < models < ssl < engine < experiment < cli.

A module may import from its own layer or below at module level, never above, and module-level imports form no
circle. Imports inside functions (deferred to keep ``--help`` fast or to break a circle) are listed exactly: the
known upward ones are :data:`KNOWN_LAZY_UPWARD`, so a new one fails here and a removed one must be struck off.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "decon_med"
ORDER = ["errors", "folders", "locks", "config", "data", "models", "ssl", "engine", "experiment", "cli"]

#: Upward imports inside functions that exist today; each is a layering debt to remove, never to add to.
KNOWN_LAZY_UPWARD = {
    ("decon_med.config", "decon_med.ssl"),
    ("decon_med.config", "decon_med.data.layout_base"),
    ("decon_med.config", "decon_med.models.encoder_weights"),
    ("decon_med.config_reference", "decon_med.experiment"),
    ("decon_med.config_reference", "decon_med.ssl"),
    ("decon_med.models.network", "decon_med.engine.checkpoint"),
}


def _layer(module: str) -> str | None:
    parts = module.split(".")[1:]
    if not parts:
        return None
    head = parts[0]
    for prefix in ("cli", "experiment", "config"):
        if head.startswith(prefix):
            return prefix
    return head if head in ORDER else None


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """Every module of the package -> the ``decon_med`` modules it imports, each with ``True`` at module level."""
    graph: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("decon_med"):
                found.append((node.module, id(node) in top))
            elif isinstance(node, ast.Import):
                found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("decon_med")]
        graph[module] = found
    return graph


def _upward(graph, module_level: bool) -> set[tuple[str, str]]:
    out = set()
    for module, imports in graph.items():
        here = _layer(module)
        for target, top in imports:
            there = _layer(target)
            if top == module_level and here and there and ORDER.index(there) > ORDER.index(here):
                out.add((module, target))
    return out


def test_no_module_level_import_goes_up_a_layer():
    assert _upward(_imports(), module_level=True) == set()


def test_lazy_upward_imports_are_exactly_the_known_ones():
    assert _upward(_imports(), module_level=False) == KNOWN_LAZY_UPWARD


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> imported modules), or ``None``."""
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(t for t in graph[module] if t in graph and t != module):
            if state.get(target) == 1:
                return [*path, module, target]
            if target not in state and (found := visit(target, [*path, module])):
                return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [])):
            return found
    return None


def test_module_level_imports_form_no_circle():
    # a package's __init__ importing its own submodules ("from decon_med.ssl import registry") is no circle
    graph = {m: {t for t, top in imports if top} for m, imports in _imports().items()}
    assert _circle(graph) is None


def test_the_circle_check_finds_a_planted_circle():
    graph = {"decon_med.a": {"decon_med.b"}, "decon_med.b": {"decon_med.c"}, "decon_med.c": {"decon_med.a"}}
    assert _circle(graph) == ["decon_med.a", "decon_med.b", "decon_med.c", "decon_med.a"]


def test_the_layer_check_sees_a_planted_upward_import():
    graph = {"decon_med.models.x": [("decon_med.engine.y", True)], "decon_med.engine.y": []}
    assert _upward(graph, module_level=True) == {("decon_med.models.x", "decon_med.engine.y")}
