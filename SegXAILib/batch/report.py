"""``cohort_report``: the analyses of a batch folder (``segxai batch-report DIR``).

Writes, into the batch folder of :func:`~SegXAILib.batch.run_batch`:

* ``cases/<id>/report.html`` (and its ``figures/``) for every finished case
  (:func:`~SegXAILib.report.case_report.write_case_report`), listed in that case's manifest
  (``add_to_manifest``), so the folder still verifies and a rerun of the batch still skips it;
* ``cohort.html``: one row per case (status, the error of a failed one, structure volume,
  instances, QA band and estimated Dice, the structure's uncertainty, the Dice against its
  reference, a link to its report), the Agg2Exp global matrix and Isolation-Forest outliers over
  the cases that have a matrix (:mod:`SegXAILib.evaluation.agg2exp`, as ``segxai agg2exp`` builds
  them), and, when asked, the QA risk model calibrated on the batch
  (:func:`~SegXAILib.topology.calibrate_cohort`): ``risk_<method>.json`` and its plots;
* ``cohort_report.json``: the same rows, the global matrix and the outlier scores, machine-readable.

The evaluation tables of attribution methods over the batch (:func:`~SegXAILib.batch.evaluate_batch`,
``segxai batch-evaluate``: ``evaluation/evaluation.{md,csv,json}``) are linked and shown in
``cohort.html`` when they exist.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..image import SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report
from .evaluate import EVALUATION_DIR

__all__ = ["cohort_report", "COHORT_REPORT", "COHORT_SUMMARY", "COHORT_COLUMNS"]

COHORT_REPORT = "cohort.html"
COHORT_SUMMARY = "cohort_report.json"
#: the cohort table's columns: key of a row of ``cohort_report.json`` -> column title of ``cohort.html``
COHORT_COLUMNS = {
    "case": "case",
    "status": "status",
    "error": "error",
    "structure_volume_mm3": "structure volume (mm^3)",
    "instances": "instances",
    "qa_band": "QA band",
    "qa_estimated_dice": "estimated Dice (QA)",
    "uncertainty_mean_entropy": "mean entropy (nats)",
    "uncertainty_pairwise_dice": "pairwise Dice (samples)",
    "dice_reference": "Dice vs reference",
    "report": "report",
}
#: statuses of a case whose folder is finished
_FINISHED = ("done", "skipped")


def _case_row(batch_dir: Path, record: dict[str, Any], cancel: Optional[CancelToken]):
    """``(row, case or None)`` of one batch record; a finished case's report written and listed."""
    from ..pipeline import add_to_manifest, read_case, read_manifest
    from ..report.case_report import write_case_report
    from ..topology import batch_case_dice

    identifier = str(record["id"])
    row: dict[str, Any] = {"case": identifier, "status": record.get("status", "pending")}
    if row["status"] == "failed":
        row["error"] = record.get("error", "")
        row["failure"] = record.get("failure") or f"failures/{identifier}.json"
        return row, None
    if row["status"] not in _FINISHED:
        return row, None
    folder = batch_dir / "cases" / identifier
    try:
        case = read_case(folder, verify=True)
        dice = batch_case_dice(folder)
    except SegXAIInputError as error:  # a folder changed since the run: listed, not shown
        row.update(status="unreadable", error=str(error))
        return row, None
    extra = {"case": identifier, **({"Dice against the reference": dice} if dice is not None else {})}
    path = write_case_report(case, folder, title=f"SegXAI case {identifier}: {case.structure} ({case.card.name})",
                             extra_summary=extra, cancel=cancel)
    add_to_manifest(folder, {"report": path})
    summary = read_manifest(folder, verify=False)["summary"]
    row.update({
        "structure_volume_mm3": summary["structure_volume_mm3"],
        "instances": summary["instances"],
        "qa_band": summary.get("qa_band"),
        "qa_estimated_dice": summary.get("qa_estimated_dice"),
        "uncertainty_mean_entropy": summary.get("uncertainty_mean_entropy"),
        "uncertainty_pairwise_dice": summary.get("uncertainty_pairwise_dice"),
        "dice_reference": dice,
        "report": path.relative_to(batch_dir).as_posix(),
    })
    return row, case


def _agg2exp(cases: dict[str, Any], dice: dict[str, Optional[float]], n_estimators: int, seed: int):
    """``(global matrix, outliers dict, variant)`` over the cases with a matrix, or None."""
    from ..evaluation.agg2exp import CaseImportance, cohort_outliers, global_matrix

    with_matrix = {identifier: case for identifier, case in cases.items() if case.agg2exp is not None}
    if not with_matrix:
        return None
    first = next(iter(with_matrix.values()))
    variant = first.agg2exp.variant
    # as segxai agg2exp: one CaseImportance per case (Dice of the structure when it had a reference)
    results = [CaseImportance(identifier, {variant: case.agg2exp},
                              {case.structure: dice[identifier]} if dice.get(identifier) is not None else {})
               for identifier, case in with_matrix.items()]
    matrix = global_matrix([r.matrices[variant] for r in results])
    outliers: dict[str, Any] = {"fitted_on": "this batch's cases (in-sample scores)", "reference_cases": len(results),
                                "variant": variant, "n_estimators": n_estimators, "seed": seed}
    with warnings.catch_warnings():
        # a case whose every class row is incomplete (e.g. no background mass) has a NaN mean score
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        outliers.update(cohort_outliers(results, variant, first.card.class_names[1:], n_estimators=n_estimators,
                                        seed=seed))
    return matrix, outliers, variant


def _add_markdown(html, text: str) -> None:
    """The Markdown of :func:`~SegXAILib.evaluation.markdown_tables` as report sections: headings
    (one level below the report's section), paragraphs and pipe tables as tables."""
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            header, *body = table
            html.add_table([dict(zip(header, cells)) for cells in body], columns=header)
            table.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [cell.strip() for cell in stripped.strip("|").split("|")]
            if not all(set(cell) <= set("-: ") and cell for cell in cells):  # the separator row is layout only
                table.append(cells)
            continue
        flush()
        if stripped.startswith("#"):
            level = len(stripped) - len(stripped.lstrip("#"))
            html.add_heading(stripped[level:].strip(), min(6, level + 2))
        elif stripped:
            html.add_paragraph(stripped)
    flush()


def qa_benchmark_rows(calibrations: Sequence[tuple[Any, Sequence[str]]],
                      volumes: dict[str, Optional[float]]) -> list[dict[str, Any]]:
    """One row per risk model: its cases, insufficient cases, training and cross-validated
    AUROC, and the AUROC of the predicted volume on the same cases as a baseline.

    Parameters
    ----------
    calibrations : sequence of (RiskModel, case ids)
        Each model with the ids of its calibration cases, in its calibration order.
    volumes : dict
        Case id -> predicted structure volume (mm^3).

    Returns
    -------
    list of dict
        ``method``, ``cases``, ``insufficient``, ``auroc_pc1``, ``auroc_pc1_cv``,
        ``auroc_volume`` (the better of small-is-bad and large-is-bad: optimistic) and
        ``volume_direction``.
    """
    from sklearn.metrics import roc_auc_score

    rows = []
    for model, ids in calibrations:
        insufficient = model.calibration_insufficient()
        volume = np.array([float(volumes.get(case) or 0.0) for case in ids])
        auroc_volume, direction = None, ""
        if 0 < insufficient.sum() < len(insufficient):
            small = float(roc_auc_score(insufficient, -volume))  # small volume flags
            auroc_volume, direction = (small, "small") if small >= 0.5 else (1.0 - small, "large")
        rows.append({"method": model.method, "cases": int(model.n_cases), "insufficient": int(insufficient.sum()),
                     "auroc_pc1": float(model.auroc), "auroc_pc1_cv": float(model.auroc_cv_mean),
                     "auroc_volume": auroc_volume, "volume_direction": direction})
    return rows


def cohort_report(
    batch_dir: Union[str, os.PathLike],
    calibrate: Union[None, str, Sequence[str]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    n_estimators: int = 100,
    seed: int = 0,
    **calibration_options: Any,
) -> Path:
    """Write the cohort analyses of a batch folder (module docstring); returns ``cohort.html``.

    Parameters
    ----------
    batch_dir : path-like
        A batch folder of :func:`~SegXAILib.batch.run_batch` (``batch.json``).
    calibrate : str or sequence of str, optional
        Class-level maps of the batch's settings (``"all"``: every one): calibrate the QA risk
        model of each on the finished cases with a reference (at least 10), writing
        ``risk_<map>.json`` and ``risk_<map>_{ec_curve,roc,dice_pc1}.png`` into the batch
        folder, and benchmark them side by side on the same cases with the predicted volume as
        the baseline detector (:func:`qa_benchmark_rows`).
    progress, cancel
        ``progress(fraction, "case c03")``; ``cancel`` stops between cases.
    n_estimators, seed : int
        Of the Agg2Exp outliers' Isolation Forests.
    calibration_options
        To :func:`~SegXAILib.topology.risk.calibrate_risk_model` (``insufficient_quantile``,
        ``sensitivity_target``, ``specificity_target``, ``cv_folds``, ``n_components``).

    Raises
    ------
    SegXAIInputError
        Not a batch folder; ``calibrate`` not a map of the batch's settings, or too few cases to
        calibrate on.
    """
    from ..evaluation import matrix_figure
    from ..pipeline import CaseSettings, write_json
    from ..report import HtmlReport, LinkCell
    from ..report.risk_plots import write_risk_plots
    from ..topology import calibrate_cohort
    from ..topology.cohort import read_batch_summary

    batch_dir = Path(batch_dir)
    document = read_batch_summary(batch_dir)
    settings = CaseSettings.from_dict(document.get("settings"), f"batch {batch_dir / 'batch.json'}: settings")
    maps = [m.name for m in settings.methods]
    names = ([] if calibrate is None else maps if calibrate == "all" else
             [calibrate] if isinstance(calibrate, str) else list(calibrate))
    for name in names:
        if name not in maps:
            raise SegXAIInputError(f"method {name!r}: not a class-level map of the batch {batch_dir} (its settings' "
                                   f"methods are {maps})")
    records = list(document["cases"])

    # the calibrations first: a request that cannot be met fails before anything is written
    fitted = []
    for number, name in enumerate(names):
        report(progress, 0.1 * number / len(names), f"calibrating the QA risk model on {name} maps")
        model, _, _, ids = calibrate_cohort(batch_dir, name, cancel=cancel, seed=seed, **calibration_options)
        fitted.append((name, model, ids))
    calibrations = []
    for name, model, ids in fitted:
        risk_path = model.save(batch_dir / f"risk_{name}.json")
        plots = write_risk_plots(batch_dir, model, prefix=f"risk_{name}_")
        calibrations.append((model, ids, risk_path, plots))

    rows: list[dict[str, Any]] = []
    cases: dict[str, Any] = {}
    for position, record in enumerate(records):
        if cancel is not None:
            cancel.raise_if_cancelled()
        report(progress, 0.1 + 0.8 * position / max(1, len(records)), f"case {record.get('id')}")
        row, case = _case_row(batch_dir, record, cancel)
        rows.append(row)
        if case is not None:
            cases[row["case"]] = case
    dice = {row["case"]: row.get("dice_reference") for row in rows}
    agg2exp = _agg2exp(cases, dice, n_estimators, seed)

    report(progress, 0.9, "cohort report")
    model_name = next(iter(cases.values())).card.name if cases else settings.model
    html = HtmlReport(f"SegXAI cohort: {len(records)} cases ({model_name})", batch_dir)
    counts = {s: sum(row["status"] == s for row in rows) for s in ("done", "skipped", "failed", "unreadable",
                                                                      "pending")}
    html.add_paragraph(
        f"The batch {batch_dir.resolve()} ({document.get('state', '')}): each case run through the case engine with "
        f"the same settings (model {settings.model}, structure "
        f"{next(iter(cases.values())).structure if cases else settings.class_name or 'the first foreground class'}). "
        "Each finished case links to its own report (maps, lesion table, QA, uncertainty, Agg2Exp). The Dice against "
        "the reference is computed from the reference label map recorded for the case (batch_case.json)."
    )
    html.add_key_values({"cases": len(records), **{k: v for k, v in counts.items() if v},
                         "settings": "settings.json", "batch summary": "batch.json"}, caption="Batch")
    table = []
    for row in rows:
        cells = {COHORT_COLUMNS[k]: row.get(k) for k in COHORT_COLUMNS if k not in ("report", "error")}
        cells[COHORT_COLUMNS["error"]] = row.get("error")
        if row.get("report"):
            cells[COHORT_COLUMNS["report"]] = LinkCell(row["report"], "report")
        elif row.get("failure"):
            cells[COHORT_COLUMNS["report"]] = LinkCell(row["failure"], "failure")
        table.append(cells)
    html.add_table(table, columns=list(COHORT_COLUMNS.values()), caption="Cases")

    html.add_heading("Agg2Exp over the cohort")
    if agg2exp is None:
        html.add_paragraph("No case has an Agg2Exp matrix (settings: agg2exp.enabled).")
    else:
        matrix, outliers, variant = agg2exp
        html.add_paragraph(
            f"The global matrix is the mean of the {outliers['reference_cases']} cases' local matrices ({variant} "
            "mass; a cell a case lacks is left out of that cell's mean), as segxai agg2exp makes it. Outliers: one "
            "Isolation Forest per explained class on the rows of the cases' matrices, fitted on this batch "
            "(in-sample scores: about 0.5 for typical cases, towards 1 for isolated ones), with the Spearman "
            "correlation against the Dice of the cases with a reference.")
        html.add_figure(matrix_figure(matrix, title=f"Agg2Exp global importance ({variant} mass)"),
                        caption="Agg2Exp global matrix", name="agg2exp_global")
        html.add_table([{"explained class": name, **{column: float(matrix.values[i, j])
                                                     for j, column in enumerate(matrix.columns)}}
                        for i, name in enumerate(matrix.rows)], caption="Agg2Exp global matrix")
        if "scores" in outliers:
            html.add_table([{"case": case, **{f"outlier score {name}": value for name, value in per_class.items()}}
                            for case, per_class in outliers["scores"].items()], caption="Agg2Exp outlier scores")
            if outliers.get("spearman_vs_dice"):
                html.add_table([{"class": name, **values} for name, values in outliers["spearman_vs_dice"].items()],
                               caption="Spearman correlation of the outlier scores with Dice")
        else:
            html.add_paragraph(f"Outliers not scored: {outliers.get('skipped')}")

    html.add_heading("QA calibration")
    if not calibrations:
        html.add_paragraph(
            "Not asked for. segxai batch-report DIR --calibrate MAP [MAP ...] (or all) calibrates the QA risk model "
            "(paper 000) of each class-level map on the finished cases with a reference (at least 10): risk_MAP.json, "
            "which qa.risk_model of later runs can use, its plots, and a benchmark of the maps against the predicted "
            "volume.")
    else:
        volumes = {row["case"]: row.get("structure_volume_mm3") for row in rows}
        benchmark = qa_benchmark_rows([(model, ids) for model, ids, _, _ in calibrations], volumes)
        html.add_paragraph(
            "The risk models side by side on their calibration cases, with the predicted structure volume as the "
            "baseline detector of the insufficient contours (Dice below the cohort's cut): a score that does not beat "
            "the volume adds nothing a size check would not give. The volume AUROC is taken in the direction that "
            "detects best (small or large volumes), so it is an optimistic baseline.")
        html.add_table(benchmark, caption="QA benchmark: AUROC for insufficient contours")
    for model, ids, risk_path, plots in calibrations:
        calibrate = model.method
        html.add_paragraph(
            f"The risk model calibrated on {model.n_cases} cases of this batch (those with a reference, a predicted "
            f"structure and the {calibrate} map), the EC curves of the {model.method} map inside the predicted "
            f"structure against their Dice: {risk_path.name}. Set qa.risk_model to it in later runs of this model.")
        html.add_key_values({
            "risk model": risk_path.name, "method": model.method, "cases": model.n_cases,
            "insufficient (Dice below)": f"{model.n_insufficient} ({model.insufficient_dice:.4f})",
            "AUROC (training)": model.auroc, "AUROC (cross-validated)": model.auroc_cv_mean,
            "high risk if PC1 <=": model.cut_high, "moderate if PC1 <=": model.cut_low,
            "calibration cases": ", ".join(ids)}, caption="Risk model")
        for name, path in plots.items():
            html.add_figure(path, caption=f"{name.replace('_', ' ')} of the calibration", name=f"calibration_{name}")

    html.add_heading("Evaluation of attribution methods")
    evaluation = batch_dir / EVALUATION_DIR / "evaluation.md"
    if evaluation.is_file():
        html.add_paragraph(
            "The evaluation tables of segxai batch-evaluate (SegXAILib.batch.evaluate_batch): the attribution methods "
            "scored on the finished cases with the prediction written in each case folder and the reference its "
            "batch_case.json records, mean ± sd over the cases. Per case, method and variant: evaluation.csv; the "
            "configuration, the methods' parameters and the curves: evaluation.json.")
        html.add_table([{"file": LinkCell(f"{EVALUATION_DIR}/{name}", name)}
                        for name in ("evaluation.md", "evaluation.csv", "evaluation.json")
                        if (batch_dir / EVALUATION_DIR / name).is_file()], caption="Evaluation tables")
        _add_markdown(html, evaluation.read_text(encoding="utf-8"))
    else:
        html.add_paragraph(
            "Not made yet. segxai batch-evaluate DIR --methods M,M scores attribution methods (fidelity, pointing, "
            "faithfulness, sensitivity, complexity, randomisation, ...) on the finished cases of the batch, with the "
            "predictions written in the case folders: DIR/evaluation/evaluation.{md,csv,json}, shown here by the "
            "next segxai batch-report.")

    summary = {"format": "segxai-cohort-report", "version": 1, "batch": "batch.json",
               "columns": COHORT_COLUMNS, "cases": rows}
    if agg2exp is not None:
        matrix, outliers, variant = agg2exp
        summary["agg2exp"] = {"variant": variant, "global": matrix.to_dict(),
                              "context_use": matrix.context_use(), "outliers": outliers}
    if evaluation.is_file():
        summary["evaluation"] = {name: f"{EVALUATION_DIR}/{name}" for name in
                                 ("evaluation.md", "evaluation.csv", "evaluation.json")}
    if calibrations:
        summary["calibration"] = [{"risk_model": path.name, "method": model.method, "cases": ids,
                                   "plots": {k: Path(v).name for k, v in plots.items()}}
                                  for model, ids, path, plots in calibrations]
        summary["qa_benchmark"] = qa_benchmark_rows([(model, ids) for model, ids, _, _ in calibrations],
                                                    {row["case"]: row.get("structure_volume_mm3") for row in rows})
    write_json(summary, batch_dir / COHORT_SUMMARY)
    path = html.write(COHORT_REPORT)
    report(progress, 1.0, "done")
    return path
