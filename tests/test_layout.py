"""The package's shape: no import circles, no lower module importing a higher one, small files.

The import graph is read from the source with ``ast`` (imports inside functions count: a lazy
import is still a dependency), so the test needs no import side effects.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lostlm"

# Layers from the bottom up; a module may import modules of its own layer or lower ones only.
# Subpackages (data/, interop/, bench/) are one node each: their files may import each other.
LAYERS = [
    {"errors"},
    {"runtime", "weights", "registry", "validation", "runlock", "statecodec", "data_config", "presets", "losses", "adamw8bit"},
    {"configs"},
    {"layers"},
    {"methods"},
    {"model"},
    {"convert"},
    {"data", "optim", "reweight", "checkpoint", "costs", "peak", "parallel", "plots", "diagnostics"},
    {"interop", "build"},
    {"loading", "evaluate"},
    {"rundir", "summary", "loggers", "train"},
    {"generate", "export", "estimate", "bench"},
    {"cli", "__main__", "__init__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
MAX_LINES = 450


def node_of(path: Path, package: Path) -> str:
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_nodes(path: Path, package: Path) -> set[str]:
    """The package nodes that ``path`` imports (relative or absolute ``lostlm`` imports)."""
    tree = ast.parse(path.read_text())
    package_parts = path.relative_to(package).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - (node.level - 1)]) if node.level > 1 else list(package_parts)
                parts = base + (node.module.split(".") if node.module else [])
                if parts:
                    found.add(parts[0])
                else:  # "from . import x": x are modules of the package
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "lostlm":
                rest = node.module.split(".")[1:]
                found.update([rest[0]] if rest else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lostlm" and len(parts) > 1:
                    found.add(parts[1])
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        node = node_of(path, package)
        graph.setdefault(node, set()).update(imported_nodes(path, package) - {node})
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(a, b) for a, deps in sorted(graph.items()) for b in sorted(deps) if b in LEVEL and LEVEL[b] > LEVEL[a]]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, stack + [dep])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_every_module_has_a_layer():
    unknown = sorted(set(import_graph()) - set(LEVEL))
    assert not unknown, f"modules missing from LAYERS: {unknown}"


def test_no_module_imports_a_higher_layer():
    upward = upward_imports(import_graph())
    assert not upward, f"imports that point up the layering: {upward}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_source_files_stay_small():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_checker_sees_a_lazy_circle_and_an_upward_import(tmp_path):
    """The checker itself: a two-module circle (one side a lazy import) written to disk."""
    package = tmp_path / "lostlm"
    package.mkdir()
    (package / "errors.py").write_text("from .runtime import x\n")
    (package / "runtime.py").write_text("def f():\n    from lostlm.errors import y\n")
    graph = import_graph(package)
    assert graph == {"errors": {"runtime"}, "runtime": {"errors"}}
    assert find_cycle(graph) == ["errors", "runtime", "errors"]
    assert upward_imports(graph) == [("errors", "runtime")]
