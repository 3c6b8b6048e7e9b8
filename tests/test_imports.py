"""rise_ray's modules import one another without cycles, counting imports inside functions too
(a lazy import hides a cycle from Python, not from a reader), and keep to the layers of DESIGN.md:
the import-linter contracts in pyproject.toml, checked with `lint-imports`."""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "rise_ray")


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for root, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rise_ray"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                graph[mod] |= subs
                if len(subs) < len(node.names) and node.module in mods:  # names from the module itself
                    graph[mod].add(node.module)
            elif isinstance(node, ast.Import):
                graph[mod] |= {a.name for a in node.names} & mods.keys()
    return graph


def cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    assert cycle_from(import_graph()) is None, " -> ".join(cycle_from(import_graph()) or [])


def test_the_cycle_finder_finds_one():
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_from({"a": {"b"}, "b": set()}) is None


def test_lint_imports_keeps_the_layers(monkeypatch, capsys):
    """`lint-imports` on pyproject.toml's contracts: the layers (a module imports only from its own
    layer or below; every module of rise_ray is in one) and no cycle between rise_ray's packages."""
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is not installed (pip install -e '.[dev]')")
    monkeypatch.syspath_prepend(REPO)  # this checkout's rise_ray, not an installed one
    monkeypatch.chdir(REPO)
    code = cli.lint_imports(config_filename=os.path.join(REPO, "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 kept, 0 broken" in out, out
