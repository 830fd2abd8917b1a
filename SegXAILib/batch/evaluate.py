"""``evaluate_batch``: the evaluation tables of attribution methods over a batch folder's cases
(``segxai batch-evaluate BATCH_DIR``).

Every finished case of the batch (``done`` or ``skipped`` in ``batch.json``) is scored by
:func:`~SegXAILib.evaluation.evaluate_case`, the function of ``segxai evaluate``: its image and
its prediction are read back from the case folder (:func:`~SegXAILib.pipeline.read_case`,
every file checked against its SHA-256), its reference is the file its ``batch_case.json``
records. The class target is resolved from the written prediction, so the model does not
predict the case again, when the written labels are the model-grid labels exactly (a card that
reorients but does not resample: the labels are put on the model grid by
:func:`~SegXAILib.models.preprocessing.preprocess_labels`, as the reference mask is); a card
that resamples (its model-grid argmax is not recoverable from the input-grid labels) or an
nnU-Net card predicts the case once more with the batch's settings (:func:`~SegXAILib.pipeline.predict`,
as ``segxai evaluate`` does). A case without a reference gets the reference-free metrics (the
pointing AUC and region Dice are NaN). Failed and unfinished cases are skipped and listed.

With a Dask client each case is one task, on the worker's network of the batch
(:class:`~SegXAILib.batch.ModelPlugin`: built once per worker, one case at a time); without one
the cases run here one after the other, through the same task function. The tables are written
atomically into ``evaluation/`` of the batch folder: ``evaluation.md`` (paper 002's tables 1-3,
paper 003's table 1), ``evaluation.csv`` (one line per case, method and variant) and
``evaluation.json`` (the config, the methods, the model's checksum, each case's id, files and
rows, the cases not evaluated).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..image import Image, SegXAIInputError
from ..pipeline import CaseSettings, ModelCache
from ..progress import CancelToken, ProgressCallback, report
from .run import CASE_RECORD, PLUGIN_NAME, ModelPlugin, _worker_model, _collect

__all__ = ["evaluate_batch", "evaluate_case_task", "check_batch_evaluation", "BatchEvaluation", "EVALUATION_DIR",
           "EVALUATION_FORMAT"]

#: the folder of the tables inside the batch folder
EVALUATION_DIR = "evaluation"
EVALUATION_FORMAT = "segxai-batch-evaluation"
#: statuses of a batch case whose folder is finished
_FINISHED = ("done", "skipped")


@dataclasses.dataclass
class BatchEvaluation:
    """What :func:`check_batch_evaluation` found: what :func:`evaluate_batch` runs.

    Attributes
    ----------
    batch_dir : Path
    settings : CaseSettings
        The batch's settings (the device replaced when asked).
    card : ModelCard
    config : EvaluationConfig
        Checked; its ``class_name`` the batch's structure (its settings' ``class_name``, else the
        model's first foreground class) when none was given.
    methods : dict
        Method key -> parameters, ``random`` included.
    cases : list of str
        The finished cases' ids, in the batch's order.
    not_evaluated : list of dict
        ``id``, ``status`` and ``reason`` of every other case of the batch.
    """

    batch_dir: Path
    settings: CaseSettings
    card: Any
    config: Any
    methods: dict[str, dict[str, Any]]
    cases: list[str]
    not_evaluated: list[dict[str, Any]]


def check_batch_evaluation(batch_dir: Union[str, os.PathLike], methods: Mapping[str, Mapping[str, Any]], config,
                           device: Optional[str] = None) -> BatchEvaluation:
    """Everything :func:`evaluate_batch` needs, checked before any case runs or anything is written.

    Raises
    ------
    SegXAIInputError
        Not a batch folder (``batch_dir``); an unknown method (``methods``); a config value out of
        range, or a ``class_name`` the model lacks (``class_name``); no finished case.
    """
    from ..attribution.registry import get_method
    from ..evaluation.runner import method_name
    from ..pipeline import resolve_model_card
    from ..topology.cohort import read_batch_summary

    batch_dir = Path(batch_dir)
    document = read_batch_summary(batch_dir)
    settings = CaseSettings.from_dict(document.get("settings"), f"batch {batch_dir / 'batch.json'}: settings")
    if device:
        settings = CaseSettings.from_dict({**settings.to_dict(), "device": device}, "device")
    card = resolve_model_card(settings.model)
    methods = {str(key): dict(params) for key, params in methods.items()}
    if not methods:
        raise SegXAIInputError("methods: no method given")
    for key in methods:
        get_method(method_name(key))  # an unknown name fails here, naming the available ones
    methods.setdefault("random", {})
    config = config.check()
    if config.class_name and config.class_name not in card.class_names:
        raise SegXAIInputError(f"class_name {config.class_name!r}: the model's classes are {card.class_names}")
    # the batch is about its structure: the default class target is that one (recorded by name)
    config = dataclasses.replace(config, class_name=config.class_name or settings.class_name or card.class_names[1])
    cases, not_evaluated = [], []
    for record in document["cases"]:
        identifier, status = str(record.get("id")), record.get("status", "pending")
        if status in _FINISHED:
            cases.append(identifier)
        else:
            reason = record.get("error", "") if status == "failed" else "not run yet"
            not_evaluated.append({"id": identifier, "status": status, "reason": reason})
    if not cases:
        raise SegXAIInputError(f"batch_dir {batch_dir}: no finished case to evaluate (batch.json lists "
                               f"{len(not_evaluated)} case(s), none done)")
    return BatchEvaluation(batch_dir, settings, card, config, methods, cases, not_evaluated)


def _reference(record: Mapping[str, Any], image: Image, card, class_name: str) -> Optional[Image]:
    """The case's reference mask of the evaluated class (the pipeline's reading of a reference
    label map: any non-zero voxel for a model with one foreground class, else the voxels of the
    class index), or None without one or where it holds no voxel of the class."""
    from ..io import read_image

    if not record.get("reference"):
        return None
    path = Path(record["reference"])
    if not path.exists():
        raise SegXAIInputError(f"reference {path} (batch_case.json): missing")
    reference = read_image(path)
    if reference.num_channels != 1 or not reference.same_grid(image):
        raise SegXAIInputError(f"reference {path} (batch_case.json): expected a one-channel mask on the case's grid "
                               f"(shape {image.spatial_shape})")
    values = reference.array[0]
    index = card.class_names.index(class_name) if class_name else 1
    mask = values != 0 if len(card.classes) == 2 else np.rint(values).astype(np.int64) == index
    if not mask.any():
        return None  # a case without the structure: pointing is undefined, the other metrics are not
    return image.with_array(mask.astype(np.uint8)[None], ("reference",))


def _case_prediction(case, model, settings: CaseSettings):
    """``(prediction, source)``: the written prediction with its model-grid labels and class
    masks, or a new prediction with the batch's settings where the model grid resamples."""
    import torch

    from ..models.preprocessing import preprocess_labels
    from ..pipeline import predict

    card, segmentation = model.card, case.segmentation
    if card.format == "nnunetv2" or card.target_spacing or card.resize_to_shape:
        # the model-grid argmax is not the input-grid labels resampled: predict as segxai evaluate does
        return predict(case.image, model, settings), "predicted again"

    def on_model_grid(mask: np.ndarray) -> torch.Tensor:
        # orientation only: an axis permutation and flips, exact for a label map
        return preprocess_labels(segmentation.labels.with_array(mask.astype(np.uint8)[None]), card).as_tensor()[0]

    labels = preprocess_labels(segmentation.labels, card).as_tensor()[0].round().to(torch.int64)
    masks = torch.stack([on_model_grid(segmentation.mask(c)) > 0.5 for c in range(card.num_classes)])
    return dataclasses.replace(segmentation, model_labels=labels, model_masks=masks), "case folder"


def evaluate_case_task(identifier: str, batch_dir: str, settings_data: dict[str, Any],
                       methods: dict[str, dict[str, Any]], config_data: dict[str, Any],
                       cache: Optional[ModelCache] = None) -> dict[str, Any]:
    """Evaluate one finished case of a batch (a Dask task, or a step of the in-process run); never raises.

    Returns
    -------
    dict
        ``id``, ``status`` (``done`` or ``failed``), ``seconds``, ``worker``; a done case its
        ``rows`` (:func:`~SegXAILib.evaluation.evaluate_case`'s), ``details``, ``images``,
        ``reference`` and ``prediction`` (where its class target came from); a failed one
        ``error``, ``kind`` (``input`` or ``internal``) and ``traceback``.
    """
    from ..evaluation.runner import EvaluationConfig, evaluate_case
    from ..pipeline import read_case

    start = time.perf_counter()
    result: dict[str, Any] = {"id": identifier, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    cache, lock = (cache, threading.Lock()) if cache is not None else _worker_model()
    folder = Path(batch_dir) / "cases" / identifier
    try:
        settings = CaseSettings.from_dict(settings_data)
        config = EvaluationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config_data.items()})
        record = json.loads((folder / CASE_RECORD).read_text(encoding="utf-8"))
        with lock:  # attribution methods hook the network: one case at a time per worker
            model = cache.get(settings)
            case = read_case(folder, verify=True)  # every file matches its checksum, the same model
            reference = _reference(record, case.image, model.card, config.class_name)
            prediction, source = _case_prediction(case, model, settings)
            rows, details = evaluate_case(case.image, model, methods, reference, config, case=identifier,
                                          prediction=prediction)
        result.update(status="done", rows=[{"model": model.card.name, **row} for row in rows], details=details,
                      images=list(record.get("images", [])), reference=record.get("reference"),
                      reference_used=reference is not None, prediction=source)
    except Exception as error:  # recorded; the other cases go on
        result.update(status="failed", kind="input" if isinstance(error, SegXAIInputError) else "internal",
                      error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _write_text(path: Path, text: str) -> Path:
    from ..io import atomic_path

    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def _not_evaluated_markdown(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return ""
    lines = ["## Cases not evaluated\n", "| case | status | reason |", "|---|---|---|"]
    for entry in entries:
        reason = str(entry.get("reason", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {entry['id']} | {entry['status']} | {reason} |")
    return "\n".join(lines) + "\n"


def evaluate_batch(
    batch_dir: Union[str, os.PathLike],
    methods: Mapping[str, Mapping[str, Any]],
    config=None,
    client: Any = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    device: Optional[str] = None,
    title: str = "",
    threads_per_worker: Optional[int] = 1,
) -> dict[str, Any]:
    """Score ``methods`` on every finished case of a batch folder; write ``evaluation/`` (module docstring).

    Parameters
    ----------
    batch_dir : path-like
        A batch folder of :func:`~SegXAILib.batch.run_batch`.
    methods : mapping
        Method key (a registry name, or ``NAME@LABEL``) -> parameters; ``random`` is added.
    config : EvaluationConfig, optional
        Of :func:`~SegXAILib.evaluation.evaluate_case` (the same for every case); an empty
        ``class_name`` means the batch's structure (its settings' ``class_name``, else the first
        foreground class).
    client : distributed.Client, optional
        One task per case on its cluster (the batch's worker plugin keeps each worker's
        network); None evaluates the cases here, one after the other.
    progress, cancel
        ``progress(fraction, "3/6 cases")``; ``cancel`` stops between cases (raises
        :class:`~SegXAILib.progress.Cancelled`, nothing written).
    device : str, optional
        Replaces the batch settings' device.
    title : str
        Of the tables (default: the model's name).
    threads_per_worker : int or None
        Torch threads of each worker (None: leave the workers' setting).

    Returns
    -------
    dict
        The document written to ``evaluation/evaluation.json``: ``config``, ``methods``,
        ``model``, ``model_checksum``, ``cases`` (id, images, reference, where the prediction
        came from), ``not_evaluated`` (id, status, reason: failed or unfinished in the batch, or
        failed here), ``summary`` (:func:`~SegXAILib.evaluation.summarise`), ``rows``,
        ``details``; and ``paths``, the files written.
    """
    from .. import __version__
    from ..evaluation.runner import EvaluationConfig, csv_table, json_ready, markdown_tables, summarise
    from ..io import check_writable_dir

    plan = check_batch_evaluation(batch_dir, methods, config or EvaluationConfig(), device)
    batch = plan.batch_dir.resolve()
    settings_data = plan.settings.to_dict()
    config_data = dataclasses.asdict(plan.config)
    total = len(plan.cases)
    results: dict[str, dict[str, Any]] = {}

    def finish(result: dict[str, Any]) -> None:
        results[result["id"]] = result
        report(progress, len(results) / total, f"{len(results)}/{total} cases")

    report(progress, 0.0, f"0/{total} cases")
    if client is None:
        cache = ModelCache()
        for identifier in plan.cases:
            if cancel is not None:
                cancel.raise_if_cancelled()
            finish(evaluate_case_task(identifier, str(batch), settings_data, plan.methods, config_data, cache))
    else:
        _evaluate_on_cluster(client, plan.cases, str(batch), settings_data, plan.methods, config_data, finish,
                             cancel, threads_per_worker)

    rows: list[dict[str, Any]] = []
    details, cases = [], []
    not_evaluated = list(plan.not_evaluated)
    for identifier in plan.cases:  # the batch's order, whatever order the workers finished in
        result = results[identifier]
        if result["status"] != "done":
            not_evaluated.append({"id": identifier, "status": "evaluation failed", "reason": result.get("error", ""),
                                  "kind": result.get("kind"), "traceback": result.get("traceback", "")})
            continue
        rows.extend(result["rows"])
        details.append(result["details"])
        cases.append({"id": identifier, "images": result["images"], "reference": result["reference"],
                      "reference_used": result["reference_used"], "prediction": result["prediction"],
                      "worker": result["worker"], "seconds": result["seconds"]})
    summary = summarise(rows)
    title = title or f"Evaluation of attribution methods over the batch: {plan.card.name}"
    document = {
        "format": EVALUATION_FORMAT, "version": 1, "title": title, "batch": str(batch),
        "model": plan.card.name, "model_checksum": plan.card.checksum(), "device": plan.settings.device,
        "cluster": "in-process" if client is None else "dask", "config": config_data, "methods": plan.methods,
        "cases": cases, "not_evaluated": not_evaluated, "summary": summary, "rows": rows, "details": details,
        "segxai_version": __version__,
    }
    out = check_writable_dir(batch / EVALUATION_DIR)
    markdown = markdown_tables(summary, title) if summary else f"# {title}\n\nNo case could be evaluated.\n"
    not_listed = _not_evaluated_markdown(not_evaluated)
    paths = [
        _write_text(out / "evaluation.md", markdown + ("\n" + not_listed if not_listed else "")),
        _write_text(out / "evaluation.csv", csv_table(rows)),
        _write_text(out / "evaluation.json", json.dumps(json_ready(document), indent=2, default=str) + "\n"),
    ]
    report(progress, 1.0, "done")
    return {**document, "paths": paths}


def _evaluate_on_cluster(client: Any, identifiers: list[str], batch_dir: str, settings_data: dict[str, Any],
                         methods: dict[str, dict[str, Any]], config_data: dict[str, Any], finish,
                         cancel: Optional[CancelToken], threads_per_worker: Optional[int]) -> None:
    # the batch's plugin: each worker builds the network at its first case and keeps it
    client.register_plugin(ModelPlugin(threads_per_worker), name=PLUGIN_NAME)
    futures = {client.submit(evaluate_case_task, identifier, batch_dir, settings_data, methods, config_data,
                             key=f"segxai-evaluate-{identifier}-{os.urandom(4).hex()}", pure=False): identifier
               for identifier in identifiers}
    _collect(client, futures, finish, cancel)
