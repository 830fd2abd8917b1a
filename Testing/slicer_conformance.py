"""Check the SegXAI Slicer module's calls against Slicer / CTK / Qt API facts (no Slicer needed).

:func:`check_module` parses the module's Python with :mod:`ast` and its Qt Designer file with
:mod:`xml.etree` and checks, in every Slicer version of ``facts`` (written by
``Utilities/gather_slicer_facts.py``):

- widget calls and attributes (``self.ui.<name>.<attr>``, aliases, lists of widgets and loops
  over them, widgets made in code such as ``qt.QTimer()``): the name must be something PythonQt
  exposes (property, slot, signal, Q_INVOKABLE, PythonQt wrapper method of a Qt class); a
  property must not be called, a method not assigned; ``connect("signal(...)", ...)`` must name a
  signal;
- ``@parameterNodeWrapper`` fields bound to widgets by the .ui's ``SlicerParameterName``: a GUI
  connector accepts the type on that widget, bounds where the connector needs them (or would
  reset the .ui's range), and the bounds agree with the .ui's minimum / maximum;
- ``slicer.*`` names (``slicer.util``, ``slicer.app``, ``slicer.mrmlScene``, ``slicer.packaging``,
  ``from slicer.X import Y``): present in every version unless guarded (``try`` catching
  ImportError / AttributeError, or ``if hasattr(...)``); ``slicer.packaging`` only after an
  explicit ``import slicer.packaging`` / ``from slicer import packaging``.

Receivers it cannot resolve are skipped and listed (:data:`LAST_SKIPPED`).
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

#: what the last :func:`check_module` call could not resolve ("file:line: expression")
LAST_SKIPPED: list[str] = []

#: PythonQt instance-wrapper members every wrapped object has (PythonQtInstanceWrapper.cpp)
PYTHONQT_INSTANCE_MEMBERS = {"className", "help", "delete"}
_GUARD_ERRORS = {"ImportError", "ModuleNotFoundError", "AttributeError"}


@dataclass
class ClassApi:
    """What Python reaches on a class (its bases included) in one Slicer version."""

    found: bool
    properties: dict = field(default_factory=dict)  # name -> {"read", "write"}
    methods: set = field(default_factory=set)  # slots, invokables, wrapper methods (Qt), VTK methods
    signals: set = field(default_factory=set)
    enums: set = field(default_factory=set)
    cpp_only: set = field(default_factory=set)  # public C++ methods PythonQt does not expose
    open_base: str | None = None  # a base the facts do not describe (names there cannot be checked)

    def has(self, name: str) -> bool:
        return name in self.properties or name in self.methods or name in self.signals or name in self.enums


def class_api(facts: dict, version: str, cls: str) -> ClassApi:
    """The merged API of ``cls`` and its bases in ``version``."""
    qt = facts["qt"]["classes"]
    local = facts["versions"][version]["classes"]
    api = ClassApi(found=cls in qt or cls in local)
    current, is_qobject = cls, False
    while current:
        entry = local.get(current) or qt.get(current)
        if entry is None:
            api.open_base = current
            break
        vtk = current.startswith("vtk")
        for name, prop in entry["properties"].items():
            api.properties.setdefault(name, prop)
        api.signals.update(entry["signals"])
        api.methods.update(entry["slots"], entry["invokables"], entry.get("wrapper_methods", []))
        api.enums.update(entry["enums"])
        if vtk:
            api.methods.update(entry["public_methods"])
        else:
            api.cpp_only.update(entry["public_methods"])
        is_qobject = is_qobject or current == "QObject"
        current = entry["base"]
    if is_qobject:
        api.methods.update(facts["qt"]["pythonqt_qobject_methods"], PYTHONQT_INSTANCE_MEMBERS)
    api.cpp_only -= api.methods | set(api.properties) | api.signals
    return api


# ---- the .ui ------------------------------------------------------------------------------
@dataclass
class UiWidget:
    cls: str
    properties: dict  # property name -> text value


def parse_ui(ui_xml: str) -> tuple[dict[str, UiWidget], str | None]:
    """``name -> UiWidget`` of the named widgets, and the root widget's class."""
    root = ET.fromstring(ui_xml)
    widgets = {}
    top = root.find("widget")
    for element in root.iter("widget"):
        name = element.get("name")
        if not name:
            continue
        props = {}
        for prop in element.findall("property"):
            value = next(iter(prop), None)
            props[prop.get("name")] = value.text if value is not None else None
        widgets[name] = UiWidget(element.get("class"), props)
    return widgets, top.get("class") if top is not None else None


# ---- helpers ------------------------------------------------------------------------------
def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def _parents(tree: ast.AST) -> dict:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _guarded(node: ast.AST, parents: dict) -> bool:
    """Inside a ``try`` catching ImportError / AttributeError, or the body of ``if hasattr(...)``."""
    child, current = node, parents.get(node)
    while current is not None:
        if isinstance(current, ast.Try) and child in current.body:
            for handler in current.handlers:
                names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "")
                         for n in ([handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts)
                         if n is not None}
                if names & _GUARD_ERRORS:
                    return True
        if isinstance(current, ast.If) and child in current.body and any(
                isinstance(n, ast.Call) and getattr(n.func, "id", "") == "hasattr" for n in ast.walk(current.test)):
            return True
        child, current = current, parents.get(current)
    return False


def _versions_text(versions: list[str]) -> str:
    return "Slicer " + ", ".join(versions)


# ---- the checker --------------------------------------------------------------------------
class _FileChecker:
    def __init__(self, filename: str, source: str, ui: dict, root_cls: str | None, facts: dict):
        self.filename, self.ui, self.root_cls, self.facts = filename, ui, root_cls, facts
        self.versions = sorted(facts["versions"], key=lambda v: tuple(int(p) for p in v.split(".")))
        self.tree = ast.parse(source)
        self.parents = _parents(self.tree)
        self.violations: list[str] = []
        self.skipped: list[str] = []
        self.packaging_imports = [n.lineno for n in ast.walk(self.tree) if self._imports_packaging(n)]

    # -- resolution --
    @staticmethod
    def _imports_packaging(node: ast.AST) -> bool:
        if isinstance(node, ast.Import):
            return any(a.name == "slicer.packaging" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            return (node.module == "slicer" and any(a.name == "packaging" for a in node.names)) or \
                node.module == "slicer.packaging"
        return False

    def _made_class(self, value: ast.AST) -> str | None:
        """``qt.QTimer()`` / ``ctk.ctkDoubleSpinBox(...)`` / ``slicer.qMRMLX()`` -> the class."""
        if isinstance(value, ast.Call):
            name = _dotted(value.func)
            if name and name.count(".") == 1 and name.split(".")[0] in ("qt", "ctk", "slicer"):
                cls = name.split(".")[1]
                if any(class_api(self.facts, v, cls).found for v in self.versions):
                    return cls
            if name == "slicer.util.loadUI":
                return self.root_cls
        return None

    def resolve(self, node: ast.AST, env: dict) -> list[str] | None:
        """Classes the expression can be (None when unknown)."""
        name = _dotted(node)
        if name is None:
            return None
        if name.startswith("self.ui.") and name.count(".") == 2:
            widget = self.ui.get(name.split(".")[2])
            return [widget.cls] if widget else None
        found = env.get(name)
        return found if isinstance(found, list) else None

    def _element_classes(self, node: ast.AST, env: dict) -> list | None:
        """Classes of the elements of an iterable (a list of widgets, or its alias)."""
        if isinstance(node, (ast.List, ast.Tuple)):
            classes = [self.resolve(e, env) for e in node.elts]
            if classes and all(classes):
                return sorted({c for cs in classes for c in cs})
            return None
        name = _dotted(node)
        found = env.get(f"[]{name}") if name else None
        return found

    def _bind(self, target: ast.AST, classes, env: dict) -> None:
        name = _dotted(target)
        if name is None:
            return
        if classes is None:
            env.pop(name, None)
        else:
            env[name] = classes

    def _for_targets(self, loop: ast.For, env: dict) -> None:
        iterator, target = loop.iter, loop.target
        if isinstance(iterator, ast.Call) and getattr(iterator.func, "id", "") == "enumerate" and \
                isinstance(target, ast.Tuple) and len(target.elts) == 2:
            iterator, target = iterator.args[0], target.elts[1]
        if isinstance(iterator, ast.Call) and getattr(iterator.func, "id", "") == "zip" and \
                isinstance(target, ast.Tuple) and len(target.elts) == len(iterator.args):
            for arg, sub in zip(iterator.args, target.elts):
                self._bind(sub, self._element_classes(arg, env), env)
            return
        if isinstance(target, (ast.Name, ast.Attribute)):
            self._bind(target, self._element_classes(iterator, env), env)

    def _class_env(self, cls: ast.ClassDef) -> dict:
        """``self.X`` aliases made anywhere in the class (widgets made or taken from the .ui)."""
        env: dict = {}
        for node in ast.walk(cls):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                name = _dotted(node.targets[0])
                if not (name and name.startswith("self.")) or name.startswith("self.ui."):
                    continue
                made = self._made_class(node.value) or self.resolve(node.value, {})
                if made:
                    env[name] = [made] if isinstance(made, str) else made
                elements = self._element_classes(node.value, {})
                if elements:
                    env[f"[]{name}"] = elements
        return env

    # -- walking --
    def run(self) -> None:
        self._check_imports()
        for cls in [n for n in self.tree.body if isinstance(n, ast.ClassDef)]:
            class_env = self._class_env(cls)
            for function in [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                self._walk_function(function, dict(class_env))
        for function in [n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            self._walk_function(function, {})

    def _walk_function(self, function: ast.AST, env: dict) -> None:
        # statements in source order: aliases are bound before later uses
        nodes = sorted((n for n in ast.walk(function) if hasattr(n, "lineno")),
                       key=lambda n: (n.lineno, n.col_offset))
        for node in nodes:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                made = self._made_class(node.value)
                classes = [made] if made else self.resolve(node.value, env)
                target = node.targets[0]
                if _dotted(target) and not (_dotted(target) or "").startswith("self.ui."):
                    self._bind(target, classes, env)
                    elements = self._element_classes(node.value, env)
                    if elements:
                        env[f"[]{_dotted(target)}"] = elements
                if isinstance(node.value, ast.Call) and _dotted(node.value.func) == "getattr" and \
                        _dotted(node.value.args[0]) == "slicer" and isinstance(node.value.args[1], ast.Constant):
                    env[_dotted(target) or ""] = f"slicer.{node.value.args[1].value}"
            elif isinstance(node, ast.For):
                self._for_targets(node, env)
            elif isinstance(node, ast.Attribute):
                self._check_attribute(node, env)
            elif isinstance(node, ast.Call):
                self._check_getattr_slicer(node)

    def _where(self, node: ast.AST) -> str:
        return f"{self.filename}:{node.lineno}"

    def _check_attribute(self, node: ast.Attribute, env: dict) -> None:
        parent = self.parents.get(node)
        called = isinstance(parent, ast.Call) and parent.func is node
        stored = isinstance(node.ctx, ast.Store)
        receiver = _dotted(node.value)
        if receiver is None:
            if isinstance(node.value, ast.Call) and any(
                    (_dotted(n) or "").startswith(("slicer.", "self.ui.")) for n in ast.walk(node.value)):
                self.skipped.append(f"{self._where(node)}: {ast.unparse(node)} (receiver is a call's result)")
            return
        alias = env.get(receiver)
        if isinstance(alias, str):  # a variable holding slicer.<submodule> (getattr)
            receiver = alias
        if receiver.startswith("slicer."):
            self._check_slicer(node, receiver, called)
            return
        if receiver == "slicer":
            return
        classes = self.resolve(node.value, env)
        if classes is None:
            if receiver.startswith("self.ui.") and receiver.count(".") == 2:
                self.violations.append(f"{self._where(node)}: {receiver}: no widget named "
                                       f"{receiver.split('.')[2]!r} in the .ui")
            return
        for cls in classes:
            self._check_member(node, cls, node.attr, called, stored)

    def _check_member(self, node: ast.AST, cls: str, name: str, called: bool, stored: bool,
                      label: str | None = None) -> None:
        what = label or f"{ast.unparse(node)}"
        missing, cpp_only, unverifiable, called_property, stored_method, read_only = [], [], [], [], [], []
        for version in self.versions:
            api = class_api(self.facts, version, cls)
            if not api.found:
                unverifiable.append(version)
                continue
            if not api.has(name):
                if api.open_base:
                    unverifiable.append(version)
                elif name in api.cpp_only:
                    cpp_only.append(version)
                else:
                    missing.append(version)
                continue
            is_method = name in api.methods or name in api.signals
            if called and name in api.properties and not is_method:
                called_property.append(version)
            if stored and name not in api.properties:
                stored_method.append(version)
            elif stored and not api.properties[name].get("write"):
                read_only.append(version)
        where = self._where(node)
        if cpp_only:
            self.violations.append(f"{where}: {what}: {cls}.{name} is a public C++ method that PythonQt does not "
                                   f"expose (not a slot or Q_INVOKABLE) in {_versions_text(cpp_only)}")
        if missing:
            self.violations.append(f"{where}: {what}: {cls} has no {name!r} (property, slot, signal or invokable, "
                                   f"bases included) in {_versions_text(missing)}")
        if called_property:
            self.violations.append(f"{where}: {what}: {cls}.{name} is a property (an attribute in PythonQt), "
                                   f"called as a method in {_versions_text(called_property)}")
        if stored_method:
            self.violations.append(f"{where}: {what}: {cls}.{name} is not a property; assigning it does not call "
                                   f"Qt in {_versions_text(stored_method)}")
        if read_only:
            self.violations.append(f"{where}: {what}: {cls}.{name} is a read-only property in "
                                   f"{_versions_text(read_only)}")
        if unverifiable and not (missing or cpp_only):
            self.skipped.append(f"{where}: {what} ({cls}: {name!r} beyond the facts in {', '.join(unverifiable)})")
        # connect("signal(args)", slot): the signal must exist
        parent = self.parents.get(node)
        if name == "connect" and isinstance(parent, ast.Call) and parent.args and \
                isinstance(parent.args[0], ast.Constant) and isinstance(parent.args[0].value, str):
            signal = parent.args[0].value.split("(")[0]
            bad = [v for v in self.versions if (api := class_api(self.facts, v, cls)).found
                   and not api.open_base and signal not in api.signals]
            if bad:
                self.violations.append(f"{where}: {ast.unparse(parent)}: {cls} has no signal {signal!r} in "
                                       f"{_versions_text(bad)}")

    def _check_slicer(self, node: ast.Attribute, receiver: str, called: bool) -> None:
        where, guarded = self._where(node), _guarded(node, self.parents)
        text = f"{receiver}.{node.attr}"
        if receiver == "slicer.util":
            missing = [v for v in self.versions if not self._in_python(v, "util", node.attr)]
        elif receiver == "slicer.packaging":
            missing = [v for v in self.versions if not self._in_python(v, "packaging", node.attr)]
            if not any(line <= node.lineno for line in self.packaging_imports):
                self.violations.append(f"{where}: {text}: slicer.packaging is a submodule that is only an attribute of "
                                       f"slicer after `import slicer.packaging` (none before this line)")
        elif receiver == "slicer.app":
            self._check_member(node, "qSlicerApplication", node.attr, called, isinstance(node.ctx, ast.Store), text)
            return
        elif receiver == "slicer.mrmlScene":
            self._check_member(node, "vtkMRMLScene", node.attr, called, False, text)
            return
        elif receiver.count(".") == 1 and receiver.split(".")[1].startswith(("vtkMRML", "qMRML", "vtkSlicer")):
            self._check_member(node, receiver.split(".")[1], node.attr, called, False, text)
            return
        else:  # slicer.modules and the like: made at run time, not in the sources read
            self.skipped.append(f"{where}: {text} (slicer.{receiver.split('.')[1]} not in the facts)")
            return
        if missing and not guarded:
            self.violations.append(f"{where}: {text}: not in {_versions_text(missing)} and not guarded "
                                   f"(try/except ImportError or AttributeError, or if hasattr(...))")

    def _in_python(self, version: str, module: str, name: str) -> bool:
        names = self.facts["versions"][version]["python"].get(module)
        return bool(names) and name in set(names["functions"]) | set(names["classes"]) | set(names["names"])

    def _check_getattr_slicer(self, node: ast.Call) -> None:
        if _dotted(node.func) == "getattr" and len(node.args) >= 2 and _dotted(node.args[0]) == "slicer" and \
                isinstance(node.args[1], ast.Constant) and node.args[1].value == "packaging" and \
                not any(line <= node.lineno for line in self.packaging_imports):
            self.violations.append(f"{self._where(node)}: {ast.unparse(node)}: slicer.packaging is a submodule; "
                                   f"without `import slicer.packaging` before it this is None (or raises) in "
                                   f"{_versions_text(self.versions)}")

    def _check_imports(self) -> None:
        for node in ast.walk(self.tree):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slicer")):
                continue
            guarded_for_missing = _guarded(node, self.parents)
            for alias in node.names:
                missing = []
                for version in self.versions:
                    v = self.facts["versions"][version]
                    if node.module == "slicer.parameterNodeWrapper":
                        ok = alias.name in v["parameterNodeWrapper"]["exports"]
                    elif node.module in ("slicer.util", "slicer.ScriptedLoadableModule", "slicer.packaging"):
                        ok = self._in_python(version, node.module.split(".")[1], alias.name)
                    elif node.module == "slicer" and alias.name.startswith(("vtkMRML", "qMRML")):
                        ok = alias.name in v["classes"]
                    elif node.module == "slicer" and alias.name == "packaging":
                        ok = v["python"].get("packaging") is not None
                    else:
                        continue
                    if not ok:
                        missing.append(version)
                if missing and not guarded_for_missing:
                    self.violations.append(f"{self._where(node)}: from {node.module} import {alias.name}: not in "
                                           f"{_versions_text(missing)} and not guarded")


# ---- parameter node ↔ .ui -------------------------------------------------------------------
def _annotation(node: ast.AST) -> tuple[str | None, dict]:
    """(base type, {annotation name: args}) of a field annotation."""
    annotations: dict = {}
    if isinstance(node, ast.Subscript) and (_dotted(node.value) or "").split(".")[-1] == "Annotated":
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        for extra in elts[1:]:
            if isinstance(extra, ast.Call):
                try:
                    args = [ast.literal_eval(a) for a in extra.args]
                except ValueError:
                    args = None
                annotations[(_dotted(extra.func) or "").split(".")[-1]] = args
        node = elts[0]
    if isinstance(node, ast.Subscript) and (_dotted(node.value) or "").split(".")[-1] in ("Optional", "Union"):
        inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        names = [(_dotted(n) or "").split(".")[-1] for n in inner if _dotted(n) != "None"]
        node = ast.Name(names[0]) if names else node
    if isinstance(node, ast.BinOp):  # X | None
        node = node.left
    name = (_dotted(node) or "").split(".")[-1] or None
    if name and name.startswith("vtkMRML"):
        name = "vtkMRMLNode"
    return name, annotations


def check_parameter_node(filename: str, source: str, ui: dict, facts: dict) -> list[str]:
    tree = ast.parse(source)
    fields: dict = {}
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef) and any(_dotted(d) and _dotted(d).split(".")[-1] == "parameterNodeWrapper"
                                                 for d in cls.decorator_list):
            for item in cls.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    fields[item.target.id] = item
    if not fields:
        return []
    versions = sorted(facts["versions"], key=lambda v: tuple(int(p) for p in v.split(".")))
    violations = []
    for widget_name, widget in sorted(ui.items()):
        parameter = widget.properties.get("SlicerParameterName")
        if not parameter:
            continue
        item = fields.get(parameter)
        if item is None:
            violations.append(f"{filename}: .ui widget {widget_name} ({widget.cls}) is bound to {parameter!r}, "
                              f"which is not a parameter node field")
            continue
        where = f"{filename}:{item.lineno}"
        kind, annotations = _annotation(item.annotation)
        text = f"{parameter}: {ast.unparse(item.annotation)}"
        no_connector, no_bounds, reset, need = [], {}, [], {}
        for version in versions:
            connectors = facts["versions"][version]["gui_connectors"]
            match = next((c for c in connectors.values() if widget.cls in c["widgets"] and kind in c["types"]), None)
            if match is None:
                no_connector.append(version)
                continue
            for required in match["requires_annotations"]:
                if required not in annotations:
                    need.setdefault(required, []).append(version)
            bounded = "WithinRange" in annotations or ("Minimum" in annotations and "Maximum" in annotations)
            if not bounded and widget.cls in match["bounds_required_for"]:
                message = next((m for m in match["messages"] if "unbounded" in m), "unbounded")
                no_bounds.setdefault(message, []).append(version)
            elif not bounded and match["unbounded_resets_range"]:
                reset.append(version)
        if no_connector:
            violations.append(f"{where}: {text}: no GUI connector accepts {kind} on {widget.cls} ({widget_name}) in "
                              f"{_versions_text(no_connector)}")
        for message, vs in no_bounds.items():
            violations.append(f"{where}: {text}: bound to {widget.cls} {widget_name} without bounds: connectGui "
                              f"raises {message!r} in {_versions_text(vs)}; use Annotated[{kind}, WithinRange(a, b)]")
        if reset:
            violations.append(f"{where}: {text}: bound to {widget.cls} {widget_name} without bounds: connectGui "
                              f"resets its range to the full {kind} range, discarding the .ui's minimum/maximum, in "
                              f"{_versions_text(reset)}; use Annotated[{kind}, WithinRange(a, b)]")
        for required, vs in need.items():
            violations.append(f"{where}: {text}: {widget.cls} {widget_name} needs the {required} annotation in "
                              f"{_versions_text(vs)}")
        low, high = None, None
        if annotations.get("WithinRange"):
            low, high = annotations["WithinRange"][:2]
        if annotations.get("Minimum"):
            low = annotations["Minimum"][0]
        if annotations.get("Maximum"):
            high = annotations["Maximum"][0]
        for bound, prop in ((low, "minimum"), (high, "maximum")):
            shown = widget.properties.get(prop)
            if bound is not None and shown is not None and float(shown) != float(bound):
                violations.append(f"{where}: {text}: {prop} {bound} differs from the .ui's {widget_name} "
                                  f"{prop} {shown}")
    return violations


def check_module(sources: dict[str, str], ui_xml: str, facts: dict) -> list[str]:
    """Violations of the module's ``sources`` (file name -> Python text) and its .ui against ``facts``.

    Each names file:line, the call and the Slicer versions it fails in. Unresolved receivers
    are put in :data:`LAST_SKIPPED`.
    """
    ui, root_cls = parse_ui(ui_xml)
    violations, skipped = [], []
    for filename, source in sorted(sources.items()):
        checker = _FileChecker(filename, source, ui, root_cls, facts)
        checker.run()
        violations += checker.violations
        skipped += checker.skipped
        violations += check_parameter_node(filename, source, ui, facts)
    LAST_SKIPPED[:] = sorted(set(skipped))
    return sorted(set(violations), key=lambda v: (v.split(":")[0], int(v.split(":")[1]) if v.split(":")[1].isdigit()
                                                  else 0, v))
