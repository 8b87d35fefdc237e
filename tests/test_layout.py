"""The package's layers, as the README's "How the code is organised" lists them: no module
imports another that imports it back, not even from inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import epsdpo_kernels

PACKAGE = Path(epsdpo_kernels.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its source (top level or not)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path of modules that imports its own start, or None."""
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return None
        if module in visiting:
            return visiting[visiting.index(module) :] + [module]
        visiting.append(module)
        for target in sorted(graph.get(module, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert {"epsdpo_kernels.autograd", "epsdpo_kernels.token_triton"} <= graph[
        "epsdpo_kernels.loss"
    ] | graph["epsdpo_kernels.autograd"] | graph["epsdpo_kernels.dispatch"]
    # The package's __init__ only re-exports the public names: modules importing "from ." a
    # name it defines are not a cycle through it.
    graph = {m: {t for t in ts if t != "epsdpo_kernels"} for m, ts in graph.items()}
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))
    # The check itself, on the cycle this layout removed (validation ↔ the Triton kernels).
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
