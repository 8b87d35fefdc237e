"""The package's layers, declared once (``LAYERS``, which docs/DEVELOPMENT.md's layer table
follows): every module imports only from its own layer or the layers before it, and no module
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


# The layers from the math up, each a list of modules (package-relative). A module may import
# from its own layer and the layers before it, never from a later one.
LAYERS = {
    "parameters": ["params", "layout"],
    "inputs": ["validation", "sequences"],
    "backends": [
        "triton_backend",
        "triton_backend.fields",
        "triton_backend.launch",
        "triton_backend.lse",
        "triton_backend.forward",
        "triton_backend.backward",
        "triton_backend.vocab_shard",
        "triton_backend.sequence_sums",
        "triton_backend.pair_head",
        "torch_backend",
        "torch_backend.rows",
        "torch_backend.forward",
        "torch_backend.backward",
        "torch_backend.vocab_shard",
        "torch_backend.sequence_sums",
        "torch_backend.pair_head",
    ],
    "distributed": [
        "distributed",
        "distributed.agreement",
        "distributed.vocab_shard",
        "distributed.sequence_group",
    ],
    "call": ["plans", "call"],
    "steps": ["steps", "linear_chunks"],
    "autograd": ["autograd"],
    "api": [
        "output",
        "loss",
        "linear_loss",
        "loss_types",
        "adaptive_beta",
        "diagnostics",
        "reference",
    ],
    "integrations": [
        "hugging_face",
        "engines",
        "integrations",
        "integrations.trl.config",
        "integrations.trl.collator",
        "integrations.trl.model_hook",
        "integrations.trl.trainer",
        "integrations.trl",
        "trl",
    ],
    "package": [""],
}


def layer_of() -> dict[str, int]:
    """Module name → the index of its layer in ``LAYERS``."""
    return {
        ".".join(filter(None, ["epsdpo_kernels", module])): index
        for index, modules in enumerate(LAYERS.values())
        for module in modules
    }


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every import of a module from a later layer than its own, as "a → b"."""
    return sorted(
        f"{module} → {target}"
        for module, targets in graph.items()
        for target in targets
        if layers[target] > layers[module]
    )


def test_every_module_has_a_layer_and_imports_only_from_layers_before_it():
    # "from . import layout" names the package as well as the module: the package itself (its
    # __init__ re-exports the public names) is not a target.
    graph = {m: ts - {"epsdpo_kernels"} for m, ts in import_graph().items()}
    layers = layer_of()
    assert set(graph) == set(layers), (
        f"not in LAYERS: {sorted(set(graph) - set(layers))}; "
        f"in LAYERS but gone: {sorted(set(layers) - set(graph))}"
    )
    assert upward_imports(graph, layers) == []
    # The check itself: a kernel module importing the steps that call it would point up.
    broken = {**graph, "epsdpo_kernels.triton_backend.forward": {"epsdpo_kernels.steps"}}
    assert upward_imports(broken, layers) == [
        "epsdpo_kernels.triton_backend.forward → epsdpo_kernels.steps"
    ]


def test_no_import_cycles():
    graph = import_graph()
    assert {"epsdpo_kernels.autograd", "epsdpo_kernels.triton_backend"} <= graph[
        "epsdpo_kernels.loss"
    ] | graph["epsdpo_kernels.autograd"] | graph["epsdpo_kernels.steps"]
    # The package's __init__ only re-exports the public names: modules importing "from ." a
    # name it defines are not a cycle through it.
    graph = {m: {t for t in ts if t != "epsdpo_kernels"} for m, ts in graph.items()}
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))
    # The check itself, on a three-module cycle.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_edits_sys_path():
    """Scripts import the repository's packages through the install (or PYTHONPATH), never by
    editing sys.path: an edit hides a missing install and can shadow the installed package."""
    root = PACKAGE.parent
    edits = [
        f"{path.relative_to(root)}:{number}"
        for folder in ("epsdpo_kernels", "train", "benchmarks", "tests")
        for path in sorted((root / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "sys.path." + "insert" in line or "sys.path." + "append" in line
    ]
    assert edits == []
