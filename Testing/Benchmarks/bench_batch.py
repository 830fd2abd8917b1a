"""Benchmark: cohort throughput of ``run_batch`` in process, on 1 and on 2 Dask workers.

Run from the repository root::

    OMP_NUM_THREADS=1 python Testing/Benchmarks/bench_batch.py [--cases 12] [--workers 1 2] [--seed 20000]
        [--out Testing/Benchmarks/results]

Results go to ``results/batch.{json,md}``.

Cohort: ``--cases`` lesion phantoms of the bundled sample head (``make_lesion_phantom``, seeds
``--seed`` on), written as NIfTI (FLAIR, T1, reference lesions) with their CASES.csv. Settings:
the bundled lesion model on the CPU, one class-level map (``gradient_x_input``) and the lesion
table with the mean instance map of the two largest lesions (one SmoothGrad sample): quick
cases, so that the cluster's own cost shows.

Each mode writes a fresh batch folder: ``in-process`` (``client=None``, this process's torch
threads), then a LocalCluster of each ``--workers`` count (one torch thread per worker).
Reported per mode: the wall time of ``run_batch`` (cases / minute) and, for the clusters, the
cluster's start-up (reported apart: a long cohort pays it once). The ratio of the 2-worker to
the 1-worker throughput is the speed-up; on a machine of N free cores it is at most
min(2, N). Every mode's labels are checked equal to the in-process ones, case by case.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_attribution import write_results  # noqa: E402


def write_cohort(folder: Path, n_cases: int, seed: int) -> Path:
    """``n_cases`` lesion phantoms as NIfTI files and their CASES.csv."""
    from SegXAILib.io import write_image
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.sample_data import load_sample_head

    head = load_sample_head()
    rows = []
    for n in range(n_cases):
        phantom = make_lesion_phantom(head, seed + n)
        case = folder / f"case{n:02d}"
        case.mkdir(parents=True, exist_ok=True)
        row = {"case": case.name}
        for index, channel in enumerate(phantom.image.channel_names):
            row[channel] = str(write_image(phantom.image, case / f"{channel}.nii.gz", channel=index))
        row["reference"] = str(write_image(phantom.lesions, case / "reference.nii.gz"))
        rows.append(row)
    path = folder / "cases.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def settings():
    from SegXAILib.pipeline import CaseSettings

    return CaseSettings.from_dict({
        "model": "lesions", "device": "cpu",
        "methods": [{"method": "gradient_x_input"}],
        "instances": {"aggregations": ["mean"], "n_samples": 1, "batch_size": 1, "max_instances": 2},
    })


def run(n_cases: int, workers: list[int], seed: int) -> dict[str, Any]:
    from distributed import Client

    from SegXAILib.batch import local_cluster, read_cases, run_batch
    from SegXAILib.io import read_image
    from SegXAILib.pipeline import resolve_model_card

    chosen = settings()
    modes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="segxai-bench-batch-") as temporary:
        folder = Path(temporary)
        cases = read_cases(write_cohort(folder / "cohort", n_cases, seed), resolve_model_card("lesions").input_channels)
        start = time.perf_counter()
        result = run_batch(cases, chosen, folder / "in-process", None)
        seconds = time.perf_counter() - start
        assert result.ok, result.cases
        modes.append({"mode": "in-process", "workers": 0, "startup_s": 0.0, "seconds": seconds,
                      "cases_per_min": 60.0 * n_cases / seconds, "torch_threads": torch.get_num_threads()})
        for count in workers:
            start = time.perf_counter()
            with local_cluster(count) as cluster, Client(cluster) as client:
                client.wait_for_workers(count)
                startup = time.perf_counter() - start
                start = time.perf_counter()
                result = run_batch(cases, chosen, folder / f"workers{count}", client)
                seconds = time.perf_counter() - start
            assert result.ok, result.cases
            modes.append({"mode": f"LocalCluster, {count} worker(s)", "workers": count, "startup_s": startup,
                          "seconds": seconds, "cases_per_min": 60.0 * n_cases / seconds, "torch_threads": 1})
        for mode in modes[1:]:  # the same labels whatever ran them
            for case in cases:
                got = read_image(folder / f"workers{mode['workers']}" / "cases" / case.id / "labels.nii.gz").array
                want = read_image(folder / "in-process" / "cases" / case.id / "labels.nii.gz").array
                mode.setdefault("labels_equal_in_process", True)
                mode["labels_equal_in_process"] &= bool(np.array_equal(got, want))
    by_workers = {m["workers"]: m["cases_per_min"] for m in modes}
    return {
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "cases": n_cases, "seed": seed, "settings": chosen.to_dict(), "modes": modes,
        "ratio_2_to_1": by_workers[2] / by_workers[1] if 1 in by_workers and 2 in by_workers else None,
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Cohort throughput (segxai batch)",
        "",
        f"{m['processor']}, {m['cpu_count']} CPU(s), torch {m['torch']}; {results['cases']} lesion phantoms "
        f"(seeds {results['seed']} on), the bundled lesion model on the CPU, one map (gradient_x_input) and the "
        "mean instance maps of two lesions per case.",
        "",
        "| mode | torch threads | cluster start-up (s) | run (s) | cases / min | labels = in-process |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for mode in results["modes"]:
        equal = {True: "yes", False: "NO"}.get(mode.get("labels_equal_in_process"), "(reference)")
        lines.append(f"| {mode['mode']} | {mode['torch_threads']} | {mode['startup_s']:.1f} | {mode['seconds']:.1f} "
                     f"| {mode['cases_per_min']:.2f} | {equal} |")
    if results["ratio_2_to_1"] is not None:
        lines += ["", f"Throughput ratio, 2 workers / 1 worker: {results['ratio_2_to_1']:.2f}x (at most "
                  f"min(2, free cores))."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=12, help="lesion phantoms in the cohort")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="LocalCluster sizes to time")
    parser.add_argument("--seed", type=int, default=20_000, help="seed of the first phantom")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.cases < 1 or any(w < 1 for w in args.workers):
        parser.error("--cases and --workers: at least 1")
    results = run(args.cases, args.workers, args.seed)
    write_results(results, args.out, "batch", markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
