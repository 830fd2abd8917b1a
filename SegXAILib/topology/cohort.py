"""Calibration cohorts for the QA risk model (METHODS.md section 6): reading a cohort folder
and calibrating a risk model on it.

A cohort folder (built by :func:`SegXAILib.pipeline.cohort.build_cohort`, ``segxai qa cohort``)
holds, per case, the predicted mask and one saliency map per attribution method (NIfTI, on
the case's input grid), and ``cohort.json`` / ``cohort.csv`` with each case's Dice against
its reference and how it was made (seed, degradation, method parameters, model checksum).
:func:`calibrate_cohort` (``segxai qa calibrate``) reads it.

A batch folder of :func:`SegXAILib.batch.run_batch` (``segxai batch``) is a calibration cohort
too: its finished cases with a reference (``batch_case.json``) and a class-level map of the
method give the same curves and Dice (:func:`batch_curves`), and :func:`calibrate_cohort` takes
either folder.
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
    "cohort_feature",
    "DOMAIN_FEATURES",
    "QA_TTA_SOURCES",
    "BATCH_SUMMARY",
    "is_batch_folder",
    "read_batch_summary",
    "batch_case_masks",
    "batch_case_dice",
    "batch_curves",
]

COHORT_FORMAT = "segxai-qa-cohort"
COHORT_VERSION = 1
#: Built-in case sources (``model`` of :func:`~SegXAILib.pipeline.cohort.build_cohort`)
COHORT_MODELS = ("lesions", "deepbet")
#: reference-free features whose calibration ranges join a risk model's domain (``feature_ranges``)
DOMAIN_FEATURES = ("log_volume", "noise_sigma")
#: the test-time flips of every QA cohort case and feature risk model (the TTA scores' samples)
QA_TTA_SOURCES = {"flips": {"axes": [0, 1, 2]}}
#: How the per-channel maps become one saliency map
CHANNEL_REDUCTION = "sum"
#: a batch folder's summary and its format (:mod:`SegXAILib.batch.run`, a front end this layer
#: does not import: the folder is read as files)
BATCH_SUMMARY = "batch.json"
BATCH_FORMAT = "segxai-batch"
#: statuses of a batch case whose folder is finished
_FINISHED = ("done", "skipped")


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
    from .euler import default_thresholds

    # a QA benchmark cohort stores its curves (on default_thresholds(N)), not its maps
    stored = isinstance(document.get("thresholds"), int) and len(thresholds) == document["thresholds"] \
        and np.array_equal(thresholds, default_thresholds(document["thresholds"]))
    for index, case in enumerate(usable):
        if cancel is not None:
            cancel.raise_if_cancelled()
        if "curves" in (case.get("files") or {}):
            if not stored:
                raise SegXAIInputError(f"cohort {cohort_dir}: its curves are stored on {document.get('thresholds')} "
                                       f"thresholds; calibrate with that many")
            from ..qa.cohort_table import read_case_curves

            named = read_case_curves(cohort_dir / case["files"]["curves"])
            if method not in named:
                continue  # no map (the method could not run on this case)
            curves.append(named[method])
            dice.append(float(case["dice"]))
            ids.append(str(case["case_id"]))
            continue
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
    """Calibrate a :class:`~SegXAILib.topology.risk.RiskModel` from a cohort folder or a batch
    folder (:func:`is_batch_folder`; ``method`` is then the name of a class-level map of its
    settings, see :func:`batch_curves`).

    ``options`` go to :func:`~SegXAILib.topology.risk.calibrate_risk_model`
    (``insufficient_quantile``, ``sensitivity_target``, ``specificity_target``, ``cv_folds``,
    ``seed``, ``n_components``). Returns ``(model, curves, dice, case_ids)``.
    """
    from .euler import default_thresholds
    from .risk import calibrate_risk_model

    from .risk import FEATURE_PREFIX

    thresholds = default_thresholds(n_thresholds)
    features = None
    name = Path(cohort_dir).name
    if is_batch_folder(cohort_dir):
        if method.startswith(FEATURE_PREFIX):
            raise SegXAIInputError(f"method {method!r}: feature risk models are calibrated on QA cohorts "
                                   "(segxai qa cohort --benchmark / --images), not batch folders")
        curves, dice, ids, provenance = batch_curves(cohort_dir, method, thresholds, progress, cancel)
    else:
        if method.startswith(FEATURE_PREFIX):
            thresholds = np.zeros(1)
            curves, dice, ids, document = cohort_feature(cohort_dir, method[len(FEATURE_PREFIX):])
            parameters = {"feature": method[len(FEATURE_PREFIX):], "uncertainty_sources": QA_TTA_SOURCES}
        else:
            curves, dice, ids, document = cohort_curves(cohort_dir, method, thresholds, progress, cancel)
            parameters = document["methods"][method]
        provenance = {"method": method, "method_parameters": parameters,
                      "model_checksum": document["model"]["checksum"]}
        name = document.get("cohort", name) if document.get("cohort") != "user" else name
        by_id = {c["case_id"]: c for c in document["cases"]}
        if all("scores" in by_id[i] for i in ids):
            features = {f: np.array([np.nan if by_id[i]["scores"].get(f) is None else by_id[i]["scores"][f]
                                     for i in ids], dtype=np.float64) for f in DOMAIN_FEATURES}
    options.setdefault("calibration_cohort", name)
    model = calibrate_risk_model(
        curves, dice, thresholds, provenance["method"], provenance["method_parameters"], provenance["model_checksum"],
        features=features, **options
    )
    return model, curves, dice, ids


def cohort_feature(cohort_dir: str | Path, feature: str) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """One stored reference-free score of every usable case of a QA cohort as one-point
    curves ``(N, 1)`` (a feature risk model, :data:`~SegXAILib.topology.risk.FEATURE_PREFIX`),
    with the Dice, the case ids and the document. Cases without the score are skipped."""
    cohort_dir = Path(cohort_dir)
    document = read_cohort(cohort_dir)
    usable = [c for c in document["cases"] if c["status"] == "ok" and (c.get("scores") or {}).get(feature) is not None]
    if not usable:
        known = sorted({k for c in document["cases"] for k in (c.get("scores") or {})})
        raise SegXAIInputError(f"method 'feature:{feature}': the cohort {cohort_dir} has no case with "
                               f"this score; its scores are {known}")
    values = np.array([[float(c["scores"][feature])] for c in usable])
    return values, np.array([float(c["dice"]) for c in usable]), [str(c["case_id"]) for c in usable], document


# ---------------------------------------------------------------------------- batch folders


def is_batch_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a batch folder (``batch.json``; a cohort folder has ``cohort.json``)."""
    return (Path(folder) / BATCH_SUMMARY).is_file()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SegXAIInputError(f"{what} {path}: cannot be read ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SegXAIInputError(f"{what} {path}: not valid JSON ({error})") from None


def read_batch_summary(batch_dir: str | Path) -> dict[str, Any]:
    """The ``batch.json`` of a batch folder, checked to be one (its format and a list of cases)."""
    batch_dir = Path(batch_dir)
    if not batch_dir.is_dir():
        raise SegXAIInputError(f"batch_dir {batch_dir}: no such folder")
    document = _read_json(batch_dir / BATCH_SUMMARY, "batch")
    if not isinstance(document, dict) or document.get("format") != BATCH_FORMAT or not isinstance(
            document.get("cases"), list):
        raise SegXAIInputError(f"batch {batch_dir / BATCH_SUMMARY}: not a batch summary (format "
                               f"{document.get('format') if isinstance(document, dict) else None!r}, expected "
                               f"{BATCH_FORMAT!r} with a list of cases)")
    return document


def batch_case_masks(case_dir: str | Path) -> tuple[np.ndarray, Optional[np.ndarray], dict[str, Any]]:
    """The predicted structure and its reference of one case folder of a batch.

    The structure is the manifest's ``structure`` (its class index from ``segmentation.json``);
    the reference is the label map ``batch_case.json`` records, as the pipeline reads one: for a
    model with one foreground class any non-zero voxel is the structure, else the voxels of the
    structure's class index.

    Returns
    -------
    prediction : ndarray of bool, shape (I, J, K)
    reference : ndarray of bool, shape (I, J, K), or None
        None when the case had no reference.
    manifest : dict
        The case's ``case.json``.
    """
    case_dir = Path(case_dir)
    manifest = _read_json(case_dir / "case.json", "case manifest")
    try:
        files = {entry["role"]: case_dir / entry["path"] for entry in manifest["files"]}
        classes = [row["name"] for row in _read_json(files["summary"], "segmentation summary")["classes"]]
        index = classes.index(manifest["structure"])
        labels = read_image(files["labels"])
    except (KeyError, TypeError, ValueError) as error:
        raise SegXAIInputError(f"case folder {case_dir}: not a complete case folder ({type(error).__name__}: "
                               f"{error})") from None
    prediction = np.rint(labels.array[0]).astype(np.int64) == index
    record = _read_json(files["batch_case"], "batch case") if "batch_case" in files else {}
    if not record.get("reference"):
        return prediction, None, manifest
    path = Path(record["reference"])
    if not path.exists():
        raise SegXAIInputError(f"case folder {case_dir}: its reference {path} (batch_case.json) is missing")
    reference = read_image(path)
    if not reference.same_grid(labels):
        raise SegXAIInputError(f"case folder {case_dir}: its reference {path} is not on the case's grid "
                               f"(shape {reference.spatial_shape} vs {labels.spatial_shape})")
    values = reference.array[0]
    truth = values != 0 if len(classes) == 2 else np.rint(values).astype(np.int64) == index
    return prediction, truth, manifest


def batch_case_dice(case_dir: str | Path) -> Optional[float]:
    """Dice of a batch case's predicted structure against its reference (:func:`batch_case_masks`);
    None without a reference."""
    from ..metrics import dice_score

    prediction, reference, _ = batch_case_masks(case_dir)
    return None if reference is None else dice_score(prediction, reference)


def batch_curves(
    batch_dir: str | Path,
    method: str,
    thresholds: np.ndarray,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """EC curves and Dice of a batch folder's cases for the class-level map named ``method``.

    A case counts when it finished (``done`` or ``skipped`` in ``batch.json``), had a reference
    and predicts the structure; its curve is :func:`~SegXAILib.topology.risk.saliency_curve` of
    the map's channels summed (float64, then float32, as the pipeline's QA sums them) inside the
    predicted structure, its Dice :func:`batch_case_dice`'s.

    Returns
    -------
    curves : ndarray, shape (N, T)
    dice : ndarray, shape (N,)
    case_ids : list of str, length N
    provenance : dict
        ``method`` (the attribution method), ``method_parameters`` (``params``, ``target``
        ``class:<structure>``, ``channel_reduction``: what :func:`~SegXAILib.pipeline.score_qa`
        compares) and ``model_checksum``, the same for every case.

    Raises
    ------
    SegXAIInputError
        Not a batch folder; no case with a reference has the map; a map made for another
        target; cases of different models or map parameters.
    """
    from ..metrics import dice_score
    from .risk import saliency_curve

    batch_dir = Path(batch_dir)
    document = read_batch_summary(batch_dir)
    finished = [record for record in document["cases"] if record.get("status") in _FINISHED]
    curves, dice, ids = [], [], []
    provenance: Optional[dict[str, Any]] = None
    for index, record in enumerate(finished):
        if cancel is not None:
            cancel.raise_if_cancelled()
        case_dir = batch_dir / "cases" / str(record["id"])
        prediction, reference, manifest = batch_case_masks(case_dir)
        files = {entry["role"]: case_dir / entry["path"] for entry in manifest["files"]}
        if reference is None or not prediction.any() or f"map:{method}:metadata" not in files:
            continue
        metadata = _read_json(files[f"map:{method}:metadata"], "map metadata")
        structure = manifest["structure"]
        target = metadata.get("target") or {}
        if target.get("spec") != "class" or target.get("class_name") != structure:
            raise SegXAIInputError(f"method {method!r}: the map of case {record['id']} explains {target!r}, not the "
                                   f"class target of the structure {structure!r}")
        case_provenance = {
            "method": str(metadata["method"]),
            "method_parameters": {"params": json.loads(json.dumps(metadata["parameters"], default=str)),
                                  "target": f"class:{structure}", "channel_reduction": CHANNEL_REDUCTION},
            "model_checksum": str(manifest["model"]["checksum"]),
        }
        if provenance is None:
            provenance = case_provenance
        elif case_provenance != provenance:
            raise SegXAIInputError(f"batch {batch_dir}: case {record['id']}'s {method} map was made by another "
                                   f"model or with other parameters ({case_provenance}) than the earlier cases' "
                                   f"({provenance})")
        total = None
        for channel in manifest["grid"]["channels"]:
            values = read_image(files[f"map:{method}:{channel}"]).array[0].astype(np.float64)
            total = values if total is None else total + values
        saliency = total.astype(np.float32)
        curves.append(saliency_curve(saliency, prediction, thresholds))
        dice.append(dice_score(prediction, reference))
        ids.append(str(record["id"]))
        report(progress, (index + 1) / max(1, len(finished)), f"EC curve {record['id']}")
    if not curves or provenance is None:
        raise SegXAIInputError(f"method {method!r}: no finished case of the batch {batch_dir} has a reference, a "
                               f"predicted structure and a class-level map named {method!r}")
    return np.asarray(curves, dtype=np.float64), np.asarray(dice), ids, provenance



# ---------------------------------------------------------------------------- scoring a case
