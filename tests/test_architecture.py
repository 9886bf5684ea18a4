"""The import rules that import-linter's contracts (``.importlinter``) cannot say.

Every import counts, as ``lint-imports`` counts them: top level, inside functions and under
``TYPE_CHECKING``. No two modules of the project import each other, however indirectly, and
the chain of imports from the console script to the deepest module stays short (a deep chain is
what made every command load the whole project).
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("coordinator", "storage", "workers", "tasks", "options")
MAX_CHAIN_LINKS = 10


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _entry_module() -> str:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return str(scripts["cloud-dump"]).partition(":")[0]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_back(graph: grimp.ImportGraph) -> None:
    assert _cycles(graph) == []


def test_the_longest_import_chain_from_the_console_script_is_short(
    graph: grimp.ImportGraph,
) -> None:
    @functools.cache
    def longest(module: str) -> tuple[str, ...]:
        chains = [longest(m) for m in graph.find_modules_directly_imported_by(module)]
        return (module, *max(chains, key=len, default=()))

    chain = longest(_entry_module())
    assert len(chain) - 1 <= MAX_CHAIN_LINKS, " -> ".join(chain)


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a graph with a cycle is reported."""
    made = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        made.add_module(module)
    made.add_import(importer="a", imported="b")
    made.add_import(importer="b", imported="c")
    made.add_import(importer="c", imported="a")
    assert _cycles(made) == [["a", "b", "c"]]
