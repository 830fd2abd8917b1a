"""Packaging: the Slicer CMake lists name every Python file and resource; the layout holds."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cmake_list(text: str, variable: str) -> set[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    return {line.strip() for line in match.group(1).splitlines() if line.strip() and not line.strip().startswith("#")}


def test_every_python_file_is_listed():
    listed = cmake_list((ROOT / "SegXAILib" / "CMakeLists.txt").read_text(encoding="utf-8"), "MODULE_PYTHON_SCRIPTS")
    present = {p.relative_to(ROOT / "SegXAILib").as_posix() for p in (ROOT / "SegXAILib").rglob("*.py")}
    assert present - listed == set(), "Python files missing from SegXAILib/CMakeLists.txt"
    assert listed - present == set(), "SegXAILib/CMakeLists.txt lists files that do not exist"


def test_every_resource_is_listed():
    listed = cmake_list((ROOT / "SegXAILib" / "CMakeLists.txt").read_text(encoding="utf-8"), "MODULE_PYTHON_RESOURCES")
    resources = ROOT / "Resources"
    # Catalogue/: the ExtensionsIndex description and screenshots, for the index, never installed
    present = {p.relative_to(resources).as_posix() for p in resources.rglob("*")
               if p.is_file() and p.relative_to(resources).parts[0] != "Catalogue"}
    assert present - listed == set(), "resources missing from SegXAILib/CMakeLists.txt"
    assert listed - present == set(), "SegXAILib/CMakeLists.txt lists resources that do not exist"


def test_extension_metadata():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "project(SegXAI)" in text
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "add_subdirectory(SegXAILib)" in text
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_SUBDIR", (ROOT / "SegXAILib" / "CMakeLists.txt").read_text(encoding="utf-8"), re.S)


def test_top_level_layout():
    for name in ("CMakeLists.txt", "SegXAI", "SegXAILib", "Testing", "Resources", "README.md", "LICENSE",
                 "pyproject.toml", "Makefile", ".ci/run", ".gitignore"):
        assert (ROOT / name).exists(), name
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "torch==2.13.0" in makefile


def test_nothing_in_segxailib_imports_qt_or_slicer_gui():
    forbidden = re.compile(r"^\s*(import|from)\s+(qt|ctk|slicer\.ScriptedLoadableModule)\b", re.M)
    for path in (ROOT / "SegXAILib").rglob("*.py"):
        assert not forbidden.search(path.read_text(encoding="utf-8")), path
