"""The package's layout: imports point one way, from the command line down to the layer, with no cycle.

Every import statement of every module counts, those inside functions too (a cycle hidden behind a lazy
import is still a cycle for whoever reads the code).
"""

from __future__ import annotations

import ast
from pathlib import Path

import bnexp

ROOT = Path(bnexp.__file__).parent

# Lower layers never import higher ones; within a layer, packages do not import each other.
LAYERS = [
    {"bnexp", "bnexp.errors"},
    {"bnexp.config"},
    {"bnexp.data", "bnexp.nn", "bnexp.dist"},
    {"bnexp.models", "bnexp.norm"},  # bnexp.norm: the layer under the original contract's import path
    {"bnexp.probes"},
    {"bnexp.engine"},
    {"bnexp.experiments", "bnexp.bench", "bnexp.check"},
    {"bnexp.cli"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every name imported anywhere in the file, as absolute module names (a `from X import y` of a
    submodule y counts as an import of X.y)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _layer_of(module: str) -> tuple[int, str]:
    for i, layer in enumerate(LAYERS):
        for package in sorted(layer, key=len, reverse=True):
            if module == package or (package != "bnexp" and module.startswith(package + ".")):
                return i, package
    raise AssertionError(f"{module} belongs to no layer of this test: add it")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_the_modules_and_their_imports():
    graph = _graph()
    assert {"bnexp.cli", "bnexp.engine.trainer", "bnexp.nn.batchnorm", "bnexp.probes.gap"} <= graph.keys()
    assert "bnexp.engine.session" in graph["bnexp.cli"]  # an import inside a function counts
    assert "bnexp.nn.kernel" in graph["bnexp.nn.batchnorm"]  # `from bnexp.nn import kernel`


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycles_are_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in _graph().items():
        layer, package = _layer_of(module)
        for target in targets:
            t_layer, t_package = _layer_of(target)
            if t_layer > layer or (t_layer == layer and t_package != package and t_package != "bnexp"):
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_only_the_cli_imports_typer():
    users = sorted(name for name, path in MODULES.items()
                   if any(m.split(".")[0] in ("typer", "click") for m in _imports(path)))
    assert users == ["bnexp.cli"]
