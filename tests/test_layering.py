"""The layout of engine/ holds: engine never imports nodes or web, engine/diffusion's subpackages
import only those below them in `engine.diffusion.LAYERS`, and no group of modules imports
itself in a cycle (imports under TYPE_CHECKING and inside functions count too)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from engine.diffusion import LAYERS

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
DIFFUSION = "engine.diffusion."


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ENGINE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> Iterator[str]:
    """Every module `path` imports, absolute; `from package import module` names the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def unit(module: str) -> str:
    """The group a module belongs to: its diffusion subpackage, or itself elsewhere in engine."""
    if module.startswith(DIFFUSION):
        return DIFFUSION + module[len(DIFFUSION):].split(".")[0]
    return module


def unit_imports() -> dict[str, set[str]]:
    modules = engine_modules()
    edges: dict[str, set[str]] = {unit(name): set() for name in modules}
    for name, path in modules.items():
        for target in imported_names(path, name):
            if target in modules and unit(target) != unit(name):
                edges[unit(name)].add(unit(target))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)) is not None:
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_every_diffusion_subpackage_has_a_declared_layer() -> None:
    packages = {path.parent.name for path in (ENGINE / "diffusion").glob("*/__init__.py")}
    assert packages == set(LAYERS)


def test_engine_never_imports_nodes_web_or_main() -> None:
    offenders = [f"{name} imports {target}" for name, path in engine_modules().items()
                 for target in imported_names(path, name)
                 if target.split(".")[0] in {"nodes", "web", "main"}]
    assert offenders == []


def test_diffusion_subpackages_import_only_lower_layers() -> None:
    rank = {DIFFUSION + layer: index for index, layer in enumerate(LAYERS)}
    upward = [f"{source} imports {target}" for source, targets in unit_imports().items()
              if source in rank for target in targets
              if target in rank and rank[target] > rank[source]]
    assert upward == []


def test_no_import_cycle_between_engine_modules_or_diffusion_subpackages() -> None:
    assert find_cycle(unit_imports()) is None


def test_the_cycle_finder_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def module_imports() -> dict[str, set[str]]:
    modules = engine_modules()
    return {name: {target for target in imported_names(path, name)
                   if target in modules and target != name and not name.startswith(target + ".")}
            for name, path in modules.items()}


def test_no_import_cycle_between_engine_modules() -> None:
    assert find_cycle(module_imports()) is None
