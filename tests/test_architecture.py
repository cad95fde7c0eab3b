"""The framework's shape: no import circle inside `sagas`, nothing of the reference project."""

from __future__ import annotations

import ast
from pathlib import Path

SAGAS = Path(__file__).resolve().parent.parent / "sagas"
PROJECT = ("sagaproject", "orders", "payments", "inventory", "shipping", "bench", "tests")


def modules() -> dict[str, Path]:
    found = {}
    for path in SAGAS.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(SAGAS.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, at its top or inside a function, but for imports under
    `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_no_import_circle_in_sagas():
    known = modules()
    graph = {
        name: {
            target
            for target in imports(name, path)
            if target in known and target != name and not name.startswith(f"{target}.")
        }
        for name, path in known.items()
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or reaches(nxt, goal, seen | {nxt}) for nxt in graph[start] - seen)

    circles = sorted(name for name in graph if reaches(name, name, set()))
    assert circles == [], f"modules on an import circle: {circles}"


def test_sagas_imports_nothing_of_the_reference_project():
    for name, path in modules().items():
        bad = {t for t in imports(name, path) if t.split(".")[0] in PROJECT}
        assert not bad, f"{name} imports {bad}"
