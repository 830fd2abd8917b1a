"""Evaluation of attribution methods and aggregated explanations (papers 002, 003).

* :mod:`.metrics`: fidelity, pointing AUC, region Dice, faithfulness, sensitivity, complexity,
  efficiency and model-randomisation similarity of one map on one case (model grid);
* :mod:`.runner`: every metric for every method on a case, and the cohort tables
  (``segxai evaluate``);
* :mod:`.agg2exp`: Agg2Exp RoI importance matrices, the global matrix and graph, and
  Isolation-Forest outliers (``segxai agg2exp``);
* :mod:`.failure_detection`: statistics for judging reference-free QA scores as failure
  detectors (AURC, AUROC, DeLong, cluster bootstrap, Holm, partial Spearman, grouped CV).
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
from .failure_detection import (
    BootstrapResult,
    DeLongResult,
    PairedBootstrapResult,
    aurc,
    auroc,
    auroc_at_thresholds,
    cluster_bootstrap,
    delong_ci,
    delong_test,
    excess_aurc,
    holm,
    insufficient_at_quantile,
    optimal_aurc,
    out_of_fold_predictions,
    paired_bootstrap_difference,
    partial_spearman,
    repeated_grouped_folds,
    risk_coverage_curve,
    spearman,
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
    "BootstrapResult",
    "DeLongResult",
    "PairedBootstrapResult",
    "aurc",
    "auroc",
    "auroc_at_thresholds",
    "cluster_bootstrap",
    "delong_ci",
    "delong_test",
    "excess_aurc",
    "holm",
    "insufficient_at_quantile",
    "optimal_aurc",
    "out_of_fold_predictions",
    "paired_bootstrap_difference",
    "partial_spearman",
    "repeated_grouped_folds",
    "risk_coverage_curve",
    "spearman",
    "METRICS",
    "EvaluationConfig",
    "evaluate_case",
    "markdown_tables",
    "summarise",
]
