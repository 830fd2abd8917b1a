"""The method registry: name -> method class, with each method's parameters.

Front ends (``segxai methods``, ``segxai explain --param``, the Slicer method list) build
their options from :func:`method_specs`; nothing else needs to know the classes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ..image import SegXAIInputError
from .base import Attribution, Parameter

__all__ = ["available_methods", "get_method", "method_specs", "check_params", "parse_params", "ADDED_PARAMETERS",
           "recorded_params"]

#: parameters added after cohorts and risk models began recording their methods' parameters:
#: name -> (the methods that have it, the value that reproduces what those methods did before)
ADDED_PARAMETERS: dict[str, tuple[tuple[str, ...], Any]] = {
    # CAM weights pooled over the sliding windows (issue 21); before, each window had its own
    "weights": (("gradcam", "gradcam_plusplus", "guided_gradcam", "guided_gradcam_plusplus"), "per_window"),
}

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
        raise SegXAIInputError(f"method {name!r}: unknown; available: {', '.join(methods)}")
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


def check_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` checked against ``method``'s :class:`~SegXAILib.attribution.base.Parameter` s:
    the keyword arguments its ``attribute`` takes, typed.

    Every key must name a parameter of the method (a parameter dict meant for something else,
    e.g. a whole provenance record, is refused rather than silently dropped). Values go
    through :meth:`Parameter.check`: JSON numbers and text are coerced to the parameter's
    type, ranges and choices are checked; objects a parameter declares (tensors, images) are
    passed on for the method to check.

    Parameters
    ----------
    method : str
        A registry name (:func:`available_methods`).
    params : Mapping[str, Any]
        Parameter name -> value.

    Returns
    -------
    dict
        The checked values, in the order given.

    Raises
    ------
    SegXAIInputError
        An unknown method, a key the method does not take (the message lists those it
        takes), or a value of the wrong type or out of range.
    """
    parameters: dict[str, Parameter] = {p.name: p for p in get_method(method).parameters}
    if not isinstance(params, Mapping):
        raise SegXAIInputError(f"params of method {method!r}: expected a mapping of parameter names to values, "
                               f"got {type(params).__name__}")
    unknown = [key for key in params if key not in parameters]
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        takes = ", ".join(parameters) or "no parameters"
        plural = "s" if len(unknown) > 1 else ""
        raise SegXAIInputError(f"method {method!r} has no parameter{plural} {names}; it takes {takes}")
    values: dict[str, Any] = {}
    for key, value in params.items():
        try:
            values[key] = parameters[key].check(value)
        except SegXAIInputError as error:
            raise SegXAIInputError(f"method {method!r}: {error}") from None
    return values


def parse_params(method: str, pairs: list[str]) -> dict[str, Any]:
    """``["n_samples=10", "noise_level=0.2"]`` -> typed, checked keyword arguments of ``method``
    (:func:`check_params`; a name given twice keeps its last value)."""
    texts: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SegXAIInputError(f"params of method {method!r}: expected NAME=VALUE, got {pair!r}")
        key, text = pair.split("=", 1)
        texts[key] = text
    return check_params(method, texts)


def recorded_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that reproduce a map recorded with ``params`` (a cohort's or a risk model's
    record): a parameter added since (:data:`ADDED_PARAMETERS`) and absent from the record takes
    the value that reproduces the behaviour the record was made with."""
    params = dict(params)
    for name, (methods, before) in ADDED_PARAMETERS.items():
        if method in methods and name not in params:
            params[name] = before
    return params
