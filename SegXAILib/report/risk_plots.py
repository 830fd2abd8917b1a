"""PNG plots of the QA risk model: a case's EC curve against the calibration cohort's spread,
the calibration ROC with the cut points, and Dice against PC1 with the sigmoid fit.

Only :class:`matplotlib.figure.Figure` with an Agg canvas (never ``pyplot``), written
atomically by :func:`SegXAILib.report.figures.save_figure`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..image import SegXAIInputError
from ..topology.risk import RiskModel, _sigmoid

__all__ = ["ec_curve_figure", "curve_figure", "roc_figure", "dice_figure", "write_risk_plots"]

#: band colours (high, moderate, low)
BAND_COLORS = {"high": "#d1495b", "moderate": "#edae49", "low": "#00798c"}


def _figure(width: float = 6.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _check_model(model: RiskModel) -> None:
    if not isinstance(model, RiskModel):
        raise SegXAIInputError(f"expected a RiskModel, got {type(model).__name__}")


def ec_curve_figure(model: RiskModel, curve: Optional[np.ndarray] = None, title: str = "", band: str = ""):
    """EC curve of a case (optional) over the calibration cohort's 5-95 % and 25-75 % bands.

    Parameters
    ----------
    model : RiskModel
    curve : ndarray, shape (T,), optional
        The case's curve on ``model.thresholds``.
    title : str
    band : str
        The case's risk band, for the legend colour.
    """
    _check_model(model)
    t = model.thresholds
    levels = list(np.round(model.curve_quantile_levels, 6))
    q = model.curve_quantiles
    figure = _figure()
    ax = figure.add_subplot(1, 1, 1)

    def level(value: float) -> np.ndarray:
        return q[levels.index(value)] if value in levels else np.quantile(q, value, axis=0)

    ax.fill_between(t, level(0.05), level(0.95), color="0.85", label=f"calibration 5-95 % (n={model.n_cases})")
    ax.fill_between(t, level(0.25), level(0.75), color="0.65", label="calibration 25-75 %")
    ax.plot(t, level(0.5), color="0.3", linewidth=1.0, linestyle="--", label="calibration median")
    if curve is not None:
        curve = np.asarray(curve, dtype=float)
        if curve.shape != t.shape:
            raise SegXAIInputError(f"curve must have shape {t.shape} (the model's threshold grid), got {curve.shape}")
        ax.plot(t, curve, color=BAND_COLORS.get(band, "black"), linewidth=2.0,
                label="this case" + (f" ({band} risk)" if band else ""))
    ax.set_xlabel("normalised saliency threshold t (superlevel)")
    ax.set_ylabel("Euler characteristic chi(t)")
    ax.set_title(title or f"EC curve, {model.method}")
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return figure


def curve_figure(thresholds: np.ndarray, curve: np.ndarray, title: str = ""):
    """A case's EC curve alone (a QA without a risk model has no calibration cohort to draw).

    Parameters
    ----------
    thresholds, curve : ndarray, shape (T,)
    title : str
    """
    thresholds, curve = np.asarray(thresholds, dtype=float), np.asarray(curve, dtype=float)
    if thresholds.ndim != 1 or curve.shape != thresholds.shape:
        raise SegXAIInputError(f"curve must have the shape of thresholds {thresholds.shape}, got {curve.shape}")
    figure = _figure()
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(thresholds, curve, color="black", linewidth=2.0, label="this case")
    ax.set_xlabel("normalised saliency threshold t (superlevel)")
    ax.set_ylabel("Euler characteristic chi(t)")
    ax.set_title(title or "EC curve")
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return figure


def roc_figure(model: RiskModel, title: str = ""):
    """Calibration ROC of ``-PC1`` for insufficient contours, with the two cut points."""
    _check_model(model)
    fpr, tpr, _ = model.roc()
    figure = _figure(5.0, 4.6)
    ax = figure.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1.0)
    ax.plot(fpr, tpr, color="black", linewidth=1.8, label=f"AUROC {model.auroc:.3f} (CV {model.auroc_cv_mean:.3f})")
    for name, label, marker in (("high", "high-risk cut", "o"), ("low", "low-risk cut (review flag)", "s")):
        point = model.operating_points[name]
        cut = point["cut"]
        text = "-inf" if cut is None else f"{cut:.4g}"
        ax.plot(1 - point["specificity"], point["sensitivity"], marker=marker, markersize=9, linestyle="none",
                color=BAND_COLORS["high" if name == "high" else "moderate"], markeredgecolor="black",
                label=f"{label}: PC1 <= {text}")
    ax.axhline(model.sensitivity_target, color="0.5", linewidth=0.8, linestyle="--")
    ax.axvline(1 - model.specificity_target, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title or f"Calibration ROC ({model.n_insufficient} of {model.n_cases} insufficient)")
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def dice_figure(model: RiskModel, pc1: Optional[float] = None, title: str = ""):
    """Calibration Dice against PC1 with the sigmoid, the insufficient cut and the bands."""
    _check_model(model)
    x, dice = model.calibration_pc1, model.calibration_dice
    figure = _figure()
    ax = figure.add_subplot(1, 1, 1)
    span = float(np.ptp(x)) or 1.0
    low, high = float(x.min()) - 0.05 * span, float(x.max()) + 0.05 * span
    if pc1 is not None and math.isfinite(pc1):
        low, high = min(low, pc1 - 0.05 * span), max(high, pc1 + 0.05 * span)
    edges = [low, min(max(model.cut_high, low), high), min(max(model.cut_low, low), high), high]
    for (a, b), name in zip(zip(edges[:-1], edges[1:]), ("high", "moderate", "low")):
        if b > a:
            ax.axvspan(a, b, color=BAND_COLORS[name], alpha=0.12, label=f"{name} risk")
    bad = model.calibration_insufficient()
    ax.scatter(x[~bad], dice[~bad], s=18, color="0.3", label="calibration case")
    ax.scatter(x[bad], dice[bad], s=22, color=BAND_COLORS["high"], marker="x", label="insufficient (calibration)")
    grid = np.linspace(low, high, 200)
    ax.plot(grid, _sigmoid(grid, model.sigmoid_a, model.sigmoid_k, model.sigmoid_lambda0), color="black",
            linewidth=1.2, label="sigmoid fit")
    ax.axhline(model.insufficient_dice, color="0.5", linestyle="--", linewidth=0.8)
    if pc1 is not None:
        ax.axvline(pc1, color="black", linewidth=2.0, label="this case")
    ax.set_xlim(low, high)
    ax.set_xlabel("PC1 score (lambda_1)")
    ax.set_ylabel("Dice")
    ax.set_title(title or f"Dice vs PC1, {model.method}")
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return figure


def write_risk_plots(
    out_dir: str | os.PathLike,
    model: RiskModel,
    curve: Optional[np.ndarray] = None,
    result: Optional[dict] = None,
    prefix: str = "",
) -> dict[str, Path]:
    """Write ``<prefix>ec_curve.png``, ``<prefix>roc.png`` and ``<prefix>dice_pc1.png`` into
    ``out_dir`` (atomically); ``result`` is :meth:`RiskModel.score`'s dict for the case."""
    from .figures import save_figure

    out_dir = Path(out_dir)
    result = result or {}
    band = str(result.get("band", ""))
    written = {
        "ec_curve": save_figure(ec_curve_figure(model, curve, band=band), out_dir / f"{prefix}ec_curve.png"),
        "roc": save_figure(roc_figure(model), out_dir / f"{prefix}roc.png"),
        "dice_pc1": save_figure(dice_figure(model, result.get("pc1")), out_dir / f"{prefix}dice_pc1.png"),
    }
    return written
