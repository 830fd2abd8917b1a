"""A QA cohort folder as a table: its usable cases (Dice, group, reference-free scores) and
each case's stored Euler characteristic curves (``cases/<id>/curves.npz``).

The folder is written by :func:`SegXAILib.pipeline.qa_cohort.build_qa_cohort` /
:func:`~SegXAILib.pipeline.qa_cohort.build_user_cohort`; curve names may hold ``:``
(``control_shuffled:<method>``), stored as ``__`` since ``.npz`` keys are file names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..image import SegXAIInputError
from ..io import atomic_path

__all__ = ["CURVES_FILE", "save_case_curves", "read_case_curves", "read_cohort_table"]

CURVES_FILE = "curves.npz"


def save_case_curves(path: str | Path, curves: dict[str, np.ndarray]) -> None:
    """Write one case's curves (name -> ``(T,)``) atomically."""
    with atomic_path(Path(path)) as temporary:
        with open(temporary, "wb") as stream:
            np.savez(stream, **{k.replace(":", "__"): np.asarray(v, np.float64) for k, v in curves.items()})


def read_case_curves(path: str | Path) -> dict[str, np.ndarray]:
    """Curves of one cohort case, by name."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k.replace("__", ":"): np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError) as error:
        raise SegXAIInputError(f"cohort curves {path}: cannot be read ({error})") from None


def read_cohort_table(cohort_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, np.ndarray]]]:
    """The cohort document, its usable cases (a contour and scores) and their curves.

    Raises
    ------
    SegXAIInputError
        A folder that is not a QA cohort (no stored scores), or a case whose curves file is
        missing or unreadable.
    """
    from ..topology.cohort import read_cohort

    cohort_dir = Path(cohort_dir)
    document = read_cohort(cohort_dir)
    if "thresholds" not in document:
        raise SegXAIInputError(f"cohort {cohort_dir}: not a QA benchmark cohort (no stored curves); build it with "
                               "segxai qa cohort --benchmark NAME or --images/--references")
    cases, curves = [], []
    for case in document["cases"]:
        if case.get("status") != "ok" or "scores" not in case:
            continue
        path = (case.get("files") or {}).get("curves")
        if path is None:
            raise SegXAIInputError(f"cohort {cohort_dir}: case {case['case_id']} lists no curves")
        cases.append(case)
        curves.append(read_case_curves(cohort_dir / path))
    return document, cases, curves
