"""Gather the Slicer / CTK / Qt API facts the SegXAI module conformance test checks against.

Writes ``Testing/Data/slicer_api_facts.json`` (sorted keys, deterministic): per Slicer version
(5.8, 5.10, 5.12) what Python can reach of the widget, application and MRML classes the module
uses, the parameterNodeWrapper GUI-connector rules and the ``slicer.*`` Python names.

Sources (read, never copied):

- Slicer: a git mirror of github.com/Slicer/Slicer, tags ``v5.8.0``, ``v5.10.0``, ``v5.12.0``
  (``Libs/MRML/Widgets``, ``Libs/MRML/Core``, ``Base/QTCore``, ``Base/QTGUI``, ``Base/Python/slicer``,
  ``Modules/Loadable/*/MRML``).
- CTK: a git mirror of github.com/commontk/CTK at the exact revision each Slicer tag builds
  (``Slicer_CTK_GIT_TAG`` of the tag's ``SuperBuild/External_CTK.cmake``).
- PythonQt: a git mirror of github.com/commontk/PythonQt at the revision CTK builds
  (``revision_tag`` of CTK's ``CMakeExternals/PythonQt.cmake``); its generated Qt wrappers
  (``generated_cpp_511``, which PythonQt's CMakeLists uses for Qt >= 5.11, hence Qt 5.15) give
  the ordinary public methods Python can call on Qt classes, and ``src/PythonQtStdDecorators.h``
  the methods PythonQt adds to every QObject (``connect``, ``setProperty``...). When a later
  Slicer's PythonQt revision is not in the mirror, the newest revision that is present is used
  and the facts say so (``pythonqt.revision_used`` vs ``pythonqt.revision_wanted``).
- Qt 5.15 headers: Debian's ``qtbase5-dev`` 5.15.8 package (the Qt headers of the 5.15 branch;
  ``apt-get download qtbase5-dev`` and ``dpkg-deb -x``; pass its ``usr/include/<triplet>/qt5``
  folder as ``--qt-include``) for the meta-object side of Qt classes: ``Q_PROPERTY``, public
  slots, signals and ``Q_INVOKABLE`` methods. Slicer 5.8-5.12 build against Qt 5.15
  (``Slicer_REQUIRED_QT_VERSION``), so one Qt section serves all three.

What PythonQt exposes: properties as attributes; slots, signals and Q_INVOKABLE methods as
methods; for Qt classes also the generated wrappers' methods; for CTK and qMRML classes *not*
their ordinary public C++ methods (kept apart as ``cpp_public_methods`` so a test can say why
a name exists in C++ yet fails in Python). VTK-wrapped MRML classes expose their public
methods (``methods``) and enum values (``enums``).

Usage::

    python Utilities/gather_slicer_facts.py [--slicer DIR] [--ctk DIR] [--pythonqt DIR]
        [--qt-include DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from pathlib import Path

VERSIONS = {"5.8": "v5.8.0", "5.10": "v5.10.0", "5.12": "v5.12.0"}
DEFAULT_SLICER = "/work/.mirror/Slicer+Slicer/repo"
DEFAULT_CTK = "/work/.mirror/commontk+CTK/repo"
DEFAULT_PYTHONQT = "/work/.mirror/commontk+PythonQt/repo"
DEFAULT_QT_INCLUDE = "/tmp/qtdeb/root/usr/include/x86_64-linux-gnu/qt5"
QT_SOURCE = "Debian bookworm qtbase5-dev 5.15.8+dfsg-11+deb12u3 (Qt 5.15 headers)"
PYTHONQT_GENERATED = "generated_cpp_511"

#: Qt / CTK / qMRML classes whose facts are gathered (the module's .ui and code, the
#: parameterNodeWrapper connectors' widgets, and the application classes); bases are added
QT_CLASSES = ["QWidget", "QComboBox", "QPushButton", "QTimer", "QSpinBox", "QDoubleSpinBox", "QFormLayout",
              "QVBoxLayout", "QHBoxLayout", "QProgressBar", "QLabel", "QCheckBox", "QLineEdit",
              "QProgressDialog", "QMessageBox", "QSlider", "QTableView", "QTextEdit", "QApplication"]
CTK_CLASSES = ["ctkCollapsibleButton", "ctkPathLineEdit", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider",
               "ctkComboBox", "ctkCheckBox", "ctkCheckablePushButton", "ctkDirectoryButton",
               "ctkColorPickerButton", "ctkRangeWidget", "ctkDoubleRangeSlider", "ctkRangeSlider",
               "ctkPushButton", "ctkBasePopupWidget"]
SLICER_QT_CLASSES = ["qMRMLWidget", "qMRMLNodeComboBox", "qMRMLTableView", "qMRMLSliderWidget", "qMRMLSpinBox",
                     "qMRMLTableModel", "qSlicerApplication", "qSlicerCoreApplication", "qSlicerLayoutManager",
                     "qMRMLLayoutManager", "qMRMLSliceWidget"]
VTK_CLASSES = ["vtkMRMLScene", "vtkMRMLNode", "vtkMRMLSliceCompositeNode", "vtkMRMLInteractionNode",
               "vtkMRMLSelectionNode", "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeNode", "vtkMRMLTableNode",
               "vtkMRMLMarkupsNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLScriptedModuleNode",
               "vtkMRMLApplicationLogic", "vtkSlicerApplicationLogic"]
SLICER_PYTHON_MODULES = {"util": "Base/Python/slicer/util.py", "packaging": "Base/Python/slicer/packaging.py",
                         "ScriptedLoadableModule": "Base/Python/slicer/ScriptedLoadableModule.py"}


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout


def git_show(repo: str, rev: str, path: str) -> str | None:
    result = subprocess.run(["git", "-C", repo, "show", f"{rev}:{path}"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def header_index(repo: str, rev: str) -> dict[str, str]:
    """Header file name -> path in the tree (the first path in sorted order when repeated)."""
    index: dict[str, str] = {}
    for path in sorted(git(repo, "ls-tree", "-r", "--name-only", rev).splitlines()):
        if path.endswith(".h") and "/Testing/" not in path and not path.startswith("Utilities/"):
            index.setdefault(path.rsplit("/", 1)[-1], path)
    return index


# ---- C++ header parsing -----------------------------------------------------------------
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_SKIP_WORDS = {"Q_INVOKABLE", "virtual", "static", "inline", "explicit", "Q_SCRIPTABLE", "constexpr", "friend"}


def _strip(text: str) -> str:
    text = _COMMENT.sub(" ", text)
    return re.sub(r"^\s*#[^\n]*(\\\n[^\n]*)*", " ", text, flags=re.M)  # preprocessor lines


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _class_body(text: str, name: str) -> tuple[str | None, str | None]:
    """(base class, body) of ``class [EXPORT] name : public Base {...}`` (None when absent)."""
    pattern = re.compile(r"\bclass\s+(?:[A-Z0-9_]+\s+)?" + re.escape(name)
                         + r"\b\s*(?:final\s*)?(:\s*[^{;]*)?\{")
    for match in pattern.finditer(text):
        base = None
        if match.group(1):
            bases = re.findall(r"(?:public|protected|private)?\s*([\w:<>]+)", match.group(1)[1:])
            public = re.findall(r"public\s+([\w:]+)", match.group(1))
            base = (public or [b for b in bases if b])[0] if (public or bases) else None
        start = match.end() - 1
        return base, text[start + 1:_matching(text, start, "{", "}") - 1]
    return None, None


_ACCESS = re.compile(r"\b(public|protected|private)\s*(Q_SLOTS|slots)?\s*:(?!:)|\b(Q_SIGNALS|signals)\s*:(?!:)")
_VTK_MACROS = [(re.compile(r"vtkGet\w*Macro\s*\(\s*(\w+)"), ["Get{}"]),
               (re.compile(r"vtkSet\w*Macro\s*\(\s*(\w+)"), ["Set{}"]),
               (re.compile(r"vtkBooleanMacro\s*\(\s*(\w+)"), ["{}On", "{}Off"]),
               (re.compile(r"vtkMRMLCopyContentMacro\s*\(\s*(\w+)"), ["CopyContent", "HasCopyContent"]),
               (re.compile(r"vtkTypeMacro\s*\(\s*(\w+)"), ["SafeDownCast", "IsA", "GetClassName", "NewInstance",
                                                          "IsTypeOf"])]


def parse_class(text: str, name: str) -> dict | None:
    """The public API of class ``name`` in header ``text``.

    Returns a dict with ``base``, ``properties`` ({name: {"read", "write"}}), ``slots``,
    ``signals``, ``invokables``, ``public_methods`` (ordinary public methods, including the
    above), ``enums`` (public enumerators); None when the class is not declared there.
    """
    base, body = _class_body(_strip(text), name)
    if body is None:
        return None
    facts = {"base": base, "properties": {}, "slots": set(), "signals": set(), "invokables": set(),
             "public_methods": set(), "enums": set()}
    for prop in re.finditer(r"Q_PROPERTY\s*\(", body):
        inner = body[prop.end():_matching(body, prop.end() - 1, "(", ")") - 1]
        words = inner.split()
        keys = [i for i, w in enumerate(words) if w in ("READ", "WRITE", "MEMBER", "NOTIFY", "RESET")]
        if not keys:
            continue
        pname = words[keys[0] - 1].lstrip("*&")
        entry = {"read": None, "write": None}
        for i in keys:
            if words[i] in ("READ", "MEMBER") and i + 1 < len(words):
                entry["read"] = words[i + 1]
            if words[i] == "WRITE" and i + 1 < len(words):
                entry["write"] = words[i + 1]
            if words[i] == "MEMBER":
                entry["write"] = words[i + 1]
        facts["properties"][pname] = entry
    section = "private"  # class default
    i, n = 0, len(body)
    statement_start = 0
    while i < n:
        char = body[i]
        access = _ACCESS.match(body, i) if char in "psQ" and (i == 0 or not (body[i - 1].isalnum()
                                                                             or body[i - 1] == "_")) else None
        if access:
            section = "signals" if access.group(3) else (access.group(1) + ("_slots" if access.group(2) else ""))
            i = statement_start = access.end()
            continue
        if char == "(" :
            i = _matching(body, i, "(", ")")
            continue
        if char == "{":
            end = _matching(body, i, "{", "}")
            statement = body[statement_start:i]
            if re.match(r"\s*enum\b", statement) and section.startswith("public"):
                for enumerator in body[i + 1:end - 1].split(","):
                    word = re.match(r"\s*(\w+)", enumerator)
                    if word:
                        facts["enums"].add(word.group(1))
                i = statement_start = end
                continue
            _record(facts, name, section, statement)
            i = statement_start = end
            continue
        if char == ";":
            _record(facts, name, section, body[statement_start:i])
            i = statement_start = i + 1
            continue
        i += 1
    for key in ("slots", "signals", "invokables", "public_methods", "enums"):
        facts[key] = sorted(facts[key])
    return facts


def _record(facts: dict, cls: str, section: str, statement: str) -> None:
    statement = " ".join(statement.split())
    if not statement or not (section.startswith("public") or section == "signals"):
        return
    if section.startswith("public"):
        for pattern, forms in _VTK_MACROS:
            for match in pattern.finditer(statement):
                facts["public_methods"].update(form.format(match.group(1)) for form in forms)
    if re.match(r"((?!Q_INVOKABLE\b)Q_[A-Z_]+|vtk\w*Macro|typedef|using|enum|friend|template\s*<[^>]*>\s*friend)\b",
                statement):
        return
    match = re.search(r"(~?\boperator\b[^(]*|~?\w+)\s*\(", statement)
    if not match:
        return
    fname = match.group(1).strip()
    if fname.startswith("~") or fname == cls or fname.startswith("operator") or re.fullmatch(r"[A-Z0-9_]+", fname):
        return
    if section == "signals":
        facts["signals"].add(fname)
    elif section == "public_slots":
        facts["slots"].add(fname)
        facts["public_methods"].add(fname)
    else:
        if "Q_INVOKABLE" in statement.split(fname)[0]:
            facts["invokables"].add(fname)
        facts["public_methods"].add(fname)


# ---- PythonQt ---------------------------------------------------------------------------
def pythonqt_wrappers(repo: str, rev: str, classes: set[str]) -> dict[str, list[str]]:
    """Qt class -> the methods its generated PythonQt wrapper adds (constructor and destructor left out)."""
    found: dict[str, set[str]] = {}
    files = [p for p in git(repo, "ls-tree", "-r", "--name-only", rev, PYTHONQT_GENERATED).splitlines()
             if p.endswith(".h")]
    for path in files:
        text = git_show(repo, rev, path) or ""
        for match in re.finditer(r"class PythonQtWrapper_(\w+) : public QObject", text):
            cls = match.group(1)
            if cls not in classes:
                continue
            start = text.index("{", match.end())
            body = text[start:_matching(text, start, "{", "}")]
            names = found.setdefault(cls, set())
            for method in re.finditer(r"^\s*[^\n(]*?\b(\w+)\(([^)\n]*)", body, re.M):
                mname, args = method.group(1), method.group(2)
                if mname.startswith(("new_", "delete_")) or mname == cls:
                    continue
                if mname.startswith("static_" + cls + "_"):
                    names.add(mname[len("static_" + cls + "_"):])
                elif f"{cls}* theWrappedObject" in args or f"{cls}*  theWrappedObject" in args:
                    names.add(mname[len("py_q_"):] if mname.startswith("py_q_") else mname)
    return {cls: sorted(names) for cls, names in found.items()}


def pythonqt_qobject_methods(repo: str, rev: str) -> list[str]:
    """What PythonQt adds to every QObject (PythonQtStdDecorators' slots taking the object first)."""
    text = _strip(git_show(repo, rev, "src/PythonQtStdDecorators.h") or "")
    _, body = _class_body(text, "PythonQtStdDecorators")
    names = set()
    for match in re.finditer(r"(\w+)\s*\(\s*QObject\s*\*\s*\w+", body or ""):
        names.add(re.sub(r"^static_QObject_", "", match.group(1)))
    return sorted(names)


# ---- Python sources -----------------------------------------------------------------------
def python_names(text: str | None) -> dict | None:
    """Top-level functions and classes (and module-level names) of a Python source."""
    if text is None:
        return None
    tree = ast.parse(text)
    functions, classes, names = set(), set(), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.add(node.name)
        elif isinstance(node, ast.ClassDef):
            classes.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
    return {"functions": sorted(functions), "classes": sorted(classes), "names": sorted(names)}


def package_exports(repo: str, rev: str, folder: str) -> list[str]:
    """Names ``from <folder> import X`` reaches: the __init__'s star imports (honouring
    ``__all__``, else public top-level names) and its explicit imports."""
    init = git_show(repo, rev, f"{folder}/__init__.py")
    if init is None:
        return []
    exported = set()
    for node in ast.parse(init).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if any(a.name == "*" for a in node.names):
                exported.update(_public_names(git_show(repo, rev, f"{folder}/{node.module}.py") or ""))
            else:
                exported.update(a.asname or a.name for a in node.names)
    return sorted(exported)


def _public_names(text: str) -> set[str]:
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {ast.literal_eval(e) for e in node.value.elts}
    names = python_names(text)
    return {n for n in names["functions"] + names["classes"] + names["names"] if not n.startswith("_")}


def _names_in(node: ast.AST) -> list[str]:
    """Dotted names in a tuple / single expression (``(qt.QSlider, qt.QSpinBox)`` -> [QSlider, QSpinBox])."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    out = []
    for item in items:
        if isinstance(item, ast.Attribute):
            out.append(item.attr)
        elif isinstance(item, ast.Name):
            out.append(item.id)
    return out


def gui_connectors(text: str) -> dict:
    """The GUI-connector rules of a ``guiConnectors.py``: per connector the widget classes and
    Python types it accepts, the widgets that need bounds, whether unbounded numbers reset
    the widget's range, the annotations it requires, and its error messages."""
    connectors = {}
    tree = ast.parse(text)
    for cls in tree.body:
        if not (isinstance(cls, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeGuiConnector")
                or (isinstance(d, ast.Call) and getattr(d.func, "id", "") == "parameterNodeGuiConnector")
                for d in cls.decorator_list)):
            continue
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        widgets, types, exact = [], [], True
        for node in ast.walk(methods["canRepresent"]):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call):
                func = node.left.func
                fname = getattr(func, "id", getattr(func, "attr", ""))
                target = _names_in(node.comparators[0])
                if fname == "type" and getattr(node.left.args[0], "id", "") == "widget":
                    widgets += target
                elif fname == "unannotatedType":
                    types += target
            elif isinstance(node, ast.Call):
                fname = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if fname == "isinstance" and getattr(node.args[0], "id", "") == "widget":
                    widgets += _names_in(node.args[1])
                    exact = False
                elif fname == "issubclass" and isinstance(node.args[0], ast.Call):
                    types += [".".join(filter(None, [getattr(node.args[1].value, "id", None), node.args[1].attr]))
                              if isinstance(node.args[1], ast.Attribute) else _names_in(node.args[1])[0]]
                elif fname == "isNodeOrUnionOfNodes":
                    types.append("vtkMRMLNode")
        bounded, messages, resets, requires = [], [], False, []
        for fname in ("__init__", "create"):
            if fname not in methods:
                continue
            for node in ast.walk(methods[fname]):
                if isinstance(node, ast.If):
                    test_src = ast.unparse(node.test)
                    raises = [r for r in node.body if isinstance(r, ast.Raise)]
                    if "isBounded" in test_src and raises:
                        for sub in ast.walk(node.test):
                            if isinstance(sub, ast.Compare) and isinstance(sub.left, ast.Call):
                                bounded += _names_in(sub.comparators[0])
                            elif isinstance(sub, ast.Call) and getattr(sub.func, "id", "") == "isinstance":
                                bounded += _names_in(sub.args[1])
                    elif raises and re.fullmatch(r"\w+ is None", test_src):
                        var = test_src.split()[0]
                        for assign in ast.walk(methods[fname]):
                            if (isinstance(assign, ast.Assign) and getattr(assign.targets[0], "id", "") == var
                                    and isinstance(assign.value, ast.Call) and assign.value.args[1:]):
                                requires += _names_in(assign.value.args[1])
                elif isinstance(node, ast.Raise) and node.exc is not None:
                    for const in ast.walk(node.exc):
                        if isinstance(const, ast.Constant) and isinstance(const.value, str):
                            messages.append(const.value)
                src = ast.unparse(node) if isinstance(node, (ast.Assign, ast.Expr)) else ""
                if re.search(r"setMinimum\(-|minimum = float\('-inf'\)", src):  # -(2**31) / -inf
                    resets = True
        connectors[cls.name] = {
            "widgets": sorted(set(widgets)), "widget_match": "exact" if exact else "isinstance",
            "types": sorted(set(types)), "bounds_required_for": sorted(set(bounded)),
            "unbounded_resets_range": resets, "requires_annotations": sorted(set(requires)),
            "messages": sorted(set(messages)),
        }
    return connectors


# ---- gathering --------------------------------------------------------------------------
def qt_header_path(include: Path, cls: str) -> Path | None:
    for module in ("QtWidgets", "QtGui", "QtCore"):
        path = include / module / f"{cls.lower()}.h"
        if path.is_file():
            return path
    return None


def gather_qt(include: Path, wrappers: dict[str, list[str]]) -> dict:
    classes, todo = {}, list(QT_CLASSES)
    while todo:
        cls = todo.pop()
        if cls in classes:
            continue
        path = qt_header_path(include, cls)
        if path is None:
            continue
        facts = parse_class(path.read_text(encoding="utf-8", errors="replace"), cls)
        if facts is None:
            continue
        facts["wrapper_methods"] = wrappers.get(cls, [])
        facts["header"] = str(path.relative_to(include))
        classes[cls] = facts
        if facts["base"]:
            todo.append(facts["base"])
    return classes


def gather_version(slicer: str, tag: str, ctk: str, ctk_rev: str, qt_classes: dict) -> dict:
    slicer_headers = header_index(slicer, tag)
    ctk_headers = header_index(ctk, ctk_rev)
    classes, todo = {}, list(SLICER_QT_CLASSES + CTK_CLASSES + VTK_CLASSES)
    while todo:
        cls = todo.pop()
        if cls in classes or cls in qt_classes:
            continue
        for repo, rev, index, origin in ((slicer, tag, slicer_headers, "Slicer"), (ctk, ctk_rev, ctk_headers, "CTK")):
            path = index.get(f"{cls}.h")
            if path is None:
                continue
            facts = parse_class(git_show(repo, rev, path) or "", cls)
            if facts is None:
                continue
            facts["header"] = f"{origin}:{path}"
            facts["kind"] = "vtk" if cls.startswith("vtk") else "qt"
            classes[cls] = facts
            if facts["base"]:
                todo.append(facts["base"])
            break
    connectors_py = git_show(slicer, tag, "Base/Python/slicer/parameterNodeWrapper/guiConnectors.py") or ""
    python = {key: python_names(git_show(slicer, tag, path)) for key, path in SLICER_PYTHON_MODULES.items()}
    validators = python_names(git_show(slicer, tag, "Base/Python/slicer/parameterNodeWrapper/validators.py"))
    return {
        "slicer_tag": tag,
        "slicer_commit": git(slicer, "rev-parse", f"{tag}^{{commit}}").strip(),
        "ctk_revision": ctk_rev,
        "classes": classes,
        "gui_connectors": gui_connectors(connectors_py),
        "parameterNodeWrapper": {"exports": package_exports(slicer, tag, "Base/Python/slicer/parameterNodeWrapper"),
                                 "validators": validators["classes"] if validators else [],
                                 "gui_annotations": sorted(set(python_names(connectors_py)["classes"])
                                                           - set(gui_connectors(connectors_py)) - {"GuiConnector"})},
        "python": python,
        # slicer/__init__.py imports util eagerly; packaging only when imported explicitly
        "python_eager_submodules": sorted(_eager_submodules(git_show(slicer, tag, "Base/Python/slicer/__init__.py"))),
    }


def _eager_submodules(text: str | None) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(text or "")):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or node.module == "slicer"):
            if node.module and node.level == 1:
                found.add(node.module.split(".")[0])
            found.update(a.name for a in node.names if node.level == 1 and not node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("slicer."))
    return found


def ctk_revision(slicer: str, tag: str) -> str:
    text = git_show(slicer, tag, "SuperBuild/External_CTK.cmake") or ""
    match = re.search(r"Slicer_\$\{proj\}_GIT_TAG\s*\"([0-9a-f]{40})\"", text)
    if match is None:
        raise RuntimeError(f"{tag}: no CTK git hash in SuperBuild/External_CTK.cmake")
    return match.group(1)


def pythonqt_revision(ctk: str, rev: str) -> str:
    text = git_show(ctk, rev, "CMakeExternals/PythonQt.cmake") or ""
    return re.findall(r"set\(revision_tag ([0-9a-f]{40})\)", text)[-1]


def has_commit(repo: str, rev: str) -> bool:
    return subprocess.run(["git", "-C", repo, "cat-file", "-e", f"{rev}^{{commit}}"],
                          capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slicer", default=DEFAULT_SLICER)
    parser.add_argument("--ctk", default=DEFAULT_CTK)
    parser.add_argument("--pythonqt", default=DEFAULT_PYTHONQT)
    parser.add_argument("--qt-include", default=DEFAULT_QT_INCLUDE)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "Testing/Data/slicer_api_facts.json"))
    args = parser.parse_args(argv)

    sources, versions = {}, {}
    wanted_pythonqt = {}
    for version, tag in VERSIONS.items():
        ctk_rev = ctk_revision(args.slicer, tag)
        if not has_commit(args.ctk, ctk_rev):
            raise RuntimeError(f"CTK {ctk_rev} (Slicer {tag}) is not in {args.ctk}")
        wanted_pythonqt[version] = pythonqt_revision(args.ctk, ctk_rev)
        sources[version] = {"slicer_tag": tag, "ctk_revision": ctk_rev, "pythonqt_revision_wanted": wanted_pythonqt[version]}
    present = [rev for rev in wanted_pythonqt.values() if has_commit(args.pythonqt, rev)]
    if not present:
        raise RuntimeError(f"none of the PythonQt revisions {sorted(set(wanted_pythonqt.values()))} is in {args.pythonqt}")
    pythonqt_rev = present[-1]
    for version in VERSIONS:
        sources[version]["pythonqt_revision_used"] = pythonqt_rev

    include = Path(args.qt_include)
    all_qt = set(QT_CLASSES)
    wrappers = pythonqt_wrappers(args.pythonqt, pythonqt_rev, all_qt | _qt_bases(include))
    qt_classes = gather_qt(include, wrappers)
    for version, tag in VERSIONS.items():
        versions[version] = gather_version(args.slicer, tag, args.ctk, sources[version]["ctk_revision"], qt_classes)
        versions[version]["pythonqt_revision_used"] = pythonqt_rev
        versions[version]["pythonqt_revision_wanted"] = wanted_pythonqt[version]
    facts = {
        "generator": "Utilities/gather_slicer_facts.py",
        "sources": {"versions": sources, "qt": QT_SOURCE, "pythonqt_generated": PYTHONQT_GENERATED,
                    "slicer_repository": "https://github.com/Slicer/Slicer",
                    "ctk_repository": "https://github.com/commontk/CTK",
                    "pythonqt_repository": "https://github.com/commontk/PythonQt"},
        "qt": {"classes": qt_classes, "pythonqt_qobject_methods": pythonqt_qobject_methods(args.pythonqt, pythonqt_rev)},
        "versions": versions,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(facts, sort_keys=True, indent=0, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {output} ({output.stat().st_size} bytes)")


def _qt_bases(include: Path) -> set[str]:
    """Every Qt class on the base chain of :data:`QT_CLASSES` (for the wrapper lookup)."""
    found, todo = set(), list(QT_CLASSES)
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.add(cls)
        path = qt_header_path(include, cls)
        if path is not None:
            base, _ = _class_body(_strip(path.read_text(encoding="utf-8", errors="replace")), cls)
            if base:
                todo.append(base)
    return found


if __name__ == "__main__":
    main()
