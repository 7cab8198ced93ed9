"""The architecture: every module in its layer, imports only downward, no import cycles, a lazy root, tests that mirror.

The module graph is read from the source with :mod:`ast`: every ``import`` and ``from … import``
of a tensorlotr module, the call-time ones inside functions included (those under
``if TYPE_CHECKING:`` are not imports at run time and are left out). Importing
``tensorlotr.a.b`` runs ``tensorlotr/a/__init__.py`` first, so it counts as importing both.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path

import pytest

import tensorlotr as tlr

PACKAGE = Path(tlr.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent

#: The layer folders, bottom first.
LAYERS = ["core", "files", "adapter", "io", "nn", "peft", "jobs", "cli"]
#: The modules at the package root besides ``__init__.py``: at most four.
ROOT_MODULES = {"__main__", "_version", "progress", "report"}
#: What each layer and root module may import: itself and these (``_version`` is a constant anyone may read).
ALLOWED = {
    "core": set(),
    "files": set(),
    "adapter": {"core", "files"},
    "io": {"core", "files", "adapter"},
    "nn": {"core", "files", "adapter", "io", "progress", "report"},
    # LoTR as a PEFT method: PEFT's config, tuner and layer classes over the torch bindings
    "peft": {"core", "files", "adapter", "io", "nn", "progress", "report"},
    "jobs": {"core", "files", "adapter", "io", "nn", "progress", "report"},
    "cli": {"core", "files", "adapter", "io", "nn", "jobs", "progress", "report"},
    "report": set(),
    "progress": set(),
    "_version": set(),
    "__main__": {"cli"},
}
#: The root ``__init__.py`` imports the core eagerly, anything else only when first used.
ROOT_EAGER = {"core", "_version"}
#: Test folders that mirror no package folder: end-to-end runs and hypothesis properties.
TEST_SUITES = {"e2e", "properties"}


@dataclass(frozen=True)
class Import:
    """One import of a tensorlotr module: who imports what, where, and whether at call time."""

    importer: str
    target: str
    line: int
    function: str | None  # the enclosing function of a call-time import, None at module level

    def where(self) -> str:
        return f"{self.importer}:{self.line}" + (f", at call time in {self.function}()," if self.function else "")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    """``tensorlotr.nn.model`` -> ``nn``; ``tensorlotr.report`` -> ``report``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, function: str | None) -> Iterator[tuple[ast.AST, str | None]]:
    """Every node below ``node`` with its enclosing function, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other, function
                yield from _walk(other, function)
            continue
        inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
        yield child, function
        yield from _walk(child, inner)


def _targets(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The tensorlotr modules an import statement loads (a ``from P import m`` of a submodule m loads P.m)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "tensorlotr"]
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        module = ".".join([*base, *(node.module.split(".") if node.module else [])])
    else:
        module = node.module or ""
    if module.split(".")[0] != "tensorlotr":
        return []
    submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES]
    return submodules or [module]


def imports_of(module: str) -> list[Import]:
    """Every tensorlotr module ``module`` imports, with the packages that importing it runs first."""
    path = MODULES[module]
    found = []
    for node, function in _walk(ast.parse(path.read_text(encoding="utf-8")), None):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for target in _targets(module, path.name == "__init__.py", node):
            parts = target.split(".")
            parents = [".".join(parts[:depth]) for depth in range(2, len(parts))]  # tensorlotr.a.b runs tensorlotr.a
            for loaded in [*(p for p in parents if not module.startswith(p + ".")), target]:
                if loaded != module:
                    found.append(Import(module, loaded, node.lineno, function))
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_imported_module_exists():
    """Package code names modules by their own paths, not the old ones that ``MOVED_MODULES`` aliases."""
    missing = [f"{e.where()} imports {e.target}" for edges in GRAPH.values() for e in edges if e.target not in MODULES]
    assert not missing, missing


def test_every_module_sits_in_a_layer_and_the_root_holds_at_most_four():
    root = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert root <= ROOT_MODULES and len(root) <= 4, sorted(root)
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(LAYERS), sorted(folders)
    assert set(ALLOWED) == set(LAYERS) | ROOT_MODULES


@pytest.mark.parametrize("layer", [*LAYERS, *sorted(ROOT_MODULES)])
def test_layers_import_only_downward(layer):
    allowed = ALLOWED[layer] | {layer, "_version"}
    wrong = [
        f"{edge.where()} imports {edge.target} (layer {layer_of(edge.target)})"
        for module, edges in GRAPH.items()
        if module != "tensorlotr" and layer_of(module) == layer
        for edge in edges
        if layer_of(edge.target) not in allowed
        and not any(e.line == edge.line and e.target.startswith(edge.target + ".") for e in edges)  # its package
    ]
    assert not wrong, f"{layer} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def test_the_root_imports_only_the_core_eagerly():
    eager = [edge for edge in GRAPH["tensorlotr"] if edge.function is None]
    wrong = [f"{edge.where()} imports {edge.target}" for edge in eager if layer_of(edge.target) not in ROOT_EAGER]
    assert not wrong, wrong


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph``, each in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component[::-1])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def a_cycle(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """One cycle through the first of ``members`` (a strongly connected component), as a list of modules."""
    start, inside = members[0], set(members)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to start
        node = frontier.pop(0)
        for other in sorted(graph[node] & inside):
            if other == start:
                return [*paths[node], start]
            if other not in paths:
                paths[other] = [*paths[node], other]
                frontier.append(other)
    raise AssertionError(f"{members} is not strongly connected")


def test_strongly_connected_finds_and_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    components = {tuple(sorted(c)) for c in strongly_connected(graph)}
    assert components == {("a", "b", "c"), ("d",), ("e",)}
    assert a_cycle(graph, ["b", "a", "c"]) == ["b", "c", "a", "b"]
    assert a_cycle(graph, ["e"]) == ["e", "e"]


def test_no_import_cycles_between_modules():
    graph = {module: {edge.target for edge in edges if edge.target in MODULES} for module, edges in GRAPH.items()}
    cycles = []
    for component in strongly_connected(graph):
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        cycle = a_cycle(graph, component)
        steps = []
        for importer, target in itertools.pairwise(cycle):
            edge = next(e for e in GRAPH[importer] if e.target == target)
            steps.append(f"  {edge.where()} imports {target}")
        cycles.append(" -> ".join(cycle) + "\n" + "\n".join(steps))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _imported_modules(code: str) -> list[str]:
    return [
        line
        for line in subprocess.run(
            [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if line.startswith(("tensorlotr", "torch"))
    ]


def test_the_math_core_loads_no_torch_bindings_no_jobs_and_no_torch():
    loaded = _imported_modules("import tensorlotr.core")
    assert "tensorlotr.core" in loaded
    assert not [m for m in loaded if m.startswith(("tensorlotr.nn", "tensorlotr.jobs", "torch"))], loaded
    assert not [m for m in _imported_modules("import tensorlotr") if m.startswith(("tensorlotr.nn", "torch"))]


@pytest.mark.parametrize("job", ["tensorlotr.jobs.convert", "tensorlotr.jobs.decompose"])
def test_file_jobs_do_not_import_the_torch_bindings(job):
    loaded = _imported_modules(f"import {job}")
    assert job in loaded
    assert not [m for m in loaded if m == "tensorlotr.nn" or m.startswith("tensorlotr.nn.")], loaded


def test_core_import_graph_is_acyclic_and_self_contained():
    core = Path(tlr.__file__).parent / "core"
    graph: dict[str, set[str]] = {}
    for path in core.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module, f"{path.name} imports from outside the core: {node.module}"
                deps.add(node.module.split(".")[0])
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert not (node.module or "").startswith("tensorlotr"), f"{path.name} imports {node.module}"
        graph[path.stem] = deps
    TopologicalSorter(graph).prepare()  # raises CycleError on a cycle


def test_code_outside_core_uses_its_public_surface():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "core"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core."):
                pytest.fail(f"{path.relative_to(PACKAGE)} imports tensorlotr.{node.module}; use tensorlotr.core")


def test_only_the_adapter_layout_formats_tensor_keys():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "adapter" / "layout.py":
            continue
        text = path.read_text()
        for key in ('f"factors.', 'f"cores.', 'f"modules_to_save.'):
            assert key not in text, f"{path.relative_to(PACKAGE)} formats an adapter key ({key})"


# --- the tests ----------------------------------------------------------------------------------


def test_every_test_folder_mirrors_a_package_folder():
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders - TEST_SUITES <= set(LAYERS), sorted(folders - TEST_SUITES - set(LAYERS))
    assert set(LAYERS) <= folders, sorted(set(LAYERS) - folders)  # every layer has its tests
    for folder in folders:
        assert list((TESTS / folder).glob("test_*.py")), f"tests/{folder} holds no tests"


def test_no_test_file_imports_another():
    """Shared helpers live in tests/builders.py and tests/conftest.py, never in a test file."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [
                f"{path.relative_to(TESTS)}:{node.lineno} imports {n}" for n in names if n.startswith("test_")
            ]
    assert not offenders, offenders
