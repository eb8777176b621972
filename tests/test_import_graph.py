"""The import graph of the project's packages: no cycles, and dependencies point one way.

Every import statement counts, at module level and inside functions (where cycles hide), including
relative imports and `TYPE_CHECKING` blocks. Cycles are checked between modules and between
components (a sub-package such as `engine.skip` is one component, a top-level module such as
`engine.stream` another), so `engine.skip.x -> engine.stream -> engine.skip.y` counts as a cycle too.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "server", "client", "benchmarks", "training", "wire")
# What each library package must never import: the engine knows nothing of its users, the server
# nothing of the clients, and neither carries benchmark or training code; the clients install and
# run without the engine's model stack. `wire`, the WebSocket protocol's vocabulary, is shared by the
# server and the clients (both may import it) and imports no other project package.
FORBIDDEN = {
    "engine": ("server", "client", "benchmarks", "training", "wire"),
    "server": ("client", "benchmarks", "training"),
    "client": ("engine", "server", "benchmarks", "training"),
    "wire": ("engine", "server", "client", "benchmarks", "training"),
}


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> source file for every `.py` file of `packages` under `root`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` (in file `path`) imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from package import submodule` imports the submodule; any other name comes from `source`.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # Third-party names reduce to nothing, a project name that is not a module to its closest module.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                imported.add(target)
    return imported


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    files = module_files(root, packages)
    known = set(files)
    return {module: _imported_names(module, path, known) for module, path in files.items()}


def component(module: str) -> str:
    """The unit of the component-level check: the sub-package or top-level module `module` belongs to."""
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def component_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed to components, edges inside one component dropped."""
    collapsed: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = collapsed.setdefault(component(module), set())
        edges.update(component(target) for target in targets if component(target) != component(module))
    return collapsed


@pytest.fixture(scope="module")
def project_graph() -> dict[str, set[str]]:
    return import_graph(ROOT, PACKAGES)


def test_no_module_imports_itself_through_a_cycle(project_graph):
    assert cycles(project_graph) == []


def test_no_component_cycle(project_graph):
    assert cycles(component_graph(project_graph)) == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_packages_import_only_downwards(project_graph, package):
    wrong = sorted(f"{module} -> {target}" for module, targets in project_graph.items()
                   if module.split(".")[0] == package for target in targets
                   if target.split(".")[0] in FORBIDDEN[package])
    assert wrong == []


def test_the_walk_sees_every_package_and_function_local_imports(project_graph):
    assert {module.split(".")[0] for module in project_graph} == set(PACKAGES)
    assert "engine.skip.rehash" in project_graph["engine.skip"]  # imported inside make_skip_policy


@pytest.mark.parametrize("user", ["server", "client"])
def test_server_and_client_share_the_wire_vocabulary(project_graph, user):
    """Both ends of the WebSocket protocol import its one vocabulary (which the rules above allow)."""
    assert any(target.split(".")[0] == "wire" for module, targets in project_graph.items()
               if module.split(".")[0] == user for target in targets)


def test_wire_needs_only_the_standard_library():
    """The clients install without the model stack: `wire` imports nothing outside the standard library."""
    outside = set()
    for path in sorted((ROOT / "wire").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            outside.update(name for name in names
                           if name.split(".")[0] not in sys.stdlib_module_names and name != "__future__")
    assert outside == set()


def _tree(root: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return import_graph(root, ["pkg"])


PACKAGE = {"pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/sub/c.py": "import json\n"}


def test_imports_resolve_to_modules(tmp_path):
    graph = _tree(tmp_path, {**PACKAGE, "pkg/a.py": "from pkg import sub\nimport pkg.sub.c\n",
                             "pkg/b.py": "from .a import name\nfrom .sub import c\n"})
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.c"} and graph["pkg.b"] == {"pkg.a", "pkg.sub.c"}
    assert cycles(graph) == [] and cycles(component_graph(graph)) == []


def test_a_cycle_through_a_function_local_relative_import_is_found(tmp_path):
    graph = _tree(tmp_path, {**PACKAGE, "pkg/a.py": "from .sub.b import name\n",
                             "pkg/sub/b.py": "def f():\n    from .. import a\n"})
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_a_cycle_between_components_is_found_without_a_module_cycle(tmp_path):
    # pkg.a needs pkg.sub.b, and pkg.sub.c needs pkg.a: the sub-package and pkg.a depend on each other.
    graph = _tree(tmp_path, {**PACKAGE, "pkg/a.py": "from .sub.b import name\n", "pkg/sub/b.py": "",
                             "pkg/sub/c.py": "from ..a import name\n"})
    assert cycles(graph) == []
    assert cycles(component_graph(graph)) == [["pkg.a", "pkg.sub"]]
