"""Which modules of a package import which, read with ``ast`` (for the tests that keep packages free of import cycles)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path


def package_imports(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, anywhere in its body (also in functions and under
    ``TYPE_CHECKING``), read with ``ast``; a name taken from the package resolves to the module that exports
    it (the package's lazy ``_EXPORTS``), or to the submodule of that name.

    Parameters
    ----------
    package
        A dotted package name, e.g. ``"neuroprobe.recording"``.

    Returns
    -------
    dict
        Short module name (``"recorder"``) -> short names of the package's modules it imports (itself excluded).
    """
    pkg = importlib.import_module(package)
    folder = Path(pkg.__file__).parent
    exports = {name: where.split(":")[0] for name, where in getattr(pkg, "_EXPORTS", {}).items()}
    prefix = package.split(".")
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in sorted(modules):
        tree = ast.parse((folder / f"{name}.py").read_text())
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or node.level):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    base = ".".join(prefix[: len(prefix) - node.level + 1] + ([base] if base else []))
                targets = [base]
                if base == package:
                    targets = [exports.get(a.name, f"{package}.{a.name}") for a in node.names]
            else:
                continue
            for t in targets:
                parts = t.split(".")
                if parts[: len(prefix)] == prefix and len(parts) > len(prefix) and parts[len(prefix)] in modules:
                    deps.add(parts[len(prefix)])
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        state[u] = 2
        path.pop()
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None
