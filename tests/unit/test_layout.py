"""The package's shape: one import graph without cycles, and no development code in it.

Every import counts, those inside functions and under ``TYPE_CHECKING`` too: an import moved
into a function to dodge a cycle is still a cycle in the design.
"""

from __future__ import annotations

import ast
import graphlib
import os
from pathlib import Path

import saga

PACKAGE = Path(saga.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    paths = [  # workers/ and outbox/ are linked into the package: follow links
        Path(folder, file)
        for folder, _, files in os.walk(PACKAGE, followlinks=True)
        for file in files
        if file.endswith(".py")
    ]
    for path in paths:
        parts = ("saga", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name the file imports, absolute; ``from X import Y`` counts as X.Y."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the saga modules it imports (a package's own parents left out: importing
    ``saga.x`` always runs ``saga/__init__`` first, whoever asks)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        targets = set()
        for name in imported_names(path, module):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    return graph


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    # The package's __init__ re-exports the public API: it imports, nothing imports it.
    graph = {m: {t for t in ts if t != "saga"} for m, ts in graph.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_the_engine_imports_no_development_code() -> None:
    for module, path in modules().items():
        dev = {n for n in imported_names(path, module) if n.split(".")[0] in ("saga_dev", "tests")}
        assert not dev, f"{module} imports {sorted(dev)}: development code stays in saga_dev/"


def test_workers_and_outbox_are_inside_the_package() -> None:
    names = modules()
    assert {"saga.workers.executor", "saga.outbox.relay"} <= set(names)
    assert not any(n.startswith(("workers", "outbox")) for n in names)


def test_the_outbox_depends_on_nothing_else_of_ours() -> None:
    for module, path in modules().items():
        if module.startswith("saga.outbox"):
            ours = {
                n
                for n in imported_names(path, module)
                if n.startswith("saga") and not n.startswith("saga.outbox")
            }
            assert not ours, f"{module} imports {sorted(ours)}"
