"""The package's structure: no import cycle anywhere in dvgt/.

The import graph is read from the source (ast), not by importing it: every `import` and `from ... import`
counts, at module level and inside functions (a lazy import inside a function is how a cycle hides), except
those under `if TYPE_CHECKING:`, which never run. Importing `a.b.c` also runs the packages `a` and `a.b`
(their __init__), so those count too, except the packages the importing module is itself inside (already
running when it is imported)."""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dvgt"

Edges = dict[str, dict[str, str]]  # module -> {imported module: "file:line" of the first such import}


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the package (a package is its __init__)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load (a `from x import y` may load the module x.y)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(package: Path) -> Edges:
    modules = module_files(package)

    def known(name: str) -> str | None:
        """The module of the package that `name` is, or is inside of (None: outside the package)."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: Edges = {}
    for module, path in modules.items():
        edges: dict[str, str] = {}
        is_package = path.name == "__init__.py"
        pending: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
        while pending:
            node = pending.pop()
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                pending.extend(node.orelse)
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                for name in _imported_names(node, module, is_package):
                    target = known(name)
                    if target is None:
                        continue
                    parts = target.split(".")
                    loaded = [".".join(parts[:i]) for i in range(1, len(parts))] + [target]
                    for imported in loaded:
                        if imported != module and not module.startswith(imported + "."):
                            edges.setdefault(imported, f"{path.relative_to(package.parent)}:{node.lineno}")
            pending.extend(ast.iter_child_nodes(node))
        graph[module] = edges
    return graph


def strongly_connected(graph: Edges) -> list[list[str]]:
    """The components of more than one module, or of one that imports itself (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(components)


def one_cycle(graph: Edges, component: list[str]) -> list[str]:
    """A shortest import cycle through the component's first module: [a, b, ..., a]."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for target in sorted(graph[module]):
            if target not in members:
                continue
            if target == start:
                path = [module]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if target not in came_from:
                came_from[target] = module
                queue.append(target)
    raise AssertionError(f"{component} is not a cycle")


def describe(graph: Edges, cycle: list[str]) -> str:
    steps = [cycle[0]] + [f"{b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps)


def cycles(package: Path) -> list[str]:
    graph = import_graph(package)
    return [describe(graph, one_cycle(graph, component)) for component in strongly_connected(graph)]


def test_no_import_cycle_in_dvgt():
    found = cycles(PACKAGE)
    assert not found, "import cycles in dvgt/ (move the shared code down into a module both can import):\n" + (
        "\n".join(found)
    )


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_the_cycle_finder_sees_lazy_relative_and_package_imports_and_skips_type_checking(tmp_path):
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg.b import f\n",
            "b.py": "def f():\n    from . import a  # a lazy import: still a cycle\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import D\nelse:\n    import os\n",
            "d.py": "import pkg.c\n",  # c -> d only for the type checker: no cycle
            "sub/__init__.py": "from pkg.sub.inner import g\n",  # a package re-exporting its own module: no cycle
            "sub/inner.py": "from pkg.sub import helpers\ndef g(): ...\n",
            "sub/helpers.py": "from ..e import h\n",
            "sub/other.py": "",
            "e.py": "def h():\n    from pkg.sub.other import x\n",  # runs pkg/sub/__init__ -> inner -> helpers -> e
        },
    )
    graph = import_graph(package)
    assert graph["pkg.c"] == {}
    assert graph["pkg.e"] == {"pkg.sub": "pkg/e.py:2", "pkg.sub.other": "pkg/e.py:2"}
    assert strongly_connected(graph) == [
        ["pkg.a", "pkg.b"],
        ["pkg.e", "pkg.sub", "pkg.sub.helpers", "pkg.sub.inner"],
    ]
    assert cycles(package) == [
        "pkg.a -> pkg.b (pkg/a.py:1) -> pkg.a (pkg/b.py:2)",
        "pkg.e -> pkg.sub (pkg/e.py:2) -> pkg.sub.inner (pkg/sub/__init__.py:1) -> pkg.sub.helpers "
        "(pkg/sub/inner.py:1) -> pkg.e (pkg/sub/helpers.py:1)",
    ]
