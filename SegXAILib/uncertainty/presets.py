"""The uncertainty choices the front ends offer (the Slicer panel's menu, the browser viewer's).

A preset names a set of sample sources (:data:`~.sources.SOURCES`); a random preset draws
``samples`` samples with ``seed``, the others take every flip / ensemble-member combination.
:func:`preset_settings` turns a choice into :class:`~SegXAILib.pipeline.UncertaintySettings`
fields, so that both front ends ask the case engine for the same thing.
"""

from __future__ import annotations

import copy
from typing import Any

from ..image import SegXAIInputError

__all__ = ["UNCERTAINTY_PRESETS", "preset_settings"]

#: key -> (menu text, sample sources, random: samples and seed count)
UNCERTAINTY_PRESETS: dict[str, tuple[str, dict[str, dict[str, Any]], bool]] = {
    "flips": ("flips over the model's mirror axes", {"flips": {}}, False),
    "flips_all": ("flips over every axis", {"flips": {"axes": [0, 1, 2]}}, False),
    "tta": ("intensity test-time augmentation (gamma, noise)", {"gamma": {}, "noise": {}}, True),
    "spatial": ("small rotations and scaling", {"spatial": {}}, True),
    "mc_dropout": ("MC dropout (networks with dropout)", {"mc_dropout": {}}, True),
    "ensemble": ("ensemble (the model's folds / members)", {"ensemble": {}}, False),
}


def _whole(name: str, value: Any) -> int:
    """A whole number from a form field (text fields give strings), naming the parameter."""
    try:
        number = float(value)
        if isinstance(value, bool) or not number.is_integer():
            raise ValueError(value)
    except (TypeError, ValueError):
        raise SegXAIInputError(f"{name}: expected a whole number, got {value!r}") from None
    return int(number)


def preset_settings(preset: str, samples: Any = 8, seed: Any = 0) -> dict[str, Any]:
    """The :class:`~SegXAILib.pipeline.UncertaintySettings` fields of a front end's choice.

    Parameters
    ----------
    preset : str
        A key of :data:`UNCERTAINTY_PRESETS`.
    samples, seed : int or str
        The number of draws of a random preset and their seed (form text accepted); a
        non-random preset takes every combination (``samples`` None, seed 0). Their ranges are
        the settings' (checked when the case settings are made).

    Raises
    ------
    SegXAIInputError
        An unknown preset; a ``samples`` or ``seed`` that is not a whole number.
    """
    if preset not in UNCERTAINTY_PRESETS:
        raise SegXAIInputError(f"uncertainty source: {preset!r} is not one of {sorted(UNCERTAINTY_PRESETS)}")
    _, sources, random = UNCERTAINTY_PRESETS[preset]
    return {"sources": copy.deepcopy(sources),  # the table's lists stay the table's
            "samples": _whole("samples", samples) if random else None,
            "seed": _whole("seed", seed) if random else 0}
