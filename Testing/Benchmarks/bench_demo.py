"""The demo before and after a change, in one run: timings per step, how many times the case is
predicted, and whether the results are unchanged (Dice, lesions, QA, every map within 1e-6 of its
maximum).

    python Testing/Benchmarks/bench_demo.py --baseline c828276
    python Testing/Benchmarks/bench_demo.py --old-dir A --new-dir B     # compare two finished runs

The baseline runs from a temporary git worktree of the given revision with this checkout's
virtual environment; each demo runs in its own process (``segxai demo`` on the full case, CPU),
with ``SegXAILib.models.inference.activate`` counted: every prediction of the whole case goes
through it once. Results: ``results/demo_before_after.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"

#: runs one demo in a process, counting predictions, and writes summary.json beside its outputs
#: the baseline demo's step names (before the case pipeline) -> today's
OLD_STEPS = {"QA risk": "QA", "instance maps (max)": "instance maps", "write images": "write case"}

RUNNER = """
import json, sys, time
import SegXAILib.models.inference as inference
import SegXAILib.attribution.api as api
count = [0]
activate = inference.activate
def counting(*args, **kwargs):
    count[0] += 1
    return activate(*args, **kwargs)
inference.activate = api.activate = counting
from SegXAILib.demo import run_demo
start = time.perf_counter()
result = run_demo(sys.argv[1], device="cpu")
summary = {"total_s": time.perf_counter() - start, "timings": result.timings, "dice": result.dice,
           "predictions": count[0]}
json.dump(summary, open(sys.argv[1] + "/summary.json", "w"), indent=2)
"""


def run_demo(source: Path, out: Path) -> None:
    env = {"PYTHONPATH": str(source), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", RUNNER, str(out)], cwd=source, env=env, check=True)


def lesion_rows(folder: Path) -> list[tuple]:
    """``(id, group, volume_mm3)`` of every predicted lesion, in either lesions.json format."""
    rows = json.loads((folder / "lesions.json").read_text(encoding="utf-8"))["instances"]
    return [(r["id"], r["group"], round(r["volume_mm3"], 3)) for r in rows if r.get("id") is not None]


def compare(old: Path, new: Path) -> dict:
    from SegXAILib.io import read_image

    before = json.loads((old / "summary.json").read_text(encoding="utf-8"))
    before["timings"] = {OLD_STEPS.get(step, step): value for step, value in before["timings"].items()}
    after = json.loads((new / "summary.json").read_text(encoding="utf-8"))
    maps = {}
    for path in sorted(old.glob("maps/*.nii.gz")) + sorted(old.glob("instances/*.nii.gz")):
        a = read_image(path).array
        b = read_image(new / path.relative_to(old)).array
        maps[path.relative_to(old).as_posix()] = float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-30))
    matrices = [json.loads((folder / "agg2exp.json").read_text(encoding="utf-8")) for folder in (old, new)]
    agg2exp_equal = (matrices[0]["rows"] == matrices[1]["rows"] and matrices[0]["columns"] == matrices[1]["columns"])
    agg2exp_difference = float(np.nanmax(np.abs(np.asarray(matrices[0]["values"], float)
                                                - np.asarray(matrices[1]["values"], float)))) if agg2exp_equal else None
    qa_old = json.loads((old / "qa.json").read_text(encoding="utf-8"))
    qa_new = json.loads((new / "qa.json").read_text(encoding="utf-8"))
    steps = list(after["timings"]) + [s for s in before["timings"] if s not in after["timings"]]
    return {
        "dice": [before["dice"], after["dice"]],
        "predictions": [before["predictions"], after["predictions"]],
        "total_s": [round(before["total_s"], 1), round(after["total_s"], 1)],
        "speedup": round(before["total_s"] / after["total_s"], 2),
        "timings_s": {s: [round(before["timings"].get(s, float("nan")), 1),
                          round(after["timings"].get(s, float("nan")), 1)] for s in steps},
        "lesions_equal": lesion_rows(old) == lesion_rows(new),
        "agg2exp_same_rows_and_columns": agg2exp_equal,
        "agg2exp_max_difference": agg2exp_difference,
        "qa": {"band": [qa_old["band"], qa_new["band"]], "pc1": [qa_old["pc1"], qa_new["pc1"]]},
        "max_map_difference_relative": max(maps.values()),
        "maps_compared": len(maps),
        "map_differences": maps,
    }


def markdown(result: dict, baseline: str) -> str:
    lines = [
        f"# Demo before and after (baseline {baseline}), full case, CPU (2 threads)", "",
        f"- Dice against the inserted lesions: {result['dice'][0]:.4f} before, {result['dice'][1]:.4f} after",
        f"- predictions of the whole case: {result['predictions'][0]} before, {result['predictions'][1]} after",
        f"- lesion table (ids, groups, volumes) equal: {result['lesions_equal']}",
        f"- Agg2Exp matrix: same rows and columns {result['agg2exp_same_rows_and_columns']}, largest difference "
        f"{result['agg2exp_max_difference']}",
        f"- QA: band {result['qa']['band'][0]} / {result['qa']['band'][1]}, "
        f"PC1 {result['qa']['pc1'][0]:.6g} / {result['qa']['pc1'][1]:.6g}",
        f"- {result['maps_compared']} maps compared, largest difference {result['max_map_difference_relative']:.2e} "
        "of the map's maximum",
        f"- total {result['total_s'][0]} s before, {result['total_s'][1]} s after ({result['speedup']}x)", "",
        "| step | before (s) | after (s) |", "|---|---|---|",
    ]
    lines += [f"| {step} | {a} | {b} |" for step, (a, b) in result["timings_s"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD~1", help="git revision of the 'before' demo")
    parser.add_argument("--old-dir", type=Path, help="a finished 'before' demo folder (with summary.json)")
    parser.add_argument("--new-dir", type=Path, help="a finished 'after' demo folder (with summary.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        old, new = args.old_dir, args.new_dir
        if old is None:
            tree = scratch / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline], check=True)
            try:
                old = scratch / "old"
                run_demo(tree, old)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        if new is None:
            new = scratch / "new"
            run_demo(ROOT, new)
        result = compare(old, new)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_before_after.json").write_text(json.dumps({"baseline": args.baseline, **result}, indent=2) + "\n",
                                                    encoding="utf-8")
    (RESULTS / "demo_before_after.md").write_text(markdown(result, args.baseline), encoding="utf-8")
    print(markdown(result, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
