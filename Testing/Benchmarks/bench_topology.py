"""Benchmark: Euler characteristic curves by vectorised cell counts vs. GUDHI persistence.

Run from the repository root::

    python Testing/Benchmarks/bench_topology.py [--sizes 64 128] [--thresholds 100] [--repeats 3]
        [--out Testing/Benchmarks/results]

Maps: smooth random fields (i.i.d. uniform noise, Gaussian filter sigma 2 voxels, seed 0,
scaled to [0, 1]) of ``size^3`` voxels, each (a) whole and (b) restricted to a central ball
of radius ``0.4 size`` (a mask, as the risk model restricts the saliency to the predicted
structure). Thresholds: ``default_thresholds(T)`` on [0, 1], superlevel filtration.

Compared:

* ``ours``: :func:`SegXAILib.topology.euler_characteristic_curve` (cell counts, no persistence);
* ``gudhi``: :func:`SegXAILib.topology.euler_characteristic_curve_gudhi`: GUDHI
  ``CubicalComplex`` persistence, Betti curves from the intervals, ``b0 - b1 + b2``.

Equality is exact (integer curves, ``np.array_equal``). Time: the median of ``--repeats``
runs each (in-process, wall clock, one thread: both are single-threaded NumPy / C++), after
one warm-up run of ours. Ratio = GUDHI time / our time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_attribution import write_results  # noqa: E402

from SegXAILib.topology import (  # noqa: E402
    default_thresholds,
    euler_characteristic_curve,
    euler_characteristic_curve_gudhi,
)

GOAL_RATIO = 20.0


def smooth_map(size: int, seed: int = 0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    values = gaussian_filter(np.random.default_rng(seed).random((size,) * 3), 2.0)
    return (values - values.min()) / np.ptp(values)


def ball(size: int) -> np.ndarray:
    grid = np.indices((size,) * 3, dtype=np.float64) - (size - 1) / 2
    return (grid**2).sum(axis=0) <= (0.4 * size) ** 2


def _timed(function, repeats: int) -> tuple[np.ndarray, list[float]]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, times


def benchmark(sizes, n_thresholds: int, repeats: int, log=print) -> dict[str, Any]:
    import gudhi

    thresholds = default_thresholds(n_thresholds)
    rows = []
    for size in sizes:
        values = smooth_map(size)
        for mask_name, mask in (("none", None), ("ball", ball(size))):
            euler_characteristic_curve(values, thresholds, mask=mask)  # warm-up
            ours, ours_times = _timed(lambda: euler_characteristic_curve(values, thresholds, mask=mask), repeats)
            oracle, gudhi_times = _timed(lambda: euler_characteristic_curve_gudhi(values, thresholds, mask=mask), repeats)
            ours_s, gudhi_s = statistics.median(ours_times), statistics.median(gudhi_times)
            row = {
                "size": size, "mask": mask_name, "voxels": int(values.size if mask is None else mask.sum()),
                "thresholds": n_thresholds, "equal": bool(np.array_equal(ours, oracle)),
                "max_abs_difference": int(np.abs(ours - oracle).max()),
                "chi_range": [int(ours.min()), int(ours.max())],
                "ours_s": ours_s, "gudhi_s": gudhi_s, "ratio": gudhi_s / ours_s,
                "ours_runs_s": ours_times, "gudhi_runs_s": gudhi_times,
            }
            rows.append(row)
            log(f"{size}^3 mask={mask_name}: equal={row['equal']}, ours {ours_s:.3f} s, GUDHI {gudhi_s:.3f} s, "
                f"ratio {row['ratio']:.1f}x")
    return {
        "rows": rows,
        "goal_ratio": GOAL_RATIO,
        "all_equal": all(r["equal"] for r in rows),
        "goal_met": all(r["ratio"] >= GOAL_RATIO for r in rows),
        "params": {"sizes": list(sizes), "thresholds": n_thresholds, "repeats": repeats, "seed": 0, "sigma": 2.0,
                   "filtration": "superlevel"},
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "numpy": np.__version__, "gudhi": gudhi.__version__},
    }


def markdown(results: dict[str, Any]) -> str:
    p = results["params"]
    lines = [
        "# Euler characteristic curves: cell counts vs. GUDHI persistence",
        "",
        f"`python Testing/Benchmarks/bench_topology.py --sizes {' '.join(map(str, p['sizes']))} "
        f"--thresholds {p['thresholds']} --repeats {p['repeats']}` on {results['machine']['processor']} "
        f"(numpy {results['machine']['numpy']}, GUDHI {results['machine']['gudhi']}); total "
        f"{results.get('total_seconds', '?')} s.",
        "",
        f"Smooth random maps (seed {p['seed']}, Gaussian sigma {p['sigma']} voxels, scaled to [0, 1]), "
        f"{p['thresholds']} thresholds on [0, 1], {p['filtration']} filtration; mask `ball` = central ball of "
        f"radius 0.4 size. Median of {p['repeats']} runs. Goal: at least {results['goal_ratio']:.0f}x faster.",
        "",
        "| size | mask | voxels | equal | ours (s) | GUDHI (s) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['size']}^3 | {r['mask']} | {r['voxels']} | {'yes' if r['equal'] else 'NO'} "
                     f"| {r['ours_s']:.3f} | {r['gudhi_s']:.3f} | {r['ratio']:.1f}x |")
    lines += ["", f"All curves equal: {'yes' if results['all_equal'] else 'NO'}. "
                  f"Goal ({results['goal_ratio']:.0f}x) met everywhere: {'yes' if results['goal_met'] else 'no'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--thresholds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = benchmark(args.sizes, args.thresholds, args.repeats, log=lambda m: print(m, flush=True))
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    json_path, md_path = write_results(results, args.out, "topology", markdown)
    print(markdown(results))
    print(f"wrote {json_path} and {md_path}")
    return 0 if results["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
