"""``run_batch``: one case-engine task per case on a Dask cluster, resumable from the manifests.

Layout of a batch folder::

    batch.json                 the summary (rewritten atomically after every case): each case's
                               status (done / skipped / failed / pending), seconds, worker; counts,
                               timings, throughput, the cluster and its dashboard link
    settings.json              the CaseSettings of the last run
    cases/<id>/                one case folder of the engine (write_case; case.json written last),
                               with batch_case.json (the case's row: images, reference)
    failures/<id>.json         a failed case: error, traceback, its row and the settings

Nothing lost, nothing redone: a case whose ``case.json`` lists files that all match their
SHA-256, made with the same settings (the device aside) from the same images, is skipped; any
other folder of a case (killed midway, a file changed, other settings or images) is removed and
the case run again. A failing case is recorded and the others go on. Each task runs
:func:`~SegXAILib.pipeline.run_case` and :func:`~SegXAILib.pipeline.write_case` on a worker; the
network is built once per worker (:class:`ModelPlugin`), not once per case. Without a client
the cases run one after the other in this process, through the same task function.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..image import SegXAIInputError
from ..pipeline import CaseSettings, ModelCache, read_manifest, resolve_model_card, write_json
from ..progress import CancelToken, Cancelled, ProgressCallback, report
from .cases import BatchCase

__all__ = ["run_batch", "BatchResult", "ModelPlugin", "run_case_task", "case_state", "check_batch", "dashboard_link",
           "BATCH_FORMAT", "PLUGIN_NAME", "CASE_RECORD"]

BATCH_FORMAT = "segxai-batch"
PLUGIN_NAME = "segxai-model"
#: the case's row, written into its folder and listed (with its checksum) in case.json
CASE_RECORD = "batch_case.json"
#: seconds between checks of the cancel token while waiting for the cluster
_POLL_S = 0.2

try:  # the plugin base class when distributed is installed (the ``batch`` extra); in-process runs need none
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - exercised only without the extra
    _WorkerPlugin = object  # type: ignore[assignment,misc]


class ModelPlugin(_WorkerPlugin):  # type: ignore[misc,valid-type]
    """A worker's network, built at its first case and reused by the next ones.

    Registered on every worker by :func:`run_batch` (``client.register_plugin``). It keeps a
    :class:`~SegXAILib.pipeline.ModelCache` (keyed by the card file, its checksum, the device and
    ``trust_code``) and sets the worker's torch threads: one case runs at a time per worker
    (its ``lock``: attribution methods hook the network, so a worker of several Dask threads,
    as an existing scheduler may have, still runs its cases one by one), its operators on
    ``threads`` threads.
    """

    name = PLUGIN_NAME

    def __init__(self, threads: Optional[int] = 1) -> None:
        self.threads = threads
        self.cache = ModelCache()
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"threads": self.threads}  # a fresh cache and lock on each worker

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["threads"])

    def setup(self, worker: Any = None) -> None:  # noqa: ARG002 - WorkerPlugin's signature
        if self.threads:
            import torch

            torch.set_num_threads(int(self.threads))
        self.cache = ModelCache()

    def model(self, settings: CaseSettings):
        return self.cache.get(settings)


def _worker_model() -> tuple[ModelCache, threading.Lock]:
    """The cache and lock of the Dask worker this runs on (its plugin's; process-wide ones without it)."""
    global _FALLBACK
    try:
        from distributed import get_worker

        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except (ImportError, ValueError):
        plugin = None
    if plugin is not None:
        return plugin.cache, plugin.lock
    if _FALLBACK is None:
        _FALLBACK = (ModelCache(), threading.Lock())
    return _FALLBACK


_FALLBACK: Optional[tuple[ModelCache, threading.Lock]] = None


def _case_record(case: BatchCase) -> dict[str, Any]:
    return {"id": case.id, "images": [str(p) for p in case.images],
            "reference": str(case.reference) if case.reference is not None else None}


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    # the device changes float rounding only; a cohort resumed on another machine keeps its cases
    return {k: v for k, v in settings.items() if k != "device"}


def case_state(folder: Union[str, Path], case: BatchCase, settings: CaseSettings) -> str:
    """``finished`` (a valid manifest of these settings and images: every file matches its
    SHA-256), ``missing`` (no folder) or ``partial`` (anything else: to be removed and redone)."""
    folder = Path(folder)
    if not folder.exists():
        return "missing"
    try:
        manifest = read_manifest(folder, verify=True)
        record = json.loads((folder / CASE_RECORD).read_text(encoding="utf-8"))
    except (SegXAIInputError, OSError, json.JSONDecodeError):
        return "partial"
    if CASE_RECORD not in {entry["path"] for entry in manifest.get("files", [])}:
        return "partial"
    if _comparable(manifest.get("settings", {})) != _comparable(settings.to_dict()) or record != _case_record(case):
        return "partial"
    return "finished"


def run_case_task(case: BatchCase, settings_data: dict[str, Any], out_dir: str,
                  cache: Optional[ModelCache] = None) -> dict[str, Any]:
    """Run and write one case (a Dask task, or a step of the in-process run); never raises.

    Returns
    -------
    dict
        ``id``, ``status`` (``done`` or ``failed``), ``seconds``, ``worker``; a done case its
        ``manifest`` (relative to ``out_dir``) and summary; a failed one ``error`` (type and
        message), ``kind`` (``input`` or ``internal``) and ``traceback``. A failed case leaves
        no folder behind.
    """
    from ..io import read_image
    from ..pipeline import read_case_images, run_case, write_case

    start = time.perf_counter()
    folder = Path(out_dir) / "cases" / case.id
    result: dict[str, Any] = {"id": case.id, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    cache, lock = (cache, threading.Lock()) if cache is not None else _worker_model()
    try:
        settings = CaseSettings.from_dict(settings_data)
        with lock:
            model = cache.get(settings)
            card = model.card
            image = read_case_images(case.images, card, settings.resample_slices)
            reference = read_image(case.reference) if case.reference is not None else None
            outcome = run_case(image, model, settings, reference=reference)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_json(_case_record(case), folder / CASE_RECORD)
        manifest = write_case(outcome, folder, extra_files={"batch_case": folder / CASE_RECORD},
                              inputs=case.inputs(card.input_channels))
        summary = json.loads(manifest.read_text(encoding="utf-8"))["summary"]
        result.update(status="done", manifest=manifest.relative_to(out_dir).as_posix(), summary=summary)
    except Exception as error:  # recorded with its traceback; the batch goes on
        result.update(status="failed", kind="input" if isinstance(error, SegXAIInputError) else "internal",
                      error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        shutil.rmtree(folder, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


@dataclass
class BatchResult:
    """What :func:`run_batch` did.

    Attributes
    ----------
    out_dir : Path
    cases : dict
        Case id -> its record (``status``: ``done``, ``skipped``, ``failed`` or ``pending``).
    seconds : float
        Wall time of the run.
    dashboard : str
        The Dask dashboard's link ('' without one).
    """

    out_dir: Path
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    dashboard: str = ""

    def ids(self, status: str) -> list[str]:
        return [k for k, v in self.cases.items() if v["status"] == status]

    @property
    def counts(self) -> dict[str, int]:
        statuses = ("done", "skipped", "failed", "pending")
        return {s: sum(1 for v in self.cases.values() if v["status"] == s) for s in statuses}

    @property
    def ok(self) -> bool:
        """Every case done or skipped."""
        counts = self.counts
        return counts["failed"] == 0 and counts["pending"] == 0


def dashboard_link(client: Any) -> str:
    """The Dask dashboard's link when the scheduler serves its pages (they need bokeh), else ''."""
    import importlib.util

    try:
        # without bokeh the scheduler's http service still runs, but serves no dashboard pages
        if "dashboard" not in client.scheduler_info().get("services", {}) or importlib.util.find_spec("bokeh") is None:
            return ""
        return str(client.dashboard_link)
    except Exception:  # noqa: BLE001 - a link is a convenience, never a reason to fail
        return ""


def _eta_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


class _Ledger:
    """batch.json, rewritten atomically after each case (a killed run leaves a readable one)."""

    def __init__(self, out_dir: Path, cases: Sequence[BatchCase], settings: CaseSettings, cluster: dict[str, Any],
                 cases_csv: Optional[Path]) -> None:
        self.out_dir = out_dir
        self.start = time.perf_counter()
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.settings = settings
        self.cluster = cluster
        self.cases_csv = cases_csv
        self.records: dict[str, dict[str, Any]] = {
            c.id: {"id": c.id, "status": "pending", "line": c.line, "metadata": dict(c.metadata)} for c in cases}
        self.ran = 0

    def record(self, result: dict[str, Any]) -> None:
        record = self.records[result["id"]]
        record.update({k: v for k, v in result.items() if k not in ("traceback", "summary")})
        if result.get("status") == "done":
            record["summary"] = result.get("summary", {})
            record.pop("error", None)
            record.pop("failure", None)
            (self.out_dir / "failures" / f"{result['id']}.json").unlink(missing_ok=True)
        if result.get("status") in ("done", "failed"):
            self.ran += 1

    def write(self, state: str) -> Path:
        seconds = time.perf_counter() - self.start
        counts = {s: sum(1 for r in self.records.values() if r["status"] == s)
                  for s in ("done", "skipped", "failed", "pending")}
        document = {
            "format": BATCH_FORMAT, "version": 1, "state": state,
            "cases_csv": str(self.cases_csv) if self.cases_csv else None,
            "started": self.started, "seconds": round(seconds, 3), "counts": counts,
            # cases run by this invocation per minute of wall time (cluster start-up included)
            "throughput_cases_per_min": round(60.0 * self.ran / seconds, 3) if self.ran and seconds > 0 else None,
            "cluster": self.cluster, "settings": self.settings.to_dict(),
            "cases": list(self.records.values()),
        }
        return write_json(document, self.out_dir / "batch.json")


def _write_failure(out_dir: Path, case: BatchCase, result: dict[str, Any], settings: CaseSettings) -> Path:
    failure = {"id": case.id, "error": result.get("error", ""), "kind": result.get("kind", "internal"),
               "traceback": result.get("traceback", ""), "worker": result.get("worker"),
               "case": {**_case_record(case), "line": case.line, "metadata": dict(case.metadata)},
               "settings": settings.to_dict(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return write_json(failure, out_dir / "failures" / f"{case.id}.json")


def check_batch(settings: CaseSettings, cases: Sequence[BatchCase]) -> None:
    """The errors every case would hit, found once before any work (exit 2 in the CLI): the
    model card, ``trust_code`` for a model that runs code, each case's image count, ids."""
    from ..models.card import CODE_FORMATS

    card = resolve_model_card(settings.model)
    if card.format in CODE_FORMATS and not settings.trust_code:
        raise SegXAIInputError(f"settings.model {settings.model!r}: a {card.format!r} model runs its own code when "
                               "loaded; set trust_code if you trust its source")
    for case in cases:
        card.check_input_count(len(case.images), f"image(s) of case {case.id!r}")
    ids = [case.id.lower() for case in cases]
    if len(set(ids)) != len(ids):
        raise SegXAIInputError("cases: case ids repeat (ids are compared without case)")


def run_batch(
    cases: Sequence[BatchCase],
    settings: CaseSettings,
    out_dir: Union[str, os.PathLike],
    client: Any = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    cases_csv: Optional[Union[str, os.PathLike]] = None,
    cluster_info: Optional[dict[str, Any]] = None,
    threads_per_worker: Optional[int] = 1,
) -> BatchResult:
    """Run every unfinished case of ``cases`` into ``out_dir`` (layout in the module docstring).

    Parameters
    ----------
    cases : sequence of BatchCase
        The cohort (:func:`~SegXAILib.batch.read_cases`).
    settings : CaseSettings
        What each case runs (the same for all).
    out_dir : path-like
        The batch folder (created); a folder of an earlier run is resumed.
    client : distributed.Client, optional
        One task per unfinished case on its cluster; None runs the cases here, one after the
        other (the oracle of the distributed run).
    progress : callable, optional
        ``progress(fraction of the cases to run finished, "3/6 cases, 1 failed, ETA 40 s")``.
    cancel : CancelToken, optional
        Stops the run: the cases not yet finished are cancelled (their folders stay partial and
        are redone by the next run); raises :class:`~SegXAILib.progress.Cancelled`.
    cases_csv : path-like, optional
        Recorded in ``batch.json``.
    cluster_info : dict, optional
        Recorded in ``batch.json`` (the kind of cluster, its workers).
    threads_per_worker : int or None
        Torch threads of each worker (None: leave the workers' setting).

    Returns
    -------
    BatchResult
        Each case's status; :attr:`BatchResult.ok` when none failed.
    """
    from ..io import check_writable_dir

    out = check_writable_dir(out_dir).resolve()
    check_batch(settings, cases)
    check_writable_dir(out / "cases")
    check_writable_dir(out / "failures")
    settings.save(out / "settings.json")
    dashboard = dashboard_link(client) if client is not None else ""
    info = {"kind": "in-process" if client is None else "dask", **(cluster_info or {}), "dashboard": dashboard}
    ledger = _Ledger(out, cases, settings, info, Path(cases_csv).resolve() if cases_csv else None)
    # inventory: finished cases are skipped untouched, any other folder of a case is removed
    todo: list[BatchCase] = []
    for case in cases:
        folder = out / "cases" / case.id
        state = case_state(folder, case, settings)
        if state == "finished":
            manifest = folder / "case.json"
            summary = json.loads(manifest.read_text(encoding="utf-8")).get("summary", {})
            ledger.records[case.id].update(status="skipped", manifest=f"cases/{case.id}/case.json", summary=summary)
            (out / "failures" / f"{case.id}.json").unlink(missing_ok=True)
            continue
        if state == "partial":
            shutil.rmtree(folder)
        todo.append(case)
    ledger.write("running")
    by_id = {case.id: case for case in cases}
    settings_data = settings.to_dict()
    total = len(todo)
    finished = [0, 0]  # cases, failures

    def finish(result: dict[str, Any]) -> None:
        case = by_id[result["id"]]
        if result["status"] == "failed":
            result["failure"] = _write_failure(out, case, result, settings).relative_to(out).as_posix()
            finished[1] += 1
        ledger.record(result)
        ledger.write("running")
        finished[0] += 1
        elapsed = time.perf_counter() - ledger.start
        eta = elapsed / finished[0] * (total - finished[0])
        message = f"{finished[0]}/{total} cases" + (f", {finished[1]} failed" if finished[1] else "")
        if finished[0] < total:
            message += f", ETA {_eta_text(eta)}"
        report(progress, finished[0] / total, message)

    report(progress, 0.0 if total else 1.0, f"0/{total} cases" + (f" ({len(cases) - total} finished before)"
                                                                    if len(cases) > total else ""))
    try:
        if client is None:
            cache = ModelCache()
            for case in todo:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                finish(run_case_task(case, settings_data, str(out), cache))
        elif todo:
            _run_on_cluster(client, todo, settings_data, out, finish, cancel, threads_per_worker)
    except (Cancelled, KeyboardInterrupt):
        ledger.write("cancelled")
        raise
    ledger.write("done")
    return BatchResult(out, ledger.records, round(time.perf_counter() - ledger.start, 3), dashboard)


def _run_on_cluster(client: Any, todo: Sequence[BatchCase], settings_data: dict[str, Any], out: Path, finish,
                    cancel: Optional[CancelToken], threads_per_worker: Optional[int]) -> None:
    client.register_plugin(ModelPlugin(threads_per_worker), name=PLUGIN_NAME)
    # pure=False: a rerun is a new task even for the same case (its folder was removed)
    futures = {client.submit(run_case_task, case, settings_data, str(out),
                             key=f"segxai-case-{case.id}-{os.urandom(4).hex()}", pure=False): case.id for case in todo}
    _collect(client, futures, finish, cancel)


def _collect(client: Any, futures: dict[Any, str], finish, cancel: Optional[CancelToken]) -> None:
    """Hand each task's result (a case's record) to ``finish`` as it completes.

    ``futures``: Dask future -> case id. A task whose worker died (KilledWorker) or that was lost
    gives a ``failed`` record of its case; ``cancel`` (polled) cancels the tasks not finished and
    raises :class:`~SegXAILib.progress.Cancelled`.
    """
    from distributed import as_completed

    pending = as_completed(list(futures))
    try:
        while True:
            if cancel is not None and cancel.cancelled:
                raise Cancelled("operation cancelled")
            batch = pending.next_batch(block=False) if not pending.is_empty() else None
            if batch is None and pending.is_empty():
                break
            if not batch:
                time.sleep(_POLL_S)
                continue
            for future in batch:
                identifier = futures[future]
                try:
                    result = future.result()
                except Exception as error:  # the worker died (KilledWorker) or the task was lost
                    result = {"id": identifier, "status": "failed", "kind": "internal",
                              "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(),
                              "worker": None, "seconds": None}
                finish(result)
    except BaseException:
        client.cancel(list(futures))
        raise
