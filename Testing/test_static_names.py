"""Every name the code reads is defined: pyflakes' undefined-name check over the module, the
library and the tests.

Slicer's Qt layer cannot run here, so a name used only inside the Slicer module's GUI or
self-test code would otherwise fail first in a user's Slicer (it did: the self-test read
``bundled_model_card`` without importing it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pyflakes_checker = pytest.importorskip("pyflakes.checker")
from pyflakes import messages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("SegXAI", "SegXAILib", "Testing", "Utilities")


def _sources() -> list[Path]:
    files: list[Path] = []
    for folder in CHECKED:
        files.extend(sorted((ROOT / folder).rglob("*.py")))
    return [f for f in files if "__pycache__" not in f.parts]


def _undefined(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    checker = pyflakes_checker.Checker(tree, filename=str(path))
    return [f"{path.relative_to(ROOT)}:{m.lineno}: {m.message % m.message_args}"
            for m in checker.messages if isinstance(m, (messages.UndefinedName, messages.UndefinedLocal))]


def test_the_check_finds_an_undefined_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    return os.sep + not_defined_anywhere\n", encoding="utf-8")
    found = _undefined(bad)
    assert len(found) == 1 and "not_defined_anywhere" in found[0] and ":4:" in found[0]


def test_no_undefined_names() -> None:
    sources = _sources()
    assert len(sources) > 100  # the folders were found
    problems = [line for path in sources for line in _undefined(path)]
    assert not problems, "undefined names:\n" + "\n".join(problems)
