"""Evaluation of attribution methods and aggregated explanations (papers 002, 003).

* :mod:`.metrics`: fidelity, pointing AUC, region Dice, faithfulness, sensitivity, complexity,
  efficiency and model-randomisation similarity of one map on one case (model grid);
* :mod:`.runner`: every metric for every method on a case, and the cohort tables
  (``segxai evaluate``);
* :mod:`.agg2exp`: Agg2Exp RoI importance matrices, the global matrix and graph, and
  Isolation-Forest outliers (``segxai agg2exp``).
"""

from .agg2exp import (
    IMPORTANCE_VARIANTS,
    CaseImportance,
    ImportanceMatrix,
    OutlierModel,
    class_rois,
    cohort_outliers,
    draw_graph,
    global_matrix,
    local_matrix,
    matrix_figure,
    roi_importance,
    spearman_with_dice,
    top_k_graph,
)
from .runner import METRICS, EvaluationConfig, evaluate_case, markdown_tables, summarise

__all__ = [
    "IMPORTANCE_VARIANTS",
    "CaseImportance",
    "ImportanceMatrix",
    "OutlierModel",
    "class_rois",
    "cohort_outliers",
    "draw_graph",
    "global_matrix",
    "local_matrix",
    "matrix_figure",
    "roi_importance",
    "spearman_with_dice",
    "top_k_graph",
    "METRICS",
    "EvaluationConfig",
    "evaluate_case",
    "markdown_tables",
    "summarise",
]
