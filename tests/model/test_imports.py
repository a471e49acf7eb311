"""model/ has no import circle (module-level imports between its modules, TYPE_CHECKING blocks aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import model

PACKAGE = Path(model.__file__).parent


def _imports(path: Path) -> set[str]:
    """Sibling modules `path` imports at run time (function-level imports included)."""
    deps: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.ImportFrom) and n.level == 1:
                deps.update([n.module.split(".")[0]] if n.module else [a.name for a in n.names])
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("model."):
                deps.add(n.module.split(".")[1])  # type: ignore[union-attr]
    return deps


def test_model_has_no_import_circle() -> None:
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", "import circle: " + " -> ".join([*path, dep])
            if dep in graph and dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "generate" not in graph["chiar"]  # ChiarLM has no generate method: model.generate.generate(model, ...)
