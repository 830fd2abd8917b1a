"""The method registry: name -> method class, with each method's parameters.

Front ends (``segxai methods``, ``segxai explain --param``, the Slicer method list) build
their options from :func:`method_specs`; nothing else needs to know the classes.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..image import SegXAIInputError
from .base import Attribution, Parameter

__all__ = ["available_methods", "get_method", "method_specs", "parse_params"]

#: modules whose Attribution subclasses (with a ``name``) form the registry
_METHOD_MODULES = ("gradient", "guided", "cam", "perturbation", "shap", "patterns", "lrp")


def _registry() -> dict[str, type[Attribution]]:
    methods: dict[str, type[Attribution]] = {}
    for module_name in _METHOD_MODULES:
        module = importlib.import_module(f"{__package__}.{module_name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Attribution) and value.name:
                methods[value.name] = value
    return dict(sorted(methods.items()))


def available_methods() -> list[str]:
    return list(_registry())


def get_method(name: str) -> type[Attribution]:
    methods = _registry()
    if name not in methods:
        raise SegXAIInputError(f"--method {name!r}: unknown; available: {', '.join(methods)}")
    return methods[name]


def method_specs() -> list[dict[str, Any]]:
    """One JSON-ready description per method: name, summary, stochastic, parameters."""
    return [
        {
            "name": name,
            "summary": cls.summary,
            "stochastic": cls.stochastic,
            "parameters": [
                {"name": p.name, "kind": p.kind, "default": p.default, "help": p.help, "minimum": p.minimum,
                 "maximum": p.maximum, "choices": list(p.choices)}
                for p in cls.parameters
            ],
        }
        for name, cls in _registry().items()
    ]


def parse_params(method: str, pairs: list[str]) -> dict[str, Any]:
    """``["n_samples=10", "noise_level=0.2"]`` -> typed, checked keyword arguments of ``method``."""
    parameters: dict[str, Parameter] = {p.name: p for p in get_method(method).parameters}
    values: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SegXAIInputError(f"--param {pair!r}: expected NAME=VALUE")
        key, text = pair.split("=", 1)
        if key not in parameters:
            raise SegXAIInputError(f"--param {key!r}: {method} takes {', '.join(parameters) or 'no parameters'}")
        values[key] = parameters[key].parse(text)
    return values
