"""The package's layering: no import cycle among idfuse_jax's modules, counting imports made
inside functions too (a deferred import hides a cycle from Python, not from a reader).
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "idfuse_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the idfuse_jax modules it imports (anywhere in its body)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports pkg.mod when that is a module.
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "idfuse_jax.method" in graph and "idfuse_jax.losses" in graph["idfuse_jax.method"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_models_know_nothing_of_loading_or_training():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("idfuse_jax.models"):
            outside = {t for t in targets if not t.startswith("idfuse_jax.models")}
            assert outside <= {"idfuse_jax.errors", "idfuse_jax.formats", "idfuse_jax.types"}, (
                name,
                outside,
            )


def test_data_does_not_depend_on_the_models():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("idfuse_jax.data"):
            assert not any(t.startswith("idfuse_jax.models") for t in targets), name
