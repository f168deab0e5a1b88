"""The package layout is the architecture: these tests keep it that way.

Imports are read from the source (AST), including imports inside functions: a function-level import
hides a dependency, it does not remove it. Only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "agent"
MAX_LINES = 500
# Files over MAX_LINES that still hold one concept, and why they stay whole.
ONE_CONCEPT: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(AGENT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(AGENT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> set[str]:
    """The agent modules that module `name` imports, anywhere in its body."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def test_no_import_cycle_under_agent() -> None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_nothing_below_the_cli_imports_the_cli() -> None:
    offenders = sorted(
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        if not name.startswith("agent.cli") and name != "agent.__main__"
        for dep in deps
        if dep == "agent.cli" or dep.startswith("agent.cli.")
    )
    assert offenders == []


@pytest.mark.parametrize("side", ["config", "device", "models", "inference", "transport", "service"])
def test_the_device_side_never_imports_the_cloud_side(side: str) -> None:
    offenders = sorted(
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        if name.startswith(f"agent.{side}")
        for dep in deps
        if dep.startswith("agent.cloud")
    )
    assert offenders == []


def test_long_files_hold_one_concept() -> None:
    long = {
        str(p.relative_to(AGENT.parent)): n
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert {k: v for k, v in long.items() if k not in ONE_CONCEPT} == {}


def test_loggers_are_named_from_the_module() -> None:
    named = sorted(str(p.relative_to(AGENT.parent)) for p in MODULES.values() if 'getLogger("' in p.read_text())
    assert named == []


def test_the_architecture_page_names_every_module() -> None:
    page = (AGENT.parent / "docs" / "architecture.md").read_text()
    groups = {p for p in AGENT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    missing = sorted(
        str(p.relative_to(AGENT.parent))
        for p in MODULES.values()
        if p.parent != AGENT and not (p.name == "__init__.py" and p.parent in groups)
        for group in [next(g for g in groups if g in p.parents)]
        if f"`{p.relative_to(group).as_posix()}`" not in page.split(f"## `agent/{group.name}/`")[1].split("\n## ")[0]
    )
    assert missing == [], "docs/architecture.md does not name these modules in their folder's section"
