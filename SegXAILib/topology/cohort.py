"""Calibration cohorts for the QA risk model (METHODS.md section 6): reading a cohort folder
and calibrating a risk model on it.

A cohort folder (built by :func:`SegXAILib.pipeline.cohort.build_cohort`, ``segxai qa cohort``)
holds, per case, the predicted mask and one saliency map per attribution method (NIfTI, on
the case's input grid), and ``cohort.json`` / ``cohort.csv`` with each case's Dice against
its reference and how it was made (seed, degradation, method parameters, model checksum).
:func:`calibrate_cohort` (``segxai qa calibrate``) reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..image import SegXAIInputError
from ..io import read_image
from ..progress import CancelToken, ProgressCallback, report
from ..validation import validate

__all__ = [
    "COHORT_FORMAT",
    "COHORT_VERSION",
    "COHORT_MODELS",
    "CHANNEL_REDUCTION",
    "read_cohort",
    "cohort_curves",
    "calibrate_cohort",
]

COHORT_FORMAT = "segxai-qa-cohort"
COHORT_VERSION = 1
#: Built-in case sources (``model`` of :func:`~SegXAILib.pipeline.cohort.build_cohort`)
COHORT_MODELS = ("lesions", "deepbet")
#: How the per-channel maps become one saliency map
CHANNEL_REDUCTION = "sum"


class _CohortModelSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    checksum: str


class _CohortCaseSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    dice: float
    status: str


class _CohortSchema(BaseModel):
    """What :func:`read_cohort` checks in ``cohort.json`` (strict types; other keys are kept)."""

    model_config = ConfigDict(strict=True, extra="allow")

    format: Literal[COHORT_FORMAT]  # type: ignore[valid-type]
    version: Literal[COHORT_VERSION]  # type: ignore[valid-type]
    model: _CohortModelSchema
    methods: dict[str, Any]
    cases: list[_CohortCaseSchema]
    class_name: str


def read_cohort(cohort_dir: str | Path) -> dict[str, Any]:
    """Read and check ``cohort.json`` of a cohort folder (:class:`_CohortSchema`).

    Returns
    -------
    document : dict
        The JSON as written (validation does not rewrite it).

    Raises
    ------
    SegXAIInputError
        Naming the file and every offending field path, e.g. ``cases.3.dice``.
    """
    cohort_dir = Path(cohort_dir)
    path = cohort_dir / "cohort.json"
    if not cohort_dir.is_dir():
        raise SegXAIInputError(f"cohort_dir {cohort_dir}: no such folder")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SegXAIInputError(f"cohort {path}: cannot be read ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SegXAIInputError(f"cohort {path}: not valid JSON ({error})") from None
    validate(_CohortSchema, document, f"cohort {path}")
    return document


def cohort_curves(
    cohort_dir: str | Path,
    method: str,
    thresholds: np.ndarray,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """EC curves of every usable case of a cohort for ``method``.

    Returns
    -------
    curves : ndarray, shape (N, T)
    dice : ndarray, shape (N,)
    case_ids : list of str, length N
    document : dict
        The cohort's ``cohort.json``.
    """
    from .risk import saliency_curve

    cohort_dir = Path(cohort_dir)
    document = read_cohort(cohort_dir)
    if method not in document["methods"]:
        raise SegXAIInputError(
            f"method {method!r}: the cohort {cohort_dir} has saliency maps for {sorted(document['methods'])}"
        )
    usable = [c for c in document["cases"] if c["status"] == "ok"]
    curves, dice, ids = [], [], []
    for index, case in enumerate(usable):
        if cancel is not None:
            cancel.raise_if_cancelled()
        try:
            mask_path = cohort_dir / case["files"]["mask"]
            saliency_path = cohort_dir / case["files"]["saliency"][method]
        except (KeyError, TypeError):
            raise SegXAIInputError(f"cohort {cohort_dir}: case {case.get('case_id')!r} lists no {method} map") from None
        mask = read_image(mask_path)
        saliency = read_image(saliency_path)
        if not mask.same_grid(saliency):
            raise SegXAIInputError(f"cohort case {case['case_id']}: {saliency_path.name} is not on the mask's grid")
        curves.append(saliency_curve(saliency.array[0], mask.array[0] > 0, thresholds))
        dice.append(float(case["dice"]))
        ids.append(str(case["case_id"]))
        report(progress, (index + 1) / max(1, len(usable)), f"EC curve {case['case_id']}")
    if not curves:
        raise SegXAIInputError(f"cohort {cohort_dir}: no case with a non-empty prediction")
    return np.asarray(curves, dtype=np.float64), np.asarray(dice), ids, document


def calibrate_cohort(
    cohort_dir: str | Path,
    method: str,
    n_thresholds: int = 100,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    **options: Any,
):
    """Calibrate a :class:`~SegXAILib.topology.risk.RiskModel` from a cohort folder.

    ``options`` go to :func:`~SegXAILib.topology.risk.calibrate_risk_model`
    (``insufficient_quantile``, ``sensitivity_target``, ``specificity_target``, ``cv_folds``,
    ``seed``, ``n_components``). Returns ``(model, curves, dice, case_ids)``.
    """
    from .euler import default_thresholds
    from .risk import calibrate_risk_model

    thresholds = default_thresholds(n_thresholds)
    curves, dice, ids, document = cohort_curves(cohort_dir, method, thresholds, progress, cancel)
    model = calibrate_risk_model(
        curves, dice, thresholds, method, document["methods"][method], document["model"]["checksum"], **options
    )
    return model, curves, dice, ids



# ---------------------------------------------------------------------------- scoring a case
