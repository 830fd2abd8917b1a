"""Imports run downward (ARCHITECTURE.md): images -> models -> attribution -> analyses ->
pipeline -> outputs -> front ends. Every import in SegXAILib, module-level or inside a
function, is checked with the AST; the CLI is imported by nothing in the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "SegXAILib"

#: layer of each top-level module or sub-package of SegXAILib (lower imports nothing higher)
LAYERS = {
    "__init__": 0, "image": 0, "io": 0, "validation": 0, "progress": 0, "metrics": 0, "sample_data": 0, "phantoms": 0,
    "models": 1,
    "attribution": 2,
    "instances": 3, "topology": 3, "evaluation": 3, "uncertainty": 3, "counterfactual": 3, "qa": 3,
    "pipeline": 4,
    "mrml": 5, "report": 5, "dicom": 5,
    "cli": 6, "demo": 6, "engine": 6, "training": 6, "viewer": 6, "batch": 6,
}
NAMES = {0: "images", 1: "models", 2: "attribution", 3: "analyses", 4: "pipeline", 5: "outputs", 6: "front ends"}


def module_name(path: Path) -> list[str]:
    return list(path.relative_to(ROOT).with_suffix("").parts)


def top(parts: list[str]) -> str:
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> list[tuple[int, list[str]]]:
    """``(line, absolute module parts)`` of every SegXAILib import in ``path``."""
    parts = module_name(path)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:  # from . import x, y: each name may be a module
                    found.extend((node.lineno, target + [alias.name]) for alias in node.names)
                    continue
            else:
                target = (node.module or "").split(".")
            if target and target[0] == "SegXAILib":
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name.split(".")
                if target[0] == "SegXAILib":
                    found.append((node.lineno, target))
    return found


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    unknown = sorted({top(module_name(p)) for p in sources()} - set(LAYERS))
    assert not unknown, f"give these SegXAILib modules a layer in LAYERS: {unknown}"


def test_imports_run_downward():
    violations = []
    for path in sources():
        parts = module_name(path)
        own = LAYERS[top(parts)]
        for line, target in imported_modules(path):
            name = top(target)
            if name not in LAYERS:
                continue  # a name imported from the package root (e.g. __version__)
            if LAYERS[name] > own:
                violations.append(f"{path.relative_to(ROOT)}:{line} ({NAMES[own]}) imports "
                                  f"{'.'.join(target)} ({NAMES[LAYERS[name]]})")
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_the_cli_is_imported_by_no_library_module():
    offenders = [f"{p.relative_to(ROOT)}:{line}" for p in sources() if top(module_name(p)) != "cli"
                 for line, target in imported_modules(p) if top(target) == "cli"]
    assert not offenders, offenders


@pytest.mark.parametrize("source, expected", [
    ("from ..pipeline import run_case\n", ["SegXAILib", "pipeline"]),
    ("from . import steps\n", ["SegXAILib", "topology", "steps"]),
    ("import SegXAILib.cli.main\n", ["SegXAILib", "cli", "main"]),
])
def test_the_checker_resolves_relative_imports(tmp_path, source, expected):
    """The checker itself: relative imports resolve against the module's package."""
    folder = tmp_path / "SegXAILib" / "topology"
    folder.mkdir(parents=True)
    path = folder / "risk.py"
    path.write_text(source, encoding="utf-8")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imported_modules(path)[0][1] == expected
    finally:
        ROOT = saved
