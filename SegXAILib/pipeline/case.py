"""What a case run produces: :class:`Case` (everything on the input grid, world RAS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..image import Image
from .settings import CaseSettings

__all__ = ["Case", "QAResult", "ContourQA"]


@dataclass
class QAResult:
    """The QA of the structure's contour.

    Attributes
    ----------
    structure, method : str
        The scored class and the attribution method of the map.
    thresholds, curve : ndarray, shape (T,)
        The superlevel EC curve of the normalised map inside the contour.
    saliency : ndarray, shape (I, J, K), float32, or None
        The map the curve was taken of: the method's per-channel maps summed (the risk model's
        ``channel_reduction``); None for a feature risk model (``feature:<score>``, whose
        one-point "curve" is the case's score).
    risk : dict or None
        :meth:`~SegXAILib.topology.RiskModel.score`: ``pc1``, ``band``, ``estimated_dice``,
        ``insufficient_probability``, ``outside_calibration``, ``calibration``; None without a
        risk model.
    risk_model : str
        Where the risk model came from (a path or ``bundled:<model>/<method>``).
    reference_curve : ndarray or None
        The calibration cohort's mean curve (for plots), shape (T,).
    calibration_auroc_cv : float or None
        The risk model's cross-validated AUROC (shown beside the band).
    """

    structure: str
    method: str
    thresholds: np.ndarray
    curve: np.ndarray
    saliency: Optional[np.ndarray]
    risk: Optional[dict] = None
    risk_model: str = ""
    reference_curve: Optional[np.ndarray] = None
    calibration_auroc_cv: Optional[float] = None

    @property
    def band(self) -> str:
        return self.risk["band"] if self.risk is not None else "no risk model"

    def summary_text(self) -> str:
        """What every front end shows: the band (upper case), the estimated Dice with the risk
        model's stated error, and where it was calibrated with its held-out AURC; a case outside
        the calibration domain says which of its features are outside."""
        if self.risk is None:
            return f"EC curve only ({self.method}; no risk model chosen)"
        risk = self.risk
        calibration = risk.get("calibration") or {}
        error = calibration.get("estimated_dice_error_q90")
        estimate = f"estimated Dice {risk['estimated_dice']:.2f}" + (
            f" (90 % of held-out errors <= {error:.2f})" if error is not None else "")
        where = []
        if calibration.get("cohort"):
            where.append(f"calibrated on {calibration['cohort']} ({calibration.get('n_cases')} cases)")
        if calibration.get("aurc_cv") is not None:
            where.append(f"held-out AURC {calibration['aurc_cv']:.3f}")
        where_text = f", {', '.join(where)}" if where else ""
        if risk.get("outside_calibration"):
            return (f"{self.band.upper()}: {', '.join(risk['outside_calibration'])} outside the calibration cases' "
                    f"range, no band given; {estimate} is an extrapolation ({self.method}{where_text})")
        return f"{self.band.upper()} risk: {estimate}; {self.method}{where_text}"

    def table_row(self) -> dict[str, Any]:
        """One flat row (numbers and text) for tables: band, scores, calibration."""
        row: dict[str, Any] = {"structure": self.structure, "method": self.method, "band": self.band}
        if self.risk is not None:
            row.update({k: self.risk[k] for k in ("pc1", "estimated_dice", "insufficient_probability")})
            calibration = self.risk.get("calibration") or {}
            row["calibration_cohort"] = calibration.get("cohort") or ""
            if calibration.get("aurc_cv") is not None:
                row["calibration_aurc_cv"] = calibration["aurc_cv"]
            if calibration.get("estimated_dice_error_q90") is not None:
                row["estimated_dice_error_q90"] = calibration["estimated_dice_error_q90"]
            row["outside_calibration"] = ", ".join(self.risk.get("outside_calibration") or [])
            row["risk_model"] = self.risk_model
        return row

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``qa.json``)."""
        document: dict[str, Any] = {"structure": self.structure, "method": self.method, "band": self.band,
                                    "risk_model": self.risk_model}
        if self.risk is not None:
            document.update({k: self.risk[k] for k in ("pc1", "estimated_dice", "insufficient_probability")})
            for key in ("outside_calibration", "calibration"):
                if key in self.risk:
                    document[key] = self.risk[key]
            document["calibration_auroc_cv"] = self.calibration_auroc_cv
        document["thresholds"] = [float(v) for v in self.thresholds]
        document["curve"] = [float(v) for v in self.curve]
        if self.reference_curve is not None:
            # the calibration cohort's mean curve, for the chart of a case read back (read_case)
            document["reference_curve"] = [float(v) for v in self.reference_curve]
        return document


def _floats(values: Any) -> dict[str, float]:
    """A score dict read back from JSON: null (a NaN written) is NaN again."""
    return {str(k): float("nan") if v is None else float(v) for k, v in dict(values).items()}


@dataclass
class ContourQA:
    """The QA of contours the model did not draw (:func:`~SegXAILib.pipeline.add_contour_qa`):
    the review list, one row per given structure, most suspicious first.

    Attributes
    ----------
    rows : list of dict
        Sorted by ``suspicion`` descending (:func:`~SegXAILib.qa.contours.review_order`: the
        risk model's P(insufficient) when the row has a risk result, else ``1 - Dice`` with the
        model's prediction). Each row: ``structure`` (the contour's name), ``class_name`` and
        ``class_index`` (the model class it is compared with), ``scores``
        (:func:`~SegXAILib.qa.contours.contour_scores`: Dice / volume ratio / surface distances
        with the prediction, the model's probability and entropy inside and along the border),
        ``uncertainty`` (:func:`~SegXAILib.qa.contours.uncertainty_agreement`, or None),
        ``saliency`` (``method``, ``map`` (the case map reused, or ``""``), ``thresholds`` and
        ``curve`` ``(T,)``, the superlevel EC curve of that map inside the contour; or None),
        ``risk`` (:meth:`~SegXAILib.topology.RiskModel.score` of the curve, or None),
        ``suspicion`` and ``sort_key``.
    risk_model : str
        The risk model that scored the curves (``""`` when none applied).
    notes : list of str
        What was not computed and why.
    """

    rows: list = field(default_factory=list)
    risk_model: str = ""
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``contour_qa.json``; NaN scores are written as null)."""
        rows = []
        for row in self.rows:
            saliency = row.get("saliency")
            if saliency is not None:
                saliency = {**saliency, "thresholds": [float(v) for v in saliency["thresholds"]],
                            "curve": [float(v) for v in saliency["curve"]]}
            rows.append({**row, "saliency": saliency})
        return {"sort_key": "suspicion, descending: the risk model's insufficient_probability when the row has "
                            "a risk result, else 1 - dice_with_prediction",
                "risk_model": self.risk_model, "notes": list(self.notes), "structures": rows}

    @classmethod
    def from_dict(cls, document: Any, source: str = "contour_qa") -> "ContourQA":
        """The inverse of :meth:`to_dict` (thresholds and curves as float arrays, null scores as NaN)."""
        from ..image import SegXAIInputError

        try:
            rows = []
            for row in document["structures"]:
                saliency = row.get("saliency")
                if saliency is not None:
                    saliency = {**saliency, "thresholds": np.asarray(saliency["thresholds"], dtype=float),
                                "curve": np.asarray(saliency["curve"], dtype=float)}
                uncertainty = row.get("uncertainty")
                rows.append({**row, "scores": _floats(row["scores"]), "saliency": saliency,
                             "uncertainty": None if uncertainty is None else _floats(uncertainty),
                             "suspicion": float(row["suspicion"])})
            return cls(rows=rows, risk_model=str(document.get("risk_model", "")),
                       notes=[str(n) for n in document.get("notes", [])])
        except (KeyError, TypeError, ValueError) as error:
            raise SegXAIInputError(f"{source}: not a contour QA document ({error!r})") from None


@dataclass
class Case:
    """One case run by :func:`~SegXAILib.pipeline.run_case`.

    Attributes
    ----------
    image : Image
        The input ``(C, I, J, K)``, channels in the card's order.
    settings : CaseSettings
    segmentation : Segmentation
        The one prediction of the case (input grid, plus the model-grid labels every
        attribution step resolves its target from).
    class_index : int
        The structure's class index.
    instance_labels : Image or None
        ``(1, I, J, K)`` int32 instance ids of the structure (1 = largest).
    instances : list of Instance
    maps : dict
        Map name -> :class:`~SegXAILib.attribution.AttributionResult` (class-level maps).
    instance_maps : dict
        Instance id -> aggregation -> Image ``(C, I, J, K)``.
    lesions : list of dict
        The lesion table (:func:`~SegXAILib.pipeline.lesion_rows`).
    qa : QAResult or None
    contour_qa : ContourQA or None
        The QA of given contours (not the model's): the per-structure review list.
    agg2exp : ImportanceMatrix or None
    uncertainty : UncertaintyResult or None
        Voxel maps and per-structure / per-lesion tables of the prediction's uncertainty
        (:func:`~SegXAILib.uncertainty.estimate_uncertainty`); the lesion rows carry theirs.
    counterfactuals : dict
        Instance id -> :class:`~SegXAILib.counterfactual.CounterfactualRelevance`: G+(x), G-(x)
        and ``R = G+(x) - G-(x)`` ``(C, I, J, K)``, the rewritten patch and the model's scores.
    counterfactual_generators : dict or None
        The generator pair they came from: path, SHA-256 of the file, model, class, geometry,
        training config.
    reference : Image or None
        A reference label map on the input grid, class indices (TP / FP / FN groups, Agg2Exp's
        reference RoIs); for a model with one foreground class any non-zero voxel is the structure.
    timings : dict
        Seconds per step.
    notes : list of str
        Steps not taken and why (e.g. no predicted voxel of the structure: no maps, no QA).
    warnings : list of str
        How the input differs from what the model card expects
        (:func:`~SegXAILib.pipeline.check_case_input`): every front end shows these same sentences.
    """

    image: Image
    settings: CaseSettings
    segmentation: Any
    class_index: int
    instance_labels: Optional[Image] = None
    instances: list = field(default_factory=list)
    maps: dict = field(default_factory=dict)
    instance_maps: dict = field(default_factory=dict)
    lesions: list = field(default_factory=list)
    qa: Optional[QAResult] = None
    contour_qa: Optional[ContourQA] = None
    agg2exp: Any = None
    uncertainty: Any = None
    counterfactuals: dict = field(default_factory=dict)
    counterfactual_generators: Optional[dict] = None
    reference: Optional[Image] = None
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def card(self):
        return self.segmentation.card

    @property
    def structure(self) -> str:
        return self.card.class_names[self.class_index]

    @property
    def mask(self) -> np.ndarray:
        """``(I, J, K)`` bool: the predicted structure."""
        return self.segmentation.mask(self.class_index)

    @property
    def device(self) -> str:
        return self.segmentation.device
