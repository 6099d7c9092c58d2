"""The package's layout cannot silently regress: subpackages in the order data flows, imports
only downwards (commands -> outputs -> model -> data -> top-level helpers), no import circles,
commands independent of each other, and short functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "resnext_cli"
HELPERS = {"config", "errors", "files", "ui"}  # the top-level helpers every layer may use
TOP_LEVEL = HELPERS | {"__init__", "__main__", "cli"}
# lower may never import higher; within a layer anything goes (circles aside)
LAYERS = {"helpers": 0, "data": 1, "model": 2, "outputs": 3, "commands": 4, "cli": 5}
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted names inside the package ("data.folders", "cli") -> files."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = path
    return found


def layer(module: str) -> int:
    head = module.split(".")[0]
    if head in ("cli", "__main__"):
        return LAYERS["cli"]
    if "." not in module:
        return LAYERS["helpers"]
    return LAYERS[head]


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Package modules a module imports, at its top or inside any function."""
    found: set[str] = set()

    def add(dotted: str, names: list[str]) -> None:
        inner = dotted[len("resnext_cli") :].lstrip(".")
        for name in names:  # `from resnext_cli.model import checkpoint`: a module by name
            candidate = f"{inner}.{name}" if inner else name
            if candidate in known:
                found.add(candidate)
        if inner in known:
            found.add(inner)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resnext_cli"):
            add(node.module, [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("resnext_cli."):
                    add(alias.name, [])
    own = ".".join(path.relative_to(PACKAGE).with_suffix("").parts) if PACKAGE in path.parents else ""
    return found - {own, "__init__"}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) for name, path in mods.items()}


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


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a module in a higher layer, as 'importer -> imported'."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in edges.items()
        for target in targets
        if layer(target) > layer(module)
    )


def test_the_checkers_find_circles_and_upward_imports():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    edges = {"data.loaders": {"model.device", "errors"}, "commands.train": {"data.loaders"},
             "config": {"model.archs"}}  # fmt: skip
    assert upward_imports(edges) == ["config -> model.archs", "data.loaders -> model.device"]


def test_the_import_finder_sees_every_spelling(tmp_path: Path):
    source = tmp_path / "x.py"
    source.write_text(
        "from resnext_cli.model import checkpoint as ckpt\nfrom resnext_cli import ui\n"
        "import resnext_cli.data.images\n"
        "def f():\n    from resnext_cli.outputs.plots import write_png\n"
    )
    known = {"model.checkpoint", "ui", "data.images", "outputs.plots", "model"}
    assert imports_of(source, known) == {"model.checkpoint", "ui", "data.images", "outputs.plots",
                                         "model"}  # fmt: skip


def test_only_the_helpers_and_the_cli_live_at_the_top():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= TOP_LEVEL, f"move {sorted(top - TOP_LEVEL)} into a subpackage"
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subpackages == {"data", "model", "outputs", "commands"}


def test_each_subpackage_says_what_it_holds_and_may_import():
    for name in ("data", "model", "outputs", "commands"):
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 2 and "import" in doc.splitlines()[1], name


def test_no_import_circles():
    circle = find_circle(graph())
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_imports_only_go_downwards():
    assert upward_imports(graph()) == []


def test_commands_do_not_import_each_other():
    edges = graph()
    commands = {m for m in edges if m.startswith("commands.") and m != "commands.__init__"}
    for command in commands:
        assert not edges[command] & commands, f"{command} imports {edges[command] & commands}"


def test_no_function_is_long():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
