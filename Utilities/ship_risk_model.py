"""Ship the risk model the QA benchmark table names (issue 18: what ships follows the table).

Reads a ``qa_benchmark.json`` (``segxai qa benchmark``), takes the cohort's best detector that
a risk model can carry (:func:`SegXAILib.qa.benchmark.best_shippable`: an EC PC1 of a saliency
method, or a one-sided reference-free score as ``feature:<score>``), calibrates it on the same
cohort folder (:func:`SegXAILib.topology.cohort.calibrate_cohort`, as ``segxai qa calibrate``)
and writes ``Resources/Models/<model>/risk_<method>.json``, replacing the
model's other shipped risk models. It prints the ``bundled:<model>/<method>`` name to put in
the settings presets.

Usage::

    python Utilities/ship_risk_model.py --benchmark Testing/Benchmarks/results/qa_benchmark.json \\
        --cohort-name c2_lesions --cohort /path/to/c2_lesions --model lesions
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from SegXAILib.qa.benchmark import best_shippable
    from SegXAILib.topology.cohort import calibrate_cohort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", type=Path, required=True)
    parser.add_argument("--cohort-name", required=True)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--model", required=True, help="the folder under Resources/Models")
    args = parser.parse_args(argv)

    result = json.loads(args.benchmark.read_text(encoding="utf-8"))["cohorts"][args.cohort_name]
    method, row = best_shippable(result)
    model, _, _, _ = calibrate_cohort(args.cohort, method, seed=0)
    folder = ROOT / "Resources" / "Models" / args.model
    stem = f"risk_{method.replace(':', '_')}"
    for old in folder.glob("risk_*"):
        if not old.name.startswith(stem + "."):
            old.unlink()
    path = model.save(folder / f"{stem}.json")
    print(f"{row['detector']}: table AURC {row['aurc']:.4f}; calibrated: held-out AURC {model.aurc_cv:.4f}, "
          f"AUROC {model.auroc_cv_mean:.3f}, estimated-Dice error q90 {model.estimated_dice_error_q90:.3f}")
    print(f"risk model: {path}")
    print(f"bundled:{args.model}/{method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
