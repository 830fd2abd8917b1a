"""Agg2Exp: aggregated attributions of a segmentation model (paper 003; METHODS section 4).

Per case, every class c is explained with its class target (the sum of class-c logits over the
predicted class-c voxels), and the map ``a_c`` is aggregated over regions of interest (RoIs):
the local RoI importance (mass accuracy)

    ``I[c, r] = || a_c * M_r ||_1 / || a_c ||_1``

for every RoI r: the predicted region of every class (background included), plus extra RoIs
(reference masks, user masks). Variants: ``absolute`` (|a|), ``positive`` (max(a, 0)) and
``negative`` (max(-a, 0)); channels of a multi-channel map add up. A row sums to the share of
the attribution mass the RoIs cover: 1 when they partition the volume (the class regions do);
extra RoIs overlap the class regions, so a row with extra columns sums to more than 1.
Context use is the diagonal ``I[c, c]`` (mass inside the class's own segment).

Over a cohort: the global matrix (the mean of the local matrices, ignoring cases where a class
is not predicted), a graph of the top-k incoming edges of every class (JSON, and a PNG drawn
with matplotlib), and Isolation Forest outlier scores per class (scikit-learn), fitted on the
rows ``I[c, :]`` of a reference cohort and applied to new cases, with their Spearman
correlation against Dice (SciPy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..image import Image, SegXAIInputError

__all__ = [
    "IMPORTANCE_VARIANTS",
    "roi_importance",
    "ImportanceMatrix",
    "local_matrix",
    "class_rois",
    "CaseImportance",
    "global_matrix",
    "top_k_graph",
    "draw_graph",
    "matrix_figure",
    "OutlierModel",
    "spearman_with_dice",
    "cohort_outliers",
]

IMPORTANCE_VARIANTS = ("absolute", "positive", "negative")


def _mass(values: np.ndarray, variant: str) -> np.ndarray:
    """Per-voxel attribution mass ``(D, H, W)``: channels summed after the variant's transform."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 3:
        values = values[None]
    if values.ndim != 4:
        raise SegXAIInputError(f"attribution: expected (C, D, H, W) or (D, H, W), got shape {values.shape}")
    if variant == "absolute":
        return np.abs(values).sum(0)
    if variant == "positive":
        return np.maximum(values, 0.0).sum(0)
    if variant == "negative":
        return np.maximum(-values, 0.0).sum(0)
    raise SegXAIInputError(f"variant: expected one of {IMPORTANCE_VARIANTS}, got {variant!r}")


def roi_importance(attribution: np.ndarray, rois: Mapping[str, np.ndarray], variant: str = "absolute") -> np.ndarray:
    """``I[r] = ||a * M_r||_1 / ||a||_1`` for each RoI (bool masks ``(D, H, W)``), as ``(R,)``.

    ``attribution`` is ``(C, D, H, W)`` or ``(D, H, W)``; ``positive`` / ``negative`` count only
    that sign's mass (numerator and denominator). A map without mass gives a row of NaN.
    """
    mass = _mass(attribution, variant)
    total = float(mass.sum())
    row = np.full(len(rois), np.nan)
    for k, (name, mask) in enumerate(rois.items()):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != mass.shape:
            raise SegXAIInputError(f"RoI {name!r}: shape {mask.shape} differs from the map's {mass.shape}")
        if total > 0:
            row[k] = float(mass[mask].sum()) / total
    return row


@dataclass
class ImportanceMatrix:
    """``values[c, r]``: importance of RoI ``columns[r]`` for explaining class ``rows[c]``."""

    rows: list[str]
    columns: list[str]
    values: np.ndarray
    variant: str = "absolute"

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64).reshape(len(self.rows), len(self.columns))

    def context_use(self) -> dict[str, float]:
        """``I[c, c]`` for every class that is also a column (mass inside its own segment)."""
        return {c: float(self.values[i, self.columns.index(c)]) for i, c in enumerate(self.rows) if c in self.columns}

    def row(self, name: str) -> np.ndarray:
        return self.values[self.rows.index(name)]

    def aligned(self, columns: Sequence[str]) -> "ImportanceMatrix":
        """The same matrix over ``columns`` (NaN for RoIs this case lacks)."""
        values = np.full((len(self.rows), len(columns)), np.nan)
        for j, name in enumerate(columns):
            if name in self.columns:
                values[:, j] = self.values[:, self.columns.index(name)]
        return ImportanceMatrix(list(self.rows), list(columns), values, self.variant)

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "rows": list(self.rows), "columns": list(self.columns),
                "values": [[None if not math.isfinite(v) else float(v) for v in row] for row in self.values]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImportanceMatrix":
        values = np.array([[np.nan if v is None else float(v) for v in row] for row in data["values"]], dtype=float)
        return cls(list(data["rows"]), list(data["columns"]), values, data.get("variant", "absolute"))

    def markdown(self, digits: int = 3) -> str:
        lines = ["| explained \\ RoI | " + " | ".join(self.columns) + " |",
                 "|---|" + "---|" * len(self.columns)]
        for name, row in zip(self.rows, self.values):
            cells = ["" if not math.isfinite(v) else f"{v:.{digits}f}" for v in row]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        lines = ["explained," + ",".join(self.columns)]
        for name, row in zip(self.rows, self.values):
            lines.append(name + "," + ",".join("" if not math.isfinite(v) else repr(float(v)) for v in row))
        return "\n".join(lines) + "\n"


def local_matrix(maps: Mapping[str, Optional[np.ndarray]], rois: Mapping[str, np.ndarray],
                 variant: str = "absolute") -> ImportanceMatrix:
    """The local RoI importance matrix: one row per explained class (``maps``: class name ->
    attribution, None for a class without a map: a row of NaN), one column per RoI."""
    rows = []
    for name, attribution in maps.items():
        rows.append(np.full(len(rois), np.nan) if attribution is None else roi_importance(attribution, rois, variant))
    return ImportanceMatrix(list(maps), list(rois), np.array(rows).reshape(len(maps), len(rois)), variant)


def class_rois(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """One RoI per class: the voxels of a label map ``(D, H, W)`` predicted as that class."""
    labels = np.asarray(labels)
    return {name: labels == index for index, name in enumerate(class_names)}


# ---- one case ----------------------------------------------------------------------------------
@dataclass
class CaseImportance:
    """Agg2Exp of one case: the local matrices (per variant), Dice per class (with a reference),
    the seconds spent, and (optionally) the maps on the input grid."""

    case: str
    matrices: dict[str, ImportanceMatrix]
    dice: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    maps: dict[str, Image] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "dice": {k: float(v) for k, v in self.dice.items()}, "seconds": round(self.seconds, 3),
                "matrices": {v: m.to_dict() for v, m in self.matrices.items()},
                "context_use": {v: m.context_use() for v, m in self.matrices.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CaseImportance":
        return cls(str(data["case"]), {v: ImportanceMatrix.from_dict(m) for v, m in data["matrices"].items()},
                   {k: float(v) for k, v in (data.get("dice") or {}).items()}, float(data.get("seconds", 0.0)))


def _mask_on(image: Image, mask: Union[Image, np.ndarray], name: str) -> np.ndarray:
    if isinstance(mask, Image):
        if not mask.same_grid(image):
            raise SegXAIInputError(f"RoI {name!r}: not on the input image's grid (shape {mask.spatial_shape} vs "
                                   f"{image.spatial_shape}, or a different position / spacing / orientation)")
        array = mask.array[0]
    else:
        array = np.asarray(mask)
    if array.shape != image.spatial_shape:
        raise SegXAIInputError(f"RoI {name!r}: shape {array.shape} differs from the image's {image.spatial_shape}")
    return array


# ---- cohort ------------------------------------------------------------------------------------
def global_matrix(matrices: Sequence[ImportanceMatrix]) -> ImportanceMatrix:
    """The mean of local matrices over cases (cells missing in a case, e.g. a class it does not
    predict, are left out of that cell's mean). Rows must agree; columns are the union, in
    order of first appearance."""
    if not matrices:
        raise SegXAIInputError("global_matrix: no case matrices")
    rows = list(matrices[0].rows)
    columns: list[str] = []
    for matrix in matrices:
        if list(matrix.rows) != rows:
            raise SegXAIInputError(f"global_matrix: explained classes differ ({matrix.rows} vs {rows})")
        columns.extend(c for c in matrix.columns if c not in columns)
    stack = np.stack([m.aligned(columns).values for m in matrices])
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(stack).sum(0)
        mean = np.where(counts > 0, np.nansum(stack, 0) / np.maximum(counts, 1), np.nan)
    return ImportanceMatrix(rows, columns, mean, matrices[0].variant)


def top_k_graph(matrix: ImportanceMatrix, k: int = 3, include_self: bool = False) -> dict[str, Any]:
    """For every explained class, its ``k`` strongest incoming edges ``RoI -> class`` (weight
    ``I[class, RoI]``), strongest first. Self-edges (context use) are left out unless
    ``include_self``; every node carries its context use."""
    if k < 1:
        raise SegXAIInputError(f"top-k: k must be >= 1, got {k}")
    context = matrix.context_use()
    edges = []
    for i, name in enumerate(matrix.rows):
        candidates = [(float(v), matrix.columns[j]) for j, v in enumerate(matrix.values[i])
                      if math.isfinite(v) and (include_self or matrix.columns[j] != name)]
        candidates.sort(key=lambda t: (-t[0], t[1]))
        for rank, (weight, source) in enumerate(candidates[:k], start=1):
            edges.append({"source": source, "target": name, "weight": weight, "rank": rank})
    nodes = list(dict.fromkeys([*matrix.rows, *(e["source"] for e in edges)]))
    return {
        "variant": matrix.variant,
        "k": int(k),
        "nodes": [{"id": n, "explained": n in matrix.rows, "context_use": context.get(n)} for n in nodes],
        "edges": edges,
    }


def draw_graph(graph: Mapping[str, Any], path: Union[str, Path], title: str = "") -> Path:
    """Draw a :func:`top_k_graph` as a PNG (nodes on a circle, arrows RoI -> class with width
    and label by weight; an explained node's label shows its context use). Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    from ..io import atomic_path

    nodes = [n["id"] for n in graph["nodes"]]
    angles = np.linspace(0, 2 * np.pi, len(nodes), endpoint=False) + np.pi / 2
    position = {n: (np.cos(a), np.sin(a)) for n, a in zip(nodes, angles)}
    figure, axes = plt.subplots(figsize=(6.4, 6.4), dpi=100)
    peak = max([e["weight"] for e in graph["edges"]] or [1.0]) or 1.0
    for edge in graph["edges"]:
        (x0, y0), (x1, y1) = position[edge["source"]], position[edge["target"]]
        width = 0.5 + 5.0 * edge["weight"] / peak
        axes.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=14 + 2 * width,
                                       linewidth=width, color="tab:red", alpha=0.7, shrinkA=22, shrinkB=22,
                                       connectionstyle="arc3,rad=0.15"))
        axes.text(0.55 * x0 + 0.45 * x1, 0.55 * y0 + 0.45 * y1, f"{edge['weight']:.2f}", fontsize=8, ha="center",
                  va="center", bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    for node in graph["nodes"]:
        x, y = position[node["id"]]
        colour = "tab:blue" if node["explained"] else "tab:gray"
        axes.scatter([x], [y], s=900, color=colour, alpha=0.85, zorder=3)
        label = node["id"]
        if node.get("context_use") is not None:
            label += f"\ncontext {node['context_use']:.2f}"
        axes.text(x * 1.28, y * 1.28, label, ha="center", va="center", fontsize=9)
    axes.set_xlim(-1.6, 1.6)
    axes.set_ylim(-1.6, 1.6)
    axes.set_aspect("equal")
    axes.axis("off")
    axes.set_title(title or f"Agg2Exp: top-{graph['k']} incoming edges ({graph['variant']})", fontsize=10)
    path = Path(path)
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png")
    finally:
        plt.close(figure)
    return path


def matrix_figure(matrix: ImportanceMatrix, title: str = ""):
    """An importance matrix as a heat map (rows: explained classes, columns: RoIs; each cell
    its share of the row's attribution mass, written in the cell). Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    values = np.asarray(matrix.values, dtype=float)
    figure = Figure(figsize=(1.6 + 1.25 * len(matrix.columns), 1.3 + 0.55 * len(matrix.rows)))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (r, c), value in np.ndenumerate(values):
        text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
        axes.text(c, r, text, ha="center", va="center", fontsize=9,
                  color="white" if np.isfinite(value) and value < 0.55 else "black")
    axes.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=30, ha="right", fontsize=9)
    axes.set_yticks(range(len(matrix.rows)), matrix.rows, fontsize=9)
    axes.set_xlabel("region of interest")
    axes.set_ylabel("explained class")
    axes.set_title(title or f"Agg2Exp importance ({matrix.variant} mass)", fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    figure.tight_layout()
    return figure


# ---- outliers ----------------------------------------------------------------------------------
class OutlierModel:
    """Isolation Forests, one per explained class, on the rows ``I[c, :]`` of local matrices.

    ``fit`` takes the reference cohort's matrices; ``score`` gives new cases an anomaly score
    per class (``-score_samples``: higher = more anomalous; about 0.5 for typical cases of the
    reference, towards 1 for isolated ones). Rows with NaN (class not predicted, RoI missing)
    are left out of fitting and score NaN.
    """

    def __init__(self, n_estimators: int = 100, seed: int = 0) -> None:
        self.n_estimators = int(n_estimators)
        self.seed = int(seed)
        self.forests: dict[str, Any] = {}
        self.columns: list[str] = []
        self.fitted_on: dict[str, int] = {}

    def fit(self, matrices: Sequence[ImportanceMatrix]) -> "OutlierModel":
        from sklearn.ensemble import IsolationForest

        cohort = global_matrix(matrices)  # checks the rows, and gives the column union
        self.columns = list(cohort.columns)
        aligned = [m.aligned(self.columns) for m in matrices]
        for i, name in enumerate(cohort.rows):
            rows = np.array([m.values[i] for m in aligned])
            rows = rows[np.all(np.isfinite(rows), axis=1)]
            if len(rows) < 2:
                continue
            forest = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed)
            self.forests[name] = forest.fit(rows)
            self.fitted_on[name] = int(len(rows))
        if not self.forests:
            raise SegXAIInputError("outliers: the reference cohort needs at least 2 cases with every class predicted")
        return self

    def score(self, matrix: ImportanceMatrix) -> dict[str, float]:
        """Anomaly score per class of one case (NaN where the class has no full row)."""
        aligned = matrix.aligned(self.columns)
        scores = {}
        for name in aligned.rows:
            row = aligned.row(name)
            if name not in self.forests or not np.all(np.isfinite(row)):
                scores[name] = float("nan")
            else:
                scores[name] = float(-self.forests[name].score_samples(row[None])[0])
        return scores


def spearman_with_dice(scores: Sequence[float], dice: Sequence[float]) -> dict[str, Any]:
    """Spearman rank correlation (SciPy) between anomaly scores and Dice over the cases where
    both are finite: ``{"rho", "p_value", "n"}`` (rho and p NaN with fewer than 3 cases or a
    constant side)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(scores, float), np.asarray(dice, float)
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    if n < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return {"rho": float("nan"), "p_value": float("nan"), "n": n}
    result = spearmanr(a[ok], b[ok])
    return {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": n}


def cohort_outliers(
    results: Sequence[CaseImportance],
    variant: str = "absolute",
    classes: Sequence[str] = (),
    reference: Optional[Sequence[CaseImportance]] = None,
    n_estimators: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Outlier scores of a cohort's cases (:class:`OutlierModel`) and their Spearman correlation
    with Dice (:func:`spearman_with_dice`).

    Parameters
    ----------
    results : sequence of CaseImportance
        The cases to score (:func:`agg2exp_case`), with distinct ``case`` names.
    variant : str
        Which importance matrices (one of :data:`IMPORTANCE_VARIANTS`).
    classes : sequence of str
        The classes whose scores are correlated with their Dice, in this order (the model's
        foreground classes); a class with no Dice in any case is left out.
    reference : sequence of CaseImportance, optional
        The reference cohort the forests are fitted on; default ``results`` (in-sample scores).
    n_estimators, seed
        Of the Isolation Forests.

    Returns
    -------
    dict
        ``fitted_rows`` (class -> reference rows fitted), ``scores`` (case -> class -> score,
        NaN where a class has no full row) and ``spearman_vs_dice`` (class -> ``{"rho",
        "p_value", "n"}``, plus ``"mean over classes"``: each case's mean score over its classes
        against its mean Dice, when any class has a Dice); or only ``skipped`` (why) when the
        reference cohort cannot fit a forest (fewer than 2 full rows for every class).
    """
    fitted = results if reference is None else reference
    for case in fitted:
        if variant not in case.matrices:
            name = "results" if reference is None else "reference"
            raise SegXAIInputError(f"{name}: case {case.case!r} has no {variant!r} importance matrix")
    try:
        forest = OutlierModel(n_estimators, seed).fit([r.matrices[variant] for r in fitted])
    except SegXAIInputError as error:
        return {"skipped": str(error)}
    scores = {r.case: forest.score(r.matrices[variant]) for r in results}
    correlations = {}
    for name in classes:
        if any(name in r.dice for r in results):
            correlations[name] = spearman_with_dice([scores[r.case].get(name, np.nan) for r in results],
                                                    [r.dice.get(name, np.nan) for r in results])
    if correlations:
        mean_scores = [np.nanmean(list(scores[r.case].values())) if scores[r.case] else np.nan for r in results]
        mean_dice = [np.mean(list(r.dice.values())) if r.dice else np.nan for r in results]
        correlations["mean over classes"] = spearman_with_dice(mean_scores, mean_dice)
    return {"fitted_rows": forest.fitted_on, "scores": scores, "spearman_vs_dice": correlations}
