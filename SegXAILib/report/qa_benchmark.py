"""``segxai qa benchmark``: the QA detector tables of one or more cohorts as JSON, Markdown and
risk-coverage plots (:func:`SegXAILib.qa.benchmark.benchmark_cohort` on each cohort).

Files (atomic): ``qa_benchmark.json`` (every number), ``qa_benchmark.md`` (one table per
cohort, best detector first, then the paired comparisons), ``qa_risk_coverage_<cohort>.png``
(selective risk against coverage) and ``qa_auroc_thresholds_<cohort>.png`` (AUROC across Dice
thresholds), each for the best detector of every family.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..image import SegXAIInputError
from ..io import atomic_path, check_writable_dir
from ..progress import ProgressCallback, report, sub_progress
from ..qa.benchmark import BENCHMARK_VERSION, benchmark_cohort, benchmark_markdown
from ..qa.cohort_table import read_cohort_table

__all__ = ["write_benchmark", "risk_coverage_figure", "auroc_threshold_figure"]


def _best_per_family(result: dict[str, Any]) -> list[dict[str, Any]]:
    best: dict[str, dict] = {}
    for row in result["rows"]:
        if row["family"] == "ablation":
            continue
        if row["family"] not in best or row["aurc"] < best[row["family"]]["aurc"]:
            best[row["family"]] = row
    return sorted(best.values(), key=lambda row: row["aurc"])


def risk_coverage_figure(result: dict[str, Any], title: str = ""):
    """Selective risk (mean 1 - Dice of the accepted cases) against coverage for the best
    detector (lowest AURC) of each family, with the oracle."""
    from ..evaluation.failure_detection import risk_coverage_curve
    from .risk_plots import _figure

    risk = 1.0 - np.asarray(result["dice_values"])
    figure = _figure(6.4, 4.4)
    axes = figure.add_subplot(1, 1, 1)
    coverage, selective = risk_coverage_curve(risk, risk)
    axes.plot(coverage, selective, color="black", linestyle=":", label=f"oracle (AURC {result['optimal_aurc']:.3f})")
    for row in _best_per_family(result):
        coverage, selective = risk_coverage_curve(np.asarray(result["scores"][row["detector"]]), risk)
        axes.plot(coverage, selective, label=f"{row['detector']} ({row['aurc']:.3f})")
    axes.set_xlabel("coverage (fraction of contours accepted)")
    axes.set_ylabel("selective risk (mean 1 - Dice)")
    axes.set_title(title)
    axes.legend(fontsize=6, loc="upper left")
    figure.tight_layout()
    return figure


def auroc_threshold_figure(result: dict[str, Any], title: str = ""):
    """AUROC for "Dice below t" against t (where both classes exist) for the best detector of
    each family: does the ranking hold at every definition of insufficient?"""
    from ..evaluation.failure_detection import auroc
    from .risk_plots import _figure

    dice = np.asarray(result["dice_values"])
    grid = np.quantile(dice, np.linspace(0.05, 0.5, 19))
    figure = _figure(6.4, 4.4)
    axes = figure.add_subplot(1, 1, 1)
    for row in _best_per_family(result):
        scores = np.asarray(result["scores"][row["detector"]])
        values = [auroc(scores, dice < t) if 0 < (dice < t).sum() < dice.size else np.nan for t in grid]
        axes.plot(grid, values, marker=".", label=row["detector"])
    axes.axhline(0.5, color="grey", linewidth=0.8)
    axes.set_xlabel("Dice threshold t (insufficient = Dice < t; 5 % to 50 % quantiles)")
    axes.set_ylabel("AUROC")
    axes.set_title(title)
    axes.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    return figure


def _cached(path: Path, key: dict[str, Any]) -> Optional[dict[str, Any]]:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("key") == key else None


def _family_best(result: dict[str, Any], family: str) -> Optional[dict[str, Any]]:
    rows = [r for r in result["rows"] if r["family"] == family]
    return min(rows, key=lambda r: r["aurc"]) if rows else None


def summary_markdown(results: dict[str, dict[str, Any]]) -> str:
    """One row per cohort: admission, the best detector, and the AURC [95 % CI] of the best of
    each of the families a reader compares first (saliency EC PC1, uncertainty, softmax, the
    predicted volume, random)."""
    def cell(row: Optional[dict[str, Any]]) -> str:
        if row is None:
            return "n/a"
        return f"{row['detector']}: {row['aurc']:.3f} [{row['aurc_ci'][0]:.3f}, {row['aurc_ci'][1]:.3f}]"

    lines = ["| cohort | cases (insufficient) | admitted | oracle AURC | best detector | best saliency EC PC1 | "
             "best uncertainty | best softmax | predicted volume | random |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        rows = {r["detector"]: r for r in result["rows"]}
        lines.append(
            f"| {name} | {result['n_cases']} ({result['n_insufficient']}) | "
            f"{'yes' if result['admission']['admitted'] else 'no: ' + result['admission']['reason']} | "
            f"{result['optimal_aurc']:.3f} | {cell(rows[result['best']])} | {cell(_family_best(result, 'saliency'))} | "
            f"{cell(_family_best(result, 'uncertainty'))} | {cell(_family_best(result, 'softmax'))} | "
            f"{cell(_family_best(result, 'volume'))} | {cell(rows.get('random'))} |")
    return "\n".join(lines) + "\n"


def write_benchmark(
    cohort_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    n_splits: int = 5,
    n_repeats: int = 10,
    n_resamples: int = 2000,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
) -> list[Path]:
    """Benchmark every cohort of ``cohort_dirs`` and write the files into ``out_dir``.

    Cohorts are named by their ``cohort`` entry (a user cohort by its folder name). Each
    cohort's result is also written as ``qa_benchmark_<cohort>.json`` with the checksum of its
    ``cohort.json`` and the settings, and reused when both are unchanged. Returns the paths
    written.
    """
    from .figures import save_figure

    if not cohort_dirs:
        raise SegXAIInputError("cohort_dirs: give at least one cohort folder")
    loaded = []
    for path in cohort_dirs:  # every folder is read before anything is written
        document, cases, curves = read_cohort_table(path)
        name = document.get("cohort", "user")
        name = Path(path).name if name == "user" else name
        loaded.append((name, Path(path), document, cases, curves))
    names = [item[0] for item in loaded]
    if len(set(names)) != len(names):
        raise SegXAIInputError(f"cohort_dirs: two folders hold the same cohort ({names})")
    out_dir = check_writable_dir(out_dir)
    settings = {"n_splits": n_splits, "n_repeats": n_repeats, "n_resamples": n_resamples, "seed": seed,
                "version": BENCHMARK_VERSION}
    results: dict[str, Any] = {}
    markdown = ["# QA detectors judged on the same cases", "",
                "Made by `segxai qa benchmark` (QA_PROTOCOL.md). Risk = 1 - Dice; AURC is the primary metric "
                "(lower is better; excess AURC = AURC - the oracle's). Fitted detectors (EC PC1, regressor, "
                "combinations) are scored out of fold: grouped K-fold by phantom / scan, repeated; 95 % CIs by "
                "cluster bootstrap.", ""]
    written = []
    for index, (name, path, document, cases, curves) in enumerate(loaded):
        step = sub_progress(progress, index / len(loaded), (index + 1) / len(loaded))
        report(step, 0.0, f"{name}: {len(cases)} cases")
        methods = list(document["methods"])
        # one cohort's result is kept beside the tables and reused while the cohort and the settings
        # are the same (a benchmark of several large cohorts is long; adding one redoes only it)
        key = {"cohort_sha256": hashlib.sha256((path / "cohort.json").read_bytes()).hexdigest(), **settings}
        cached = out_dir / f"qa_benchmark_{name}.json"
        result = _cached(cached, key)
        if result is None:
            result = benchmark_cohort(cases, curves, methods, n_splits=n_splits, n_repeats=n_repeats,
                                      n_resamples=n_resamples, seed=seed)
            result.update(cohort=name, folder=str(path), model=document["model"], source=document.get("source", ""),
                          methods=methods, complete=bool(document.get("complete")), key=key)
            with atomic_path(cached) as temporary:
                temporary.write_text(json.dumps(result, allow_nan=False) + "\n", encoding="utf-8")
        written.append(cached)
        results[name] = result
        description = (f"Model `{document['model'].get('card_name')}`; {document.get('source', '')}; "
                       f"methods {', '.join(methods)}.")
        markdown.append(benchmark_markdown(name, result, description))
        written.append(save_figure(risk_coverage_figure(result, title=name), out_dir / f"qa_risk_coverage_{name}.png"))
        written.append(save_figure(auroc_threshold_figure(result, title=name),
                                   out_dir / f"qa_auroc_thresholds_{name}.png"))
        report(step, 1.0, f"{name}: best {result['best']}")
    markdown[4:4] = ["## Summary (AURC [95 % CI], lower is better)", "", summary_markdown(results)]
    json_path = out_dir / "qa_benchmark.json"
    with atomic_path(json_path) as temporary:
        temporary.write_text(json.dumps({"format": "segxai-qa-benchmark", "version": 1, "cohorts": results},
                                        indent=1, allow_nan=False) + "\n", encoding="utf-8")
    md_path = out_dir / "qa_benchmark.md"
    with atomic_path(md_path) as temporary:
        temporary.write_text("\n".join(markdown), encoding="utf-8")
    return [json_path, md_path] + written
