"""docs/ARCHITECTURE.md's package table is the tree (issue 21): every module of every package is listed
under its package, nothing listed is missing, and each package's `->` names exactly the other packages
it imports (any import, at module or function level)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "training", "server", "experiments", "bench", "loadtests", "reliability")
PROJECT = {*PACKAGES, "tests", "deploy"}


def documented() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(modules, arrows) per package, from the first code block of "Packages and dependency direction"."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text[text.index("## Packages and dependency direction"):]
    block = section.split("```")[1]
    modules: dict[str, set[str]] = {}
    arrows: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        header = re.match(r"^(\w+)/\s+(?:->\s+([\w, ]+?)\s*$)?", line)
        if header:
            package = header.group(1)
            modules[package] = set()
            arrows[package] = {dep.strip() for dep in (header.group(2) or "").split(",") if dep.strip()}
        elif package and (entry := re.match(r"^  (\S+\.py)\s", line)):
            modules[package].add(entry.group(1))
    return modules, arrows


def imported_packages(package: str) -> set[str]:
    deps: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            deps.update(name.split(".")[0] for name in names)
    return (deps & PROJECT) - {package}


def test_the_package_table_lists_every_module() -> None:
    modules, _ = documented()
    for package in PACKAGES:
        files = {str(p.relative_to(REPO / package)) for p in (REPO / package).rglob("*.py")}
        assert modules.get(package) == files, (package, "listed, not in the tree:", modules.get(package, set()) - files,
                                               "in the tree, not listed:", files - modules.get(package, set()))


def test_the_package_arrows_are_the_imports() -> None:
    _, arrows = documented()
    for package in PACKAGES:
        assert arrows[package] == imported_packages(package), package
