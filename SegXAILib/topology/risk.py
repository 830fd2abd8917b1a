"""QA risk model from Euler characteristic curves of saliency maps (METHODS.md section 6).

Workflow
--------
1. :func:`saliency_curve` turns one case's saliency map and predicted mask into an Euler
   characteristic (EC) curve on a fixed threshold grid.
2. :func:`calibrate_risk_model` stacks the EC curves of a calibration cohort with their
   Dice scores and fits a :class:`RiskModel`: PCA of the curves, the projection on PC1
   (the paper's ``lambda_1``), a sigmoid ``Dice ~ A / (1 + exp(-k (lambda_1 - lambda_0)))``,
   an ROC of ``lambda_1`` as a detector of insufficient contours, and two cut points that
   split ``lambda_1`` into the risk bands ``low`` / ``moderate`` / ``high``.
3. :meth:`RiskModel.score` applies a saved model to a new case (no reference needed).

Conventions
-----------
* PC1 sign: the stored first component is oriented so that PC1 scores are positively
  correlated (Pearson) with Dice on the calibration cohort: **higher PC1 = higher Dice =
  lower risk**. A low PC1 therefore flags risk; the ROC is computed on ``-PC1``.
* Insufficient contour: Dice strictly below the ``insufficient_quantile`` (default 0.15)
  quantile of the calibration Dice (``numpy.quantile``, linear interpolation).
* Bands: ``high`` when ``pc1 <= cut_high``; ``moderate`` when ``cut_high < pc1 <= cut_low``;
  ``low`` when ``pc1 > cut_low``. See :func:`calibrate_risk_model` for how the cuts are
  chosen. A cut of ``-inf`` (stored as JSON ``null``) means the band below it is empty.
* The model also stores what plotting a new case needs without the cohort: per-threshold
  quantiles of the calibration curves and the calibration cases' PC1 scores and Dice (from
  which the ROC is recomputed).
* A *feature* risk model (``method = "feature:<score name>"``, e.g. the TTA pairwise Dice of
  :mod:`SegXAILib.qa.scores`) is the same model on a one-point "curve" (the score itself,
  ``thresholds = [0]``): its PC1 is the score, centred and oriented like an EC PC1, so bands,
  sigmoid, logistic and plots are shared.
* Calibration domain: ``feature_ranges`` holds, for the PC1 (``"risk_score"``) and reference-free
  features of the calibration cases (log volume, noise), the 1st-99th percentile range widened
  by a quarter of its width on each side; a case with any feature outside gets the band
  ``"outside calibration"`` (its estimate is still reported, flagged), not a confident band.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..attribution.postprocess import normalise_000
from ..image import SegXAIInputError
from ..io import atomic_path
from ..validation import problem, validate
from .euler import euler_characteristic_curve

__all__ = [
    "bundled_risk_model",
    "shipped_risk_model",
    "SHIPPED_RISK_MODELS",
    "CURVE_QUANTILE_LEVELS",
    "FEATURE_PREFIX",
    "OUTSIDE_BAND",
    "feature_range",
    "RISK_MODEL_FORMAT",
    "RISK_MODEL_VERSION",
    "RiskModel",
    "calibrate_risk_model",
    "saliency_curve",
]

#: ``format`` tag of the JSON file
RISK_MODEL_FORMAT = "segxai-risk-model"
#: schema version written and accepted by :meth:`RiskModel.load`
RISK_MODEL_VERSION = 2
#: fewest calibration cases accepted
MIN_CASES = 10
#: quantile levels of the calibration curves stored for plotting (band = 5-95 %, 25-75 %)
CURVE_QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
PC1_CONVENTION = "higher_pc1_higher_dice"
#: the band of a case outside the calibration domain (``feature_ranges``)
OUTSIDE_BAND = "outside calibration"
#: percentiles of the calibration domain and the widening on each side (fraction of the width)
DOMAIN_PERCENTILES = (1.0, 99.0)
DOMAIN_MARGIN = 0.25
#: prefix of a feature risk model's method
FEATURE_PREFIX = "feature:"


# --------------------------------------------------------------------------- curves


def saliency_curve(
    saliency: np.ndarray, mask: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """Superlevel EC curve of a saliency map normalised and restricted to a mask.

    The map is normalised with paper 000's normalisation
    (:func:`~SegXAILib.attribution.postprocess.normalise_000`:
    ``max(v - median(v), 0) / max(...)``) computed over the voxels **inside the mask
    only**: the method describes saliency features inside the predicted structure, so the
    median and the peak are those of the structure, not of the whole volume (whose
    median is typically background). Voxels outside the mask never enter the complex.

    Parameters
    ----------
    saliency : ndarray, shape (D, H, W)
        Finite real saliency values.
    mask : ndarray of bool (or 0/1), shape (D, H, W)
        Predicted structure; must contain at least one voxel.
    thresholds : ndarray, shape (T,)
        Threshold grid on the normalised scale, e.g.
        :func:`~SegXAILib.topology.euler.default_thresholds`.

    Returns
    -------
    curve : ndarray, shape (T,), int64
        ``chi(t)`` of the superlevel complex ``{normalised >= t} & mask``.
    """
    saliency = np.asarray(saliency)
    mask = np.asarray(mask)
    if saliency.ndim != 3:
        raise SegXAIInputError(f"saliency must be a 3D array (D, H, W), got shape {saliency.shape}")
    if mask.shape != saliency.shape:
        raise SegXAIInputError(f"mask must have the shape of saliency {saliency.shape}, got {mask.shape}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.number) or not np.all(np.isin(mask, (0, 1))):
            raise SegXAIInputError("mask must be boolean (or 0/1)")
        mask = mask.astype(bool)
    if not mask.any():
        raise SegXAIInputError("mask is empty: no predicted structure to describe")
    if not np.issubdtype(saliency.dtype, np.number) or np.iscomplexobj(saliency):
        raise SegXAIInputError(f"saliency must be a real numeric array, got dtype {saliency.dtype}")
    inside = saliency[mask].astype(np.float64)
    if not np.all(np.isfinite(inside)):
        raise SegXAIInputError("saliency must be finite (no NaN or inf) inside the mask")
    normalised = np.zeros(saliency.shape, dtype=np.float64)
    normalised[mask] = normalise_000(inside[None])[0]
    return euler_characteristic_curve(normalised, thresholds, mask=mask, superlevel=True)


# --------------------------------------------------------------------------- model


def _sigmoid(lam: np.ndarray, a: float, k: float, lambda0: float) -> np.ndarray:
    z = np.clip(-k * (np.asarray(lam, dtype=np.float64) - lambda0), -700.0, 700.0)
    return a / (1.0 + np.exp(z))


def _logistic(x: float) -> float:
    x = float(np.clip(x, -700.0, 700.0))
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(eq=False)
class RiskModel:
    """A calibrated QA risk model (see module docstring for the conventions).

    Attributes
    ----------
    version : int
        Schema version (:data:`RISK_MODEL_VERSION`).
    thresholds : ndarray, shape (T,)
        EC threshold grid the curves were computed on.
    pca_mean : ndarray, shape (T,)
        Mean calibration curve.
    pca_components : ndarray, shape (k, T)
        Principal directions (rows); row 0 is PC1, sign-fixed so that higher PC1 = higher Dice.
    explained_variance_ratio : ndarray, shape (k,)
    sigmoid_a, sigmoid_k, sigmoid_lambda0 : float
        ``Dice ~ A / (1 + exp(-k (pc1 - lambda0)))``.
    sigmoid_status : str
        ``"fitted"`` (least squares converged) or ``"fallback_constant"`` (fit failed;
        ``k = 0`` and the estimate is the calibration mean Dice).
    insufficient_quantile, insufficient_dice : float
        A contour is insufficient when ``Dice < insufficient_dice`` (the quantile cut).
    cut_high, cut_low : float
        PC1 cut points (``-inf`` = empty band below); ``cut_high <= cut_low``.
    sensitivity_target, specificity_target : float
    operating_points : dict
        Calibration sensitivity / specificity of flagging ``pc1 <= cut_high`` and
        ``pc1 <= cut_low``.
    logistic_intercept, logistic_coef, pc1_center, pc1_scale : float
        ``P(insufficient) = 1 / (1 + exp(-(b0 + b1 (pc1 - center) / scale)))``.
    auroc : float
        Calibration (training) AUROC of ``-pc1`` for insufficient contours.
    auroc_cv_mean, auroc_cv_std : float
        Stratified k-fold AUROC (PCA and sign refitted per training fold).
    cv_folds, seed : int
    method : str
        Attribution method that produced the saliency maps.
    method_parameters : dict
    model_checksum : str
        Checksum of the segmentation model the cohort was run with.
    n_cases, n_insufficient : int
    curve_quantile_levels : ndarray, shape (Q,)
        Levels of :attr:`curve_quantiles` (:data:`CURVE_QUANTILE_LEVELS`).
    curve_quantiles : ndarray, shape (Q, T)
        Per-threshold quantiles of the calibration EC curves (the cohort's spread, for plots).
    calibration_pc1, calibration_dice : ndarray, shape (N,)
        PC1 score and Dice of every calibration case (the ROC and the scatter plot).
    pc1_convention : str
        Always ``"higher_pc1_higher_dice"``.
    calibration_cohort : str
        What the model was calibrated on (a cohort name), shown with every band.
    aurc_cv, estimated_dice_mae_cv, estimated_dice_error_q90 : float or None
        Held-out (stratified k-fold, PCA / sign / sigmoid refitted per fold) AURC of ``-pc1``
        with risk ``1 - Dice``, and the mean and the 90th percentile of the absolute error of the
        estimated Dice: the model's stated error (an estimate is "within the stated error" when
        it is at most the 90th percentile away). None in models written before they were recorded.
    feature_ranges : dict
        Calibration domain: feature name -> ``[low, high]`` (see the module notes).
    """

    version: int
    thresholds: np.ndarray
    pca_mean: np.ndarray
    pca_components: np.ndarray
    explained_variance_ratio: np.ndarray
    sigmoid_a: float
    sigmoid_k: float
    sigmoid_lambda0: float
    sigmoid_status: str
    insufficient_quantile: float
    insufficient_dice: float
    cut_high: float
    cut_low: float
    sensitivity_target: float
    specificity_target: float
    operating_points: dict
    logistic_intercept: float
    logistic_coef: float
    pc1_center: float
    pc1_scale: float
    auroc: float
    auroc_cv_mean: float
    auroc_cv_std: float
    cv_folds: int
    seed: int
    method: str
    method_parameters: dict
    model_checksum: str
    n_cases: int
    n_insufficient: int
    curve_quantile_levels: np.ndarray
    curve_quantiles: np.ndarray
    calibration_pc1: np.ndarray
    calibration_dice: np.ndarray
    pc1_convention: str = field(default=PC1_CONVENTION)
    calibration_cohort: str = ""
    aurc_cv: Optional[float] = None
    estimated_dice_mae_cv: Optional[float] = None
    estimated_dice_error_q90: Optional[float] = None
    feature_ranges: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ applying

    def project(self, curve: np.ndarray) -> float:
        """PC1 score (``lambda_1``) of one EC curve, shape (T,); no provenance checks."""
        curve = np.asarray(curve, dtype=np.float64)
        return float((curve - self.pca_mean) @ self.pca_components[0])

    def band(self, pc1: float) -> str:
        """Risk band of a PC1 score: ``"high"``, ``"moderate"`` or ``"low"``."""
        if pc1 <= self.cut_high:
            return "high"
        if pc1 <= self.cut_low:
            return "moderate"
        return "low"

    def score(
        self,
        curve: np.ndarray,
        method: str,
        model_checksum: str,
        method_parameters: dict | None = None,
        features: Optional[dict[str, float]] = None,
    ) -> dict[str, Any]:
        """Score one case's EC curve.

        Parameters
        ----------
        curve : ndarray, shape (T,)
            EC curve on :attr:`thresholds` (from :func:`saliency_curve`).
        method : str
            Attribution method the curve's saliency map came from; must equal :attr:`method`.
        model_checksum : str
            Checksum of the segmentation model; must equal :attr:`model_checksum`.
        method_parameters : dict, optional
            When given, must equal :attr:`method_parameters`.
        features : dict, optional
            The case's reference-free features (e.g. ``log_volume``, ``noise_sigma``), judged
            against :attr:`feature_ranges` with the PC1.

        Returns
        -------
        result : dict
            ``pc1`` (float), ``band`` (str: ``low`` / ``moderate`` / ``high``, or
            :data:`OUTSIDE_BAND`), ``estimated_dice`` (float, sigmoid),
            ``insufficient_probability`` (float, logistic on PC1), ``outside_calibration``
            (the features outside the calibration domain), ``calibration`` (cohort, held-out
            AURC and estimated-Dice error).

        Raises
        ------
        SegXAIInputError
            Another method, model or parameters; wrong grid length; non-finite curve.
        """
        if method != self.method:
            raise SegXAIInputError(
                f"risk model was calibrated with attribution method {self.method!r}, "
                f"the curve was made with {method!r}"
            )
        if model_checksum != self.model_checksum:
            raise SegXAIInputError(
                f"risk model was calibrated for model checksum {self.model_checksum!r}, "
                f"the curve comes from model {model_checksum!r}"
            )
        if method_parameters is not None and dict(method_parameters) != self.method_parameters:
            raise SegXAIInputError(
                f"risk model was calibrated with method parameters {self.method_parameters!r}, "
                f"got {method_parameters!r}"
            )
        curve = np.asarray(curve)
        if curve.shape != self.thresholds.shape:
            raise SegXAIInputError(
                f"curve must have shape {self.thresholds.shape} (the model's threshold grid), "
                f"got {curve.shape}"
            )
        if not np.issubdtype(curve.dtype, np.number) or not np.all(np.isfinite(curve)):
            raise SegXAIInputError("curve must be finite real numbers")
        pc1 = self.project(curve)
        estimate = float(_sigmoid(np.array([pc1]), self.sigmoid_a, self.sigmoid_k, self.sigmoid_lambda0)[0])
        probability = _logistic(
            self.logistic_intercept + self.logistic_coef * (pc1 - self.pc1_center) / self.pc1_scale
        )
        outside = self.outside(pc1, features)
        return {
            "pc1": pc1,
            "band": OUTSIDE_BAND if outside else self.band(pc1),
            "estimated_dice": estimate,
            "insufficient_probability": probability,
            "outside_calibration": outside,
            "calibration": {"cohort": self.calibration_cohort, "method": self.method, "n_cases": self.n_cases,
                            "aurc_cv": self.aurc_cv, "estimated_dice_mae_cv": self.estimated_dice_mae_cv,
                            "estimated_dice_error_q90": self.estimated_dice_error_q90,
                            "auroc_cv": self.auroc_cv_mean},
        }

    def outside(self, pc1: float, features: Optional[dict[str, float]] = None) -> list[str]:
        """Names of the features (``"risk_score"`` = the PC1) outside :attr:`feature_ranges`;
        a feature the model has no range for, or the case lacks, is not judged."""
        values = {"risk_score": float(pc1), **{k: float(v) for k, v in (features or {}).items() if v is not None}}
        return sorted(name for name, (low, high) in self.feature_ranges.items()
                      if name in values and not low <= values[name] <= high)

    def calibration_insufficient(self) -> np.ndarray:
        """Boolean ``(N,)``: which calibration cases were insufficient (``dice < insufficient_dice``)."""
        return self.calibration_dice < self.insufficient_dice

    def roc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Calibration ROC of ``-pc1``: ``(fpr, tpr, pc1_cut)``, each shape (P,).

        Point ``p`` flags ``pc1 <= pc1_cut[p]`` (the first point, ``+inf`` threshold in
        scikit-learn, has ``pc1_cut = -inf``: nothing flagged).
        """
        from sklearn.metrics import roc_curve

        fpr, tpr, thr = roc_curve(self.calibration_insufficient(), -self.calibration_pc1, drop_intermediate=False)
        return fpr, tpr, -thr

    # ------------------------------------------------------------------ serialising

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (arrays as lists, ``-inf`` cuts as ``None``)."""
        out: dict[str, Any] = {"format": RISK_MODEL_FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif f.name in ("cut_high", "cut_low"):
                value = None if not math.isfinite(value) else float(value)
            elif isinstance(value, dict):
                value = json.loads(json.dumps(value, allow_nan=False))
            out[f.name] = value
        return out

    def to_json(self) -> str:
        """Strict JSON text (no NaN / Infinity literals)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically; returns the path."""
        path = Path(path)
        text = self.to_json()
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "RiskModel":
        """Validate and build a model; errors name ``source`` and the offending field."""
        return _from_dict(cls, data, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RiskModel":
        """Read and validate a model written by :meth:`save`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise SegXAIInputError(f"risk model {path}: cannot be read ({error})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SegXAIInputError(f"risk model {path}: not valid JSON ({error})") from None
        return _from_dict(cls, data, str(path))


# --------------------------------------------------------------------------- validation

# strict: no coercion ("3" is not a number, true is not an integer); keys the model does not
# know are ignored, as before
_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Vector = Annotated[list[_Finite], Field(min_length=1)]


def _rectangular(rows: list[list[float]]) -> list[list[float]]:
    if len({len(row) for row in rows}) > 1:
        raise problem("rows must all have the same length")
    return rows


_Matrix = Annotated[list[_Vector], Field(min_length=1), AfterValidator(_rectangular)]


def _length(info: ValidationInfo, name: str) -> int | None:
    """Length of an already-validated vector field (None when it failed)."""
    value = info.data.get(name)
    return None if value is None else len(value)


class _RiskModelSchema(BaseModel):
    """The JSON of a :class:`RiskModel` (:meth:`RiskModel.to_dict`). Field order matters: the
    shape checks compare with fields validated before them."""

    # protected_namespaces=(): "model_checksum" is a field, not pydantic's model_ API (pydantic < 2.10 warns)
    model_config = ConfigDict(strict=True, extra="ignore", protected_namespaces=())

    format: Literal[RISK_MODEL_FORMAT]  # type: ignore[valid-type]
    version: Literal[RISK_MODEL_VERSION]  # type: ignore[valid-type]
    thresholds: _Vector
    pca_mean: _Vector
    pca_components: _Matrix
    explained_variance_ratio: _Vector
    sigmoid_a: _Finite
    sigmoid_k: _Finite
    sigmoid_lambda0: _Finite
    sigmoid_status: str
    insufficient_quantile: _Finite
    insufficient_dice: _Finite
    cut_high: Optional[_Finite]  # null = -inf (empty band below)
    cut_low: Optional[_Finite]
    sensitivity_target: _Finite
    specificity_target: _Finite
    operating_points: dict[str, Any]
    logistic_intercept: _Finite
    logistic_coef: _Finite
    pc1_center: _Finite
    pc1_scale: Annotated[_Finite, Field(gt=0)]
    auroc: _Finite
    auroc_cv_mean: _Finite
    auroc_cv_std: _Finite
    cv_folds: int
    seed: int
    method: str
    method_parameters: dict[str, Any]
    model_checksum: str
    n_cases: int
    n_insufficient: int
    curve_quantile_levels: _Vector
    curve_quantiles: _Matrix
    calibration_pc1: _Vector
    calibration_dice: _Vector
    pc1_convention: Literal[PC1_CONVENTION]  # type: ignore[valid-type]
    calibration_cohort: str = ""
    aurc_cv: Optional[_Finite] = None
    estimated_dice_mae_cv: Optional[_Finite] = None
    estimated_dice_error_q90: Optional[_Finite] = None
    feature_ranges: dict[str, Annotated[list[_Finite], Field(min_length=2, max_length=2)]] = {}

    @field_validator("feature_ranges")
    @classmethod
    def _ordered(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, (low, high) in value.items():
            if low > high:
                raise problem(f"{name}: low {low} is above high {high}")
        return value

    @field_validator("pca_mean")
    @classmethod
    def _like_thresholds(cls, value: list[float], info: ValidationInfo) -> list[float]:
        t = _length(info, "thresholds")
        if t is not None and len(value) != t:
            raise problem(f"must have {t} entries like thresholds, got {len(value)}")
        return value

    @field_validator("pca_components")
    @classmethod
    def _columns_like_thresholds(cls, value: list[list[float]], info: ValidationInfo) -> list[list[float]]:
        t = _length(info, "thresholds")
        if t is not None and len(value[0]) != t:
            raise problem(f"must have {t} columns like thresholds, got {len(value[0])}")
        return value

    @field_validator("explained_variance_ratio")
    @classmethod
    def _one_per_component(cls, value: list[float], info: ValidationInfo) -> list[float]:
        k = _length(info, "pca_components")
        if k is not None and len(value) != k:
            raise problem(f"must have {k} entries (one per row of pca_components), got {len(value)}")
        return value

    @field_validator("cut_low")
    @classmethod
    def _not_below_cut_high(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        high = info.data.get("cut_high", -math.inf)
        high = -math.inf if high is None else high
        if (-math.inf if value is None else value) < high:
            raise problem(f"must not be below cut_high ({high})")
        return value

    @field_validator("curve_quantiles")
    @classmethod
    def _levels_by_thresholds(cls, value: list[list[float]], info: ValidationInfo) -> list[list[float]]:
        q, t = _length(info, "curve_quantile_levels"), _length(info, "thresholds")
        shape = (len(value), len(value[0]))
        if q is not None and t is not None and shape != (q, t):
            raise problem(f"must have shape ({q}, {t}) (curve_quantile_levels, thresholds), got {shape}")
        return value

    @field_validator("calibration_pc1", "calibration_dice")
    @classmethod
    def _one_per_case(cls, value: list[float], info: ValidationInfo) -> list[float]:
        n = info.data.get("n_cases")
        if n is not None and len(value) != n:
            raise problem(f"must have n_cases = {n} entries, got {len(value)}")
        return value


def _from_dict(cls: type, data: Any, source: str) -> RiskModel:
    schema = validate(_RiskModelSchema, data, f"risk model {source}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        value = getattr(schema, f.name)
        if isinstance(value, list):
            value = np.asarray(value, dtype=np.float64)
        elif f.name == "feature_ranges":
            value = {k: [float(v[0]), float(v[1])] for k, v in value.items()}
        elif f.name in ("cut_high", "cut_low"):
            value = -math.inf if value is None else float(value)
        elif isinstance(value, float):
            value = float(value)
        values[f.name] = value
    return cls(**values)


# --------------------------------------------------------------------------- calibration


def _validate_cohort(curves: Any, dice: Any, thresholds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    curves = np.asarray(curves, dtype=np.float64)
    dice = np.asarray(dice, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if curves.ndim != 2:
        raise SegXAIInputError(f"curves must be a 2D array (N, T), got shape {curves.shape}")
    if dice.ndim != 1:
        raise SegXAIInputError(f"dice must be a 1D array (N,), got shape {dice.shape}")
    if thresholds.ndim != 1:
        raise SegXAIInputError(f"thresholds must be a 1D array (T,), got shape {thresholds.shape}")
    if dice.shape[0] != curves.shape[0]:
        raise SegXAIInputError(f"curves has {curves.shape[0]} cases but dice has {dice.shape[0]}")
    if thresholds.shape[0] != curves.shape[1]:
        raise SegXAIInputError(f"curves have {curves.shape[1]} thresholds but the grid has {thresholds.shape[0]}")
    for name, array in (("curves", curves), ("dice", dice), ("thresholds", thresholds)):
        if not np.all(np.isfinite(array)):
            raise SegXAIInputError(f"{name} must be finite (no NaN or inf)")
    if curves.shape[0] < MIN_CASES:
        raise SegXAIInputError(f"too few calibration cases: {curves.shape[0]} (need at least {MIN_CASES})")
    return curves, dice, thresholds


def _fit_pca(curves: np.ndarray, dice: np.ndarray, n_components: int):
    """PCA with PC1 oriented so that its scores correlate positively with Dice."""
    from sklearn.decomposition import PCA

    k = max(1, min(n_components, curves.shape[0] - 1, curves.shape[1]))
    pca = PCA(n_components=k, svd_solver="full").fit(curves)
    components = pca.components_.copy()
    if not np.all(np.isfinite(components)) or pca.explained_variance_[0] <= 0:
        raise SegXAIInputError("calibration curves have no variance: PCA is undefined")
    scores = (curves - pca.mean_) @ components[0]
    if np.std(scores) > 0 and np.std(dice) > 0 and np.corrcoef(scores, dice)[0, 1] < 0:
        components[0] = -components[0]
    return pca.mean_.copy(), components, pca.explained_variance_ratio_.copy()


def _fit_sigmoid(pc1: np.ndarray, dice: np.ndarray) -> tuple[float, float, float, str]:
    """Least-squares sigmoid fit from several starting slopes; constant fallback on failure."""
    from scipy.optimize import curve_fit

    scale = float(np.std(pc1)) or 1.0
    a0 = float(min(max(dice.max(), 1e-3), 1.5))
    best: tuple[float, np.ndarray] | None = None
    for centre in (float(np.median(pc1)), float(np.mean(pc1))):
        for slope in (0.5, 2.0, 8.0):
            p0 = (a0, slope / scale, centre)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    params, _ = curve_fit(
                        _sigmoid, pc1, dice, p0=p0,
                        bounds=([0.0, 0.0, -np.inf], [2.0, np.inf, np.inf]), maxfev=5000,
                    )
            except (RuntimeError, ValueError):
                continue
            if not np.all(np.isfinite(params)):
                continue
            sse = float(np.sum((_sigmoid(pc1, *params) - dice) ** 2))
            if best is None or sse < best[0]:
                best = (sse, params)
    if best is None:
        warnings.warn("sigmoid fit of Dice on PC1 failed; falling back to the mean Dice", RuntimeWarning)
        return 2.0 * float(np.mean(dice)), 0.0, float(np.median(pc1)), "fallback_constant"
    a, k, lambda0 = (float(x) for x in best[1])
    return a, k, lambda0, "fitted"


def _choose_cuts(
    pc1: np.ndarray, insufficient: np.ndarray, sensitivity_target: float, specificity_target: float
) -> tuple[float, float, dict]:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(insufficient, -pc1, drop_intermediate=False)
    # flagged as risky when -pc1 >= thr, i.e. pc1 <= -thr; along the ROC the cut rises
    ok_spec = np.flatnonzero(1.0 - fpr >= specificity_target)  # never empty: (0, 0) point
    best_tpr = tpr[ok_spec].max()
    # high: rule-in, the strictest cut with the best sensitivity the specificity budget allows
    i_high = ok_spec[tpr[ok_spec] == best_tpr][np.argmin(fpr[ok_spec][tpr[ok_spec] == best_tpr])]
    both = np.flatnonzero((tpr >= sensitivity_target) & (1.0 - fpr >= specificity_target))
    if both.size:
        # review flag (moderate or high): the most lenient cut still meeting both targets, so
        # the specificity budget is spent on reviewing borderline contours, not on calling them low
        i_low = both[-1]  # points run from the strictest to the most lenient cut
    else:
        # the targets cannot both be met: sensitivity (safety) wins, at the lowest FPR
        ok_sens = np.flatnonzero(tpr >= sensitivity_target)  # never empty: (1, 1) point
        i_low = ok_sens[np.argmin(fpr[ok_sens])]
    cut_high = -float(thr[i_high]) if np.isfinite(thr[i_high]) else -math.inf
    cut_low = -float(thr[i_low]) if np.isfinite(thr[i_low]) else -math.inf
    cut_low = max(cut_low, cut_high)  # a no-op by construction; kept as the invariant

    def point(cut: float) -> dict:
        flagged = pc1 <= cut
        return {
            "cut": None if not math.isfinite(cut) else cut,
            "sensitivity": float(flagged[insufficient].mean()),
            "specificity": float((~flagged[~insufficient]).mean()),
        }

    return cut_high, cut_low, {"high": point(cut_high), "low": point(cut_low)}


def _cross_validated_auroc(
    curves: np.ndarray, dice: np.ndarray, insufficient: np.ndarray, folds: int, seed: int, n_components: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-fold AUROC, and every case's held-out PC1 and estimated Dice (PCA, sign and sigmoid
    fitted on the other folds)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    aurocs = []
    held_pc1 = np.zeros(len(dice))
    held_estimate = np.zeros(len(dice))
    for train, test in splitter.split(curves, insufficient):
        mean, components, _ = _fit_pca(curves[train], dice[train], n_components)
        scores = (curves[test] - mean) @ components[0]
        aurocs.append(roc_auc_score(insufficient[test], -scores))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            a, k, lambda0, _ = _fit_sigmoid((curves[train] - mean) @ components[0], dice[train])
        held_pc1[test] = scores
        held_estimate[test] = _sigmoid(scores, a, k, lambda0)
    return np.asarray(aurocs), held_pc1, held_estimate


def feature_range(values: np.ndarray) -> list[float]:
    """The calibration domain of one feature: its 1st-99th percentile range widened by a
    quarter of its width on each side (see the module notes)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise SegXAIInputError("feature_range: no finite value")
    low, high = np.percentile(values, DOMAIN_PERCENTILES)
    margin = DOMAIN_MARGIN * (high - low)
    return [float(low - margin), float(high + margin)]


def _aurc(risk_scores: np.ndarray, risk: np.ndarray) -> float:
    from ..evaluation.failure_detection import aurc

    return float(aurc(risk_scores, risk))


def _fit_logistic(pc1: np.ndarray, insufficient: np.ndarray) -> tuple[float, float, float, float]:
    from sklearn.linear_model import LogisticRegression

    center = float(np.mean(pc1))
    scale = float(np.std(pc1)) or 1.0
    z = ((pc1 - center) / scale)[:, None]
    regression = LogisticRegression(C=1.0).fit(z, insufficient.astype(int))
    return float(regression.intercept_[0]), float(regression.coef_[0, 0]), center, scale


def calibrate_risk_model(
    curves: np.ndarray,
    dice: np.ndarray,
    thresholds: np.ndarray,
    method: str,
    method_parameters: dict | None,
    model_checksum: str,
    insufficient_quantile: float = 0.15,
    sensitivity_target: float = 0.85,
    specificity_target: float = 0.9,
    cv_folds: int = 5,
    seed: int = 0,
    n_components: int = 3,
    calibration_cohort: str = "",
    features: Optional[dict[str, np.ndarray]] = None,
) -> RiskModel:
    """Fit a :class:`RiskModel` on a calibration cohort.

    Parameters
    ----------
    curves : ndarray, shape (N, T)
        EC curves (from :func:`saliency_curve`) of ``N >= 10`` cases.
    dice : ndarray, shape (N,)
        Dice of each case's predicted contour against its reference.
    thresholds : ndarray, shape (T,)
        Grid the curves were computed on.
    method, method_parameters, model_checksum
        Provenance, checked again by :meth:`RiskModel.score`.
    insufficient_quantile : float
        Insufficient contour = ``dice < quantile(dice, insufficient_quantile)``.
    sensitivity_target, specificity_target : float
        Targets for the two cut points (see Notes).
    cv_folds : int
        Stratified folds for the cross-validated AUROC; reduced to the number of
        insufficient cases when there are fewer (at least 2 are needed).
    seed : int
        ``random_state`` of :class:`sklearn.model_selection.StratifiedKFold`.
    n_components : int
        Principal components kept (only PC1 is used to score).
    calibration_cohort : str
        Name of the cohort, stored and shown with every band.
    features : dict, optional
        Reference-free features of the calibration cases (name -> ``(N,)``; NaN ignored):
        their ranges, with the PC1's, make the calibration domain (``feature_ranges``).

    Returns
    -------
    model : RiskModel

    Notes
    -----
    The ROC is :func:`sklearn.metrics.roc_curve` of ``-pc1`` (low PC1 = risk) against the
    insufficient labels; a point with threshold ``s`` flags ``pc1 <= -s``.

    * High-risk cut (rule-in): among ROC points with specificity ``>= specificity_target``,
      the one with the highest sensitivity (ties: the lowest false-positive rate, i.e. the
      strictest cut). ``pc1 <= cut_high`` is ``high``. If only the trivial point
      qualifies, ``cut_high = -inf``.
    * Low-risk cut (review flag: ``pc1 <= cut_low`` is ``moderate`` or ``high``): the
      paper's operating point, sensitivity ``>= sensitivity_target`` at specificity ``>=
      specificity_target``. Among the ROC points meeting both, the most lenient one (the
      highest false-positive rate still within the specificity budget). If no point meets
      both, the first point reaching the sensitivity target (lowest false-positive rate):
      safety first. ``pc1 > cut_low`` is ``low``, so at least ``sensitivity_target`` of
      the calibration's insufficient cases fall in ``moderate`` or ``high``.
    * Hence ``cut_high <= cut_low`` always. When the detector meets both targets (even
      separates the calibration cohort perfectly) the moderate band holds the borderline
      sufficient contours just above the high cut (at most ``1 - specificity_target`` of
      the sufficient ones); otherwise it holds the zone where the two targets conflict.
      It is empty only when the most lenient qualifying point is also the strictest.

    The cross-validated AUROC refits PCA and the PC1 sign on each training fold and scores
    the held-out fold; the insufficient labels come from the whole cohort's quantile. The
    held-out PC1 of every case (pooled over folds) gives ``aurc_cv``, and a sigmoid refitted
    per fold its held-out estimated Dice (``estimated_dice_mae_cv``).
    """
    curves, dice, thresholds = _validate_cohort(curves, dice, thresholds)
    if not isinstance(method, str) or not method:
        raise SegXAIInputError(f"method must be a non-empty string, got {method!r}")
    if not isinstance(model_checksum, str) or not model_checksum:
        raise SegXAIInputError(f"model_checksum must be a non-empty string, got {model_checksum!r}")
    if not 0.0 < insufficient_quantile < 1.0:
        raise SegXAIInputError(f"insufficient_quantile must be in (0, 1), got {insufficient_quantile!r}")
    for name, value in (("sensitivity_target", sensitivity_target), ("specificity_target", specificity_target)):
        if not 0.0 < value <= 1.0:
            raise SegXAIInputError(f"{name} must be in (0, 1], got {value!r}")
    if isinstance(cv_folds, bool) or not isinstance(cv_folds, (int, np.integer)) or cv_folds < 2:
        raise SegXAIInputError(f"cv_folds must be an integer >= 2, got {cv_folds!r}")
    method_parameters = dict(method_parameters or {})
    try:
        json.dumps(method_parameters, allow_nan=False)
    except (TypeError, ValueError):
        raise SegXAIInputError("method_parameters must be JSON-serialisable (finite numbers, strings, ...)") from None

    cut = float(np.quantile(dice, insufficient_quantile))
    insufficient = dice < cut
    n_bad = int(insufficient.sum())
    if n_bad == 0:
        raise SegXAIInputError(
            f"no insufficient cases: no Dice below the {insufficient_quantile} quantile ({cut:.4g})"
        )
    if n_bad < 2:
        raise SegXAIInputError(f"too few insufficient cases for cross-validation: {n_bad} (need at least 2)")
    folds = int(min(cv_folds, n_bad))

    mean, components, ratio = _fit_pca(curves, dice, n_components)
    pc1 = (curves - mean) @ components[0]

    from sklearn.metrics import roc_auc_score

    a, k, lambda0, status = _fit_sigmoid(pc1, dice)
    auroc = float(roc_auc_score(insufficient, -pc1))
    cut_high, cut_low, points = _choose_cuts(pc1, insufficient, sensitivity_target, specificity_target)
    cv, held_pc1, held_estimate = _cross_validated_auroc(curves, dice, insufficient, folds, seed, n_components)
    ranges = {"risk_score": feature_range(pc1)}
    for name, values in (features or {}).items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != dice.shape:
            raise SegXAIInputError(f"features[{name!r}] must have one value per case ({dice.shape[0]}), "
                                   f"got shape {values.shape}")
        if np.isfinite(values).any():
            ranges[name] = feature_range(values)
    b0, b1, center, scale = _fit_logistic(pc1, insufficient)
    levels = np.asarray(CURVE_QUANTILE_LEVELS, dtype=np.float64)
    quantiles = np.quantile(curves, levels, axis=0)
    return RiskModel(
        version=RISK_MODEL_VERSION,
        thresholds=thresholds,
        pca_mean=mean,
        pca_components=components,
        explained_variance_ratio=ratio,
        sigmoid_a=a,
        sigmoid_k=k,
        sigmoid_lambda0=lambda0,
        sigmoid_status=status,
        insufficient_quantile=float(insufficient_quantile),
        insufficient_dice=cut,
        cut_high=cut_high,
        cut_low=cut_low,
        sensitivity_target=float(sensitivity_target),
        specificity_target=float(specificity_target),
        operating_points=points,
        logistic_intercept=b0,
        logistic_coef=b1,
        pc1_center=center,
        pc1_scale=scale,
        auroc=auroc,
        auroc_cv_mean=float(cv.mean()),
        auroc_cv_std=float(cv.std()),
        cv_folds=folds,
        seed=int(seed),
        method=method,
        method_parameters=method_parameters,
        model_checksum=model_checksum,
        n_cases=int(curves.shape[0]),
        n_insufficient=n_bad,
        curve_quantile_levels=levels,
        curve_quantiles=quantiles,
        calibration_pc1=pc1,
        calibration_dice=dice.copy(),
        calibration_cohort=str(calibration_cohort),
        aurc_cv=_aurc(-held_pc1, 1.0 - dice),
        estimated_dice_mae_cv=float(np.mean(np.abs(held_estimate - dice))),
        estimated_dice_error_q90=float(np.quantile(np.abs(held_estimate - dice), 0.9)),
        feature_ranges=ranges,
    )


#: the risk model each bundled model ships: the cohort whose table chose it and its method, the
#: best detector of that table a risk model can carry (Testing/Benchmarks/results/qa_benchmark.md,
#: Utilities/ship_risk_model.py)
SHIPPED_RISK_MODELS = {"lesions": ("c2_lesions", "feature:mean_entropy_foreground")}


def shipped_risk_model(name: str = "lesions") -> str:
    """The settings' name of the risk model a bundled model ships, ``bundled:<name>/<method>``."""
    if name not in SHIPPED_RISK_MODELS:
        raise SegXAIInputError(f"model {name!r} ships no risk model; those that do: {sorted(SHIPPED_RISK_MODELS)}")
    return f"bundled:{name}/{SHIPPED_RISK_MODELS[name][1]}"


def bundled_risk_model(name: str = "lesions", method: Optional[str] = None) -> Path:
    """Path of a shipped risk model, ``Resources/Models/<name>/risk_<method>.json`` (a feature
    model's ``feature:<score>`` as ``feature_<score>``); ``method`` defaults to the one
    :data:`SHIPPED_RISK_MODELS` names."""
    from ..sample_data import resources_dir

    if method is None:
        method = SHIPPED_RISK_MODELS.get(name, ("", ""))[1]
        if not method:
            raise SegXAIInputError(f"model {name!r} ships no risk model")
    path = resources_dir() / "Models" / name / f"risk_{method.replace(':', '_')}.json"
    if not path.is_file():
        raise SegXAIInputError(f"no shipped risk model {path}")
    return path
