"""The package's layout cannot silently regress: no import circles, commands independent."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "resnext_cli"
COMMANDS = {"train", "predict", "evaluate", "export", "check_data", "cache", "audit"}


def imports_of(path: Path) -> set[str]:
    """Sibling modules a module imports, at its top or inside any function."""
    names = {p.stem for p in PACKAGE.glob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "resnext_cli" and len(parts) > 1:
                found.add(parts[1])
            elif node.module == "resnext_cli":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "resnext_cli" and len(parts) > 1:
                    found.add(parts[1])
    return (found & names) - {path.stem, "__init__"}


def graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_circle_finder_finds_circles():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles():
    circle = find_circle(graph())
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_commands_do_not_import_each_other():
    edges = graph()
    for command in COMMANDS:
        assert not edges[command] & COMMANDS, f"{command} imports {edges[command] & COMMANDS}"
