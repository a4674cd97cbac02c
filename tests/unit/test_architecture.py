"""The house is checked, not hoped for: no import cycles anywhere in ``tuner``, nothing in the
package root but shared basics, and no module over 400 lines without a reason in its docstring.
The layers themselves are import-linter's contract in pyproject.toml (``make lint``)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

TUNER = Path(__file__).resolve().parents[2] / "tuner"
SHARED_BASICS = {"__init__", "__main__", "errors", "files", "tiny"}
MAX_LINES = 400


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("tuner")
    # A package imports its own __init__ implicitly; only module-to-module edges count.
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycles(graph) == [["a.x", "a.y", "a.z"]]


def test_package_root_holds_only_shared_basics() -> None:
    modules = {p.stem for p in TUNER.glob("*.py")}
    assert modules <= SHARED_BASICS, sorted(modules - SHARED_BASICS)


def test_every_stage_is_a_package_with_a_docstring() -> None:
    for folder in sorted(p for p in TUNER.iterdir() if p.is_dir() and p.name != "data"):
        if folder.name == "__pycache__":
            continue
        init = folder / "__init__.py"
        assert init.is_file(), folder.name
        assert ast.get_docstring(ast.parse(init.read_text())), f"{folder.name}/__init__.py"


def test_long_modules_say_why() -> None:
    long = []
    for path in sorted(TUNER.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "over 400 lines" not in doc:
            long.append(str(path.relative_to(TUNER)))
    assert long == []
