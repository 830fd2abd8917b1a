"""``segxai batch CASES.csv --settings SETTINGS.json --out DIR``: a cohort on Dask (:mod:`SegXAILib.batch`);
``segxai batch-report DIR [--calibrate MAP]``: its cohort analyses (:func:`SegXAILib.batch.cohort_report`);
``segxai batch-evaluate DIR --methods M,M``: the evaluation tables of attribution methods over its
cases (:func:`SegXAILib.batch.evaluate_batch`, the options of ``segxai evaluate``).

Exit codes of ``batch``: 0 every case done (or finished before), 3 some cases failed (each in
``DIR/failures/<id>.json``, the others finished), 2 bad input before any work, 130 interrupted
(a rerun resumes). ``batch-report``: 0 written, 2 bad input (not a batch folder, an unknown map,
too few cases to calibrate on). ``batch-evaluate``: 0 written, 3 some finished cases could not be
evaluated (listed in ``evaluation.json``, the others scored), 2 bad input before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from ..image import SegXAIInputError
from .common import options_named, progress_bar
from .evaluate import add_evaluation_options, add_run_options

__all__ = ["add_commands", "EXIT_CASES_FAILED"]

#: some cases failed, the others finished
EXIT_CASES_FAILED = 3


def _device(args: argparse.Namespace):
    """The device the options ask for (None: the settings'): ``--device``, or cuda with ``--gpus``
    on this machine's cluster."""
    if args.gpus and args.device not in (None, "auto", "cuda"):
        raise SegXAIInputError(f"--device {args.device}: --gpus runs each worker on its own GPU (device cuda)")
    return "cuda" if args.gpus and (args.cluster == "local" and not args.scheduler) else args.device


def _settings(args: argparse.Namespace):
    from ..pipeline import CaseSettings

    with options_named(settings="--settings"):
        settings = CaseSettings.load(args.settings)
    device = _device(args)
    if device:
        settings = CaseSettings.from_dict({**settings.to_dict(), "device": device}, "--device")
    return settings


def _check_where(args: argparse.Namespace) -> None:
    """The options saying where the cases run, checked before a cluster starts."""
    if args.scheduler and args.workers is not None:
        raise SegXAIInputError("--workers: the workers of --scheduler are that cluster's")
    if args.workers is not None and args.workers < 0:
        raise SegXAIInputError(f"--workers {args.workers}: must be >= 0 (0 runs the cases in this process)")
    if args.gpus and args.workers == 0:
        raise SegXAIInputError("--workers 0: runs in this process, not one worker per GPU (--gpus)")
    if args.cluster != "local" and args.workers == 0:
        raise SegXAIInputError(f"--workers 0: --cluster {args.cluster} needs at least one job")


def _job_options(args: argparse.Namespace):
    from ..batch import JobOptions

    with options_named("cores", "memory", "walltime"):
        return JobOptions(cores=args.cores, memory=args.memory, walltime=args.walltime, queue=args.queue,
                          account=args.account, gpus=args.gpus, job_extra=tuple(args.job_extra or ()),
                          interface=args.interface)


@contextmanager
def _client(args: argparse.Namespace, options, command: str) -> Iterator[tuple[Any, dict[str, Any], Optional[int]]]:
    """``(client, cluster description, worker threads)`` for the block: None, {} with ``--workers
    0`` on this machine (the cases run in this process), else a Dask client of :func:`connect`."""
    workers = args.workers if args.workers is not None else 1
    if workers == 0 and not args.scheduler and args.cluster == "local":
        yield None, {}, None
        return
    from ..batch import connect, dashboard_link

    with connect(args.scheduler, args.cluster, workers, args.gpus, options, quiet=True) as (client, info):
        dashboard = dashboard_link(client)
        print(f"segxai {command}: Dask dashboard {dashboard}" if dashboard else
              f"segxai {command}: no Dask dashboard (it needs bokeh: pip install bokeh)", file=sys.stderr)
        threads = args.cores if args.cluster != "local" else 1
        yield client, info, None if args.scheduler else threads


def _check_local_device(settings, args: argparse.Namespace) -> None:
    """The device is checked here only when the cases run on this machine's CPUs (GPUs are the
    workers' own: a GPU worker sees only its CUDA_VISIBLE_DEVICES)."""
    from ..models import resolve_device

    if not args.scheduler and args.cluster == "local" and not args.gpus:
        with options_named("device"):
            resolve_device(settings.device)


def _cmd_batch(args: argparse.Namespace) -> int:
    from ..batch import check_batch, read_cases, run_batch
    from ..io import check_writable_dir
    from ..pipeline import resolve_model_card

    # everything a user typed is checked before a cluster starts (exit 2)
    _check_where(args)
    settings = _settings(args)
    _check_local_device(settings, args)
    with options_named(settings="--settings"):
        card = resolve_model_card(settings.model)
    cases = read_cases(args.cases, card.input_channels)
    check_batch(settings, cases)
    with options_named(output="--out"):
        check_writable_dir(args.out)
    options = _job_options(args)
    quiet = bool(getattr(args, "quiet", False))
    # library errors past this point name settings fields (settings.model, trust_code), as SETTINGS.json has them
    with _client(args, options, "batch") as (client, info, threads), \
            progress_bar("cases", enabled=not quiet) as bar:
        result = run_batch(cases, settings, args.out, client, progress=bar, cases_csv=args.cases, cluster_info=info,
                           threads_per_worker=threads)
    counts = result.counts
    print(f"segxai batch: {len(result.cases)} cases: {counts['done']} done, {counts['skipped']} finished before, "
          f"{counts['failed']} failed ({Path(result.out_dir) / 'batch.json'})", file=sys.stderr)
    for identifier in result.ids("failed"):
        record = result.cases[identifier]
        print(f"  {identifier}: {record.get('error', '')} ({Path(result.out_dir) / record.get('failure', '')})",
              file=sys.stderr)
    return 0 if result.ok else EXIT_CASES_FAILED


def _cmd_batch_report(args: argparse.Namespace) -> int:
    from ..batch import cohort_report

    quiet = bool(getattr(args, "quiet", False))
    with progress_bar("batch report", enabled=not quiet) as bar, \
            options_named("seed", batch_dir="BATCH_DIR", method="--calibrate"):
        calibrate = None if args.calibrate is None else "all" if args.calibrate == ["all"] else args.calibrate
        path = cohort_report(args.batch_dir, calibrate=calibrate, progress=bar, seed=args.seed)
    print(path)
    summary = json.loads((Path(args.batch_dir) / "cohort_report.json").read_text(encoding="utf-8"))
    for calibration in summary.get("calibration", []):
        print(Path(args.batch_dir) / calibration["risk_model"])
    return 0


def _cmd_batch_evaluate(args: argparse.Namespace) -> int:
    from ..batch import check_batch_evaluation, evaluate_batch
    from .evaluate import evaluation_errors_named, evaluation_request

    # everything a user typed is checked before a cluster starts or anything is written (exit 2)
    _check_where(args)
    methods, config = evaluation_request(args)
    device = _device(args)
    named = dict(batch_dir="BATCH_DIR", methods="--methods", device="--device")
    with evaluation_errors_named(**named):
        plan = check_batch_evaluation(args.batch_dir, methods, config, device)
    _check_local_device(plan.settings, args)
    options = _job_options(args)
    quiet = bool(getattr(args, "quiet", False))
    with _client(args, options, "batch-evaluate") as (client, _, threads), \
            progress_bar("evaluate", enabled=not quiet) as bar, evaluation_errors_named(**named):
        document = evaluate_batch(args.batch_dir, methods, config, client, progress=bar, device=device,
                                  title=args.title, threads_per_worker=threads)
    failed = [entry for entry in document["not_evaluated"] if entry["status"] == "evaluation failed"]
    print(f"segxai batch-evaluate: {len(document['cases'])} cases evaluated, "
          f"{len(document['not_evaluated']) - len(failed)} not finished in the batch, {len(failed)} failed here",
          file=sys.stderr)
    for entry in document["not_evaluated"]:
        print(f"  {entry['id']} ({entry['status']}): {entry['reason']}", file=sys.stderr)
    for path in document["paths"]:
        print(path)
    return EXIT_CASES_FAILED if failed else 0


def _where_options(command: argparse.ArgumentParser, what: str = "cases run") -> None:
    """Where the cases run: ``--scheduler`` | ``--cluster``, ``--workers``, ``--gpus``,
    ``--device`` and the job queues' booking (read by :func:`_check_where`, :func:`_device`,
    :func:`_job_options` and :func:`_client`)."""
    where = command.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="an existing Dask scheduler (tcp://host:8786); nothing is started")
    where.add_argument("--cluster", default="local", choices=("local", "slurm", "pbs", "sge"),
                       help="local: worker processes on 127.0.0.1 (default); slurm / pbs / sge: one batch job per "
                            "worker through dask-jobqueue")
    command.add_argument("--workers", type=int, default=None,
                         help=f"worker processes (local, default 1; 0: the {what} in this process, no Dask) or jobs "
                              "(slurm / pbs / sge); with --gpus, at most one per visible GPU")
    command.add_argument("--gpus", action="store_true",
                         help="local: one worker per visible GPU, each with its CUDA_VISIBLE_DEVICES; job queues: "
                              "one GPU per job")
    command.add_argument("--device", default=None, help="overrides the batch settings' device")
    jobs = command.add_argument_group("job queues (--cluster slurm / pbs / sge)")
    jobs.add_argument("--cores", type=int, default=1, help="CPUs per job: its worker's torch threads (default 1)")
    jobs.add_argument("--memory", default="8GB", help="memory per job (default 8GB)")
    jobs.add_argument("--walltime", default=None, help="HH:MM:SS per job")
    jobs.add_argument("--queue", default=None, help="queue (PBS, SGE) or partition (SLURM)")
    jobs.add_argument("--account", default=None, help="account / project charged")
    jobs.add_argument("--job-extra", action="append", default=None, metavar="DIRECTIVE",
                      help="one more directive per use, as the scheduler writes it (--constraint=a100, -pe smp 4)")
    jobs.add_argument("--interface", default=None, help="network interface of the scheduler and workers (ib0)")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``batch``, ``batch-report`` and ``batch-evaluate`` to the ``segxai`` sub-parsers."""
    batch = commands.add_parser(
        "batch", help="run a cohort (CASES.csv) through the case engine on Dask, resumable",
        description="Runs every case of CASES.csv (columns: case, one per model input channel, optional "
                    "reference; relative paths from the CSV's folder) with the CaseSettings of --settings, one Dask "
                    "task per case, into DIR/cases/<id>/ (a case folder with case.json). A rerun skips the finished "
                    "cases (checked against their manifests' SHA-256) and redoes the partial ones; a failing case is "
                    "recorded in DIR/failures/<id>.json and the others go on; DIR/batch.json summarises. "
                    f"Exit 0 when every case is done, {EXIT_CASES_FAILED} when some failed, 2 on bad input, "
                    "130 when interrupted.")
    batch.add_argument("cases", type=Path, metavar="CASES.csv", help="the cases: case, <channel>..., [reference]")
    batch.add_argument("--settings", required=True, type=Path, help="CaseSettings JSON (as for segxai run)")
    batch.add_argument("--out", required=True, type=Path, help="the batch folder (created; an earlier run resumed)")
    _where_options(batch)
    batch.set_defaults(run=_cmd_batch)

    batch_report = commands.add_parser(
        "batch-report", help="the cohort analyses of a batch folder: each case's report and cohort.html",
        description="Writes DIR/cases/<id>/report.html for every finished case (listed in its case.json, so the "
                    "folder still verifies), and DIR/cohort.html + cohort_report.json: one row per case (status, error, "
                    "structure volume, instances, QA band and estimated Dice, uncertainty, Dice against the "
                    "reference, a link to its report), the Agg2Exp global matrix and outliers; with --calibrate, the "
                    "QA risk model calibrated on the cases with a reference (DIR/risk_<MAP>.json and plots). "
                    "Exit 0 when written, 2 on bad input.")
    batch_report.add_argument("batch_dir", type=Path, metavar="BATCH_DIR", help="a folder written by segxai batch")
    batch_report.add_argument("--calibrate", default=None, nargs="+", metavar="MAP",
                              help="calibrate the QA risk model of these class-level maps of the batch's settings "
                                   "('all': every one; at least 10 finished cases with a reference) and benchmark "
                                   "them against the predicted volume")
    batch_report.add_argument("--seed", type=int, default=0,
                              help="seed of the outliers' Isolation Forests and the calibration's folds (default 0)")
    batch_report.set_defaults(run=_cmd_batch_report)

    batch_evaluate = commands.add_parser(
        "batch-evaluate", help="evaluation tables of attribution methods over a batch folder's finished cases",
        description="Scores attribution methods (as segxai evaluate: fidelity, pointing, region Dice, faithfulness, "
                    "sensitivity, complexity, efficiency, randomisation; random baseline added) on every finished "
                    "case of a batch folder, with the prediction written in the case folder and the reference its "
                    "batch_case.json records (a case without one gets the reference-free metrics), one Dask task "
                    "per case. Writes DIR/evaluation/evaluation.{md,csv,json}; failed and unfinished cases are "
                    "skipped and listed. segxai batch-report then links the tables in cohort.html. "
                    f"Exit 0 when written, {EXIT_CASES_FAILED} when some cases could not be evaluated, 2 on bad input.")
    batch_evaluate.add_argument("batch_dir", type=Path, metavar="BATCH_DIR", help="a folder written by segxai batch")
    add_evaluation_options(batch_evaluate, class_help="class to explain (default: the batch's structure)")
    add_run_options(batch_evaluate)
    _where_options(batch_evaluate, "cases evaluated")
    batch_evaluate.set_defaults(run=_cmd_batch_evaluate)
