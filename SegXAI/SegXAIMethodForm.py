"""SegXAIMethodForm: the attribution method's parameter form of the SegXAI panel.

Built from the registry's description of each method (``SegXAILib.attribution.method_specs()``):
one editor per parameter, chosen by the parameter's kind. The Qt layer is thin:
:func:`editorSpec` says which widget to make and which property values to give it and
:func:`editorValue` reads an editor back (both Qt-free, checked headless);
:class:`MethodForm` makes the widgets inside Slicer.
"""

import json
import math
from typing import Any, Optional

#: Qt's QSpinBox range (a C int)
INT_RANGE = (-(2**31), 2**31 - 1)
#: ctkDoubleSpinBox's range when the parameter has no bound
FLOAT_RANGE = (-1e9, 1e9)


def methodSpecs() -> dict:
    """Method name -> its spec (:func:`SegXAILib.attribution.method_specs`); empty while
    SegXAILib's dependencies are not installed yet."""
    try:
        from SegXAILib.attribution import method_specs
    except ImportError:
        return {}
    return {spec["name"]: spec for spec in method_specs()}


def savedParameters(text: str) -> dict:
    """The parameters saved in the parameter node (JSON); ``{}`` when unreadable."""
    try:
        saved = json.loads(text or "{}")
    except ValueError:
        return {}
    return saved if isinstance(saved, dict) else {}


def floatDecimals(*values: Optional[float]) -> int:
    """Decimals a float editor needs to show each value with three significant digits (at
    least 4): with 4 decimals LRP's ``epsilon = 1e-6`` would be shown, and sent, as 0."""
    decimals = 4
    for value in values:
        if value is not None and value != 0 and math.isfinite(value):
            decimals = max(decimals, 2 - math.floor(math.log10(abs(value))))
    return min(decimals, 15)


def _initial(parameter: dict, value: Any, convert) -> Any:
    """``value`` converted to the editor's type; the default when it cannot be."""
    for candidate in (value, parameter["default"]):
        try:
            return convert(candidate)
        except (TypeError, ValueError):
            continue
    return convert(0)


def editorSpec(parameter: dict, value: Any) -> Optional[tuple]:
    """``(className, items, properties)`` of the editor of one parameter showing ``value``.

    ``className``: ``QSpinBox`` (int), ``ctkDoubleSpinBox`` (float), ``QCheckBox`` (bool),
    ``QComboBox`` (choice; ``items`` its entries) or ``QLineEdit`` (text). ``properties`` in the
    order to set them (the range before the value). None for parameters the panel cannot
    edit (tensors, lists: the Python console only).
    """
    kind = parameter["kind"]
    low, high = parameter.get("minimum"), parameter.get("maximum")
    if kind == "int":
        properties = {"minimum": int(low) if low is not None else INT_RANGE[0],
                      "maximum": int(high) if high is not None else INT_RANGE[1],
                      "value": _initial(parameter, value, int)}
        return "QSpinBox", [], properties
    if kind == "float":
        shown = _initial(parameter, value, float)
        properties = {"decimals": floatDecimals(shown, parameter["default"], low, high),
                      "minimum": float(low) if low is not None else FLOAT_RANGE[0],
                      "maximum": float(high) if high is not None else FLOAT_RANGE[1],
                      "value": shown}
        return "ctkDoubleSpinBox", [], properties
    if kind == "bool":
        return "QCheckBox", [], {"checked": bool(value)}
    if kind == "choice":
        return "QComboBox", [str(choice) for choice in parameter["choices"]], {"currentText": str(value)}
    if value is not None and not isinstance(value, str):
        return None
    return "QLineEdit", [], {"text": value or ""}


def editorValue(parameter: dict, editor) -> tuple:
    """``(given, value)`` of an editor made from :func:`editorSpec`: an empty text field is
    not given (the method's default applies)."""
    kind = parameter["kind"]
    if kind == "int":
        return True, int(editor.value)
    if kind == "float":
        return True, float(editor.value)
    if kind == "bool":
        return True, bool(editor.checked)
    if kind == "choice":
        return True, str(editor.currentText)
    return bool(editor.text), str(editor.text)


class MethodForm:
    """The parameter editors of one method in a form layout on ``frame`` (Slicer only)."""

    def __init__(self, frame) -> None:
        import qt

        self.layout = qt.QFormLayout(frame)
        self.editors = {}  # parameter name -> (parameter spec, editor)

    def clear(self) -> None:
        while self.layout.count():
            item = self.layout.takeAt(0)
            if item.widget():
                item.widget().deleteLater()
        self.editors = {}

    def build(self, spec: Optional[dict], saved: dict) -> None:
        """One editor per parameter of ``spec`` showing its ``saved`` value (else its default)."""
        import ctk
        import qt

        self.clear()
        if spec is None:
            return
        for parameter in spec["parameters"]:
            made = editorSpec(parameter, saved.get(parameter["name"], parameter["default"]))
            if made is None:
                continue
            className, items, properties = made
            editor = getattr(ctk if className.startswith("ctk") else qt, className)()
            for item in items:
                editor.addItem(item)
            for name, value in properties.items():
                setattr(editor, name, value)
            editor.toolTip = parameter["help"]
            self.layout.addRow(parameter["name"], editor)
            self.editors[parameter["name"]] = (parameter, editor)

    def values(self) -> dict:
        """Parameter name -> value of the editors (empty text fields left out)."""
        values = {}
        for name, (parameter, editor) in self.editors.items():
            given, value = editorValue(parameter, editor)
            if given:
                values[name] = value
        return values
