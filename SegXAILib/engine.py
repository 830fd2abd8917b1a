"""The engine process: ``segxai run SETTINGS.json IMAGE... --out DIR`` (or ``python -m SegXAILib.engine``).

It is what GUIs (the Slicer module, the browser viewer) are to launch so that heavy work never
runs in their interpreter, as SlicerMONAIAuto3DSeg launches its inference. It runs
:func:`~SegXAILib.pipeline.run_case` and :func:`~SegXAILib.pipeline.write_case` and prints one
JSON object per line on standard output:

* ``{"event": "progress", "fraction": 0.42, "step": "map smoothgrad", "message": "..."}``
* ``{"event": "warning", "kind": "input", "message": "..."}``: the input does not fit what the
  model card expects (also on standard error and in ``case.json``; ``--strict`` refuses instead)
* ``{"event": "estimate", "message": "...", "seconds": 35.2, "bytes": 1.2e9, "items": 20}``: before
  each batched computation starts, its estimate from one measured pass (also on standard error)
* ``{"event": "error", "kind": "input" | "internal", "message": "..."}`` before a non-zero exit;
  ``{"event": "error", "kind": "cost", "message": "...", "estimate": {"seconds": ..., "bytes": ...,
  "items": ..., "limit_seconds": ..., "what": ..., "text": ...}}`` (exit 2) when a computation was
  estimated to take longer than ``--max-minutes`` (default ``$SEGXAI_MAX_MINUTES``, else 10) and
  was refused before it started: a front end shows the estimate, asks, and runs the same request
  again with ``--confirm-long`` (or ``--max-minutes 0``, or ``SEGXAI_MAX_MINUTES=0``)
* ``{"event": "cancelled"}`` before exit 130
* last, ``{"event": "done", "manifest": "/abs/DIR/case.json", "band": ..., "seconds": ...}``

With ``--case DIR`` (a case folder an earlier run wrote from the same images with the same
model card) the run starts from that folder's saved prediction instead of predicting again: only
the steps after the prediction run (instance maps, counterfactuals, uncertainty; maps, QA and
Agg2Exp need the model-grid prediction, not saved, and are refused). A folder of another model,
other images, device or precision is an input error, never a silent second prediction.

SIGINT and SIGTERM cancel the run: the computation sees the cancel token at its next check
(a sliding window, a sample batch); if it has not returned within :data:`GRACE_S` seconds the
process removes its temporary files and exits anyway, always with code 130 and no half-written
file (every file is written to a temporary name and renamed; ``case.json`` is written last).
A refused run (exit 2) leaves no output folder it created: every input is checked before the
folder is made, and a folder the run made is removed when a later check or write fails.
The computation runs on a worker thread so that the main thread can take signals at once, even
while the worker is inside a long native call.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any, Optional, Sequence

__all__ = ["main", "build_parser", "add_arguments", "run_engine", "run_process", "GRACE_S", "EXIT_CANCELLED", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130
#: seconds between a signal and the forced exit when the worker does not return by itself
GRACE_S = 1.5
#: the temporary names :func:`SegXAILib.io.atomic_path` writes before renaming
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}(\..+)?$")


class _Lines:
    """Thread-safe JSON lines on a stream, progress throttled to a few lines per second."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.last = (-1.0, "", 0.0)

    def emit(self, **fields: Any) -> None:
        line = json.dumps(fields, default=str)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def progress(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        last_fraction, last_message, last_time = self.last
        if fraction < 1.0 and message == last_message and fraction - last_fraction < 0.01 and now - last_time < 0.5:
            return
        self.last = (fraction, message, now)
        step, _, detail = message.partition(": ")
        self.emit(event="progress", fraction=round(float(fraction), 4), step=step, message=detail)


def remove_temporary_files(folder: Path) -> list[Path]:
    """Delete the unfinished temporary files an interrupted atomic write left in ``folder``."""
    removed = []
    if folder.is_dir():
        for path in folder.rglob(".*"):
            if path.is_file() and _TEMPORARY.match(path.name):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("settings", type=Path, help="CaseSettings JSON (see SegXAILib.pipeline.CaseSettings)")
    parser.add_argument("images", nargs="+", type=Path, help="one image per model input channel, in the card's order")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--case", type=Path, default=None,
                        help="a case folder of the same model and images (written by an earlier run): its saved "
                             "prediction is reused, only the steps after it run (instance maps, counterfactuals, "
                             "uncertainty)")
    parser.add_argument("--reference", type=Path, default=None, help="reference label map on the input grid")
    parser.add_argument("--device", default=None, help="overrides the settings' device")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="refuse an input that does not fit what the model card expects (overrides the settings)")
    parser.add_argument("--image-format", default=".nii.gz", choices=(".nii.gz", ".nrrd", ".mha"),
                        help="the case folder's image format (.nrrd keeps the geometry in float64)")
    from .progress import cost_options

    cost_options(parser)  # --max-minutes, --confirm-long: the request's time limit
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="cancel the run (as on SIGTERM) when the process that started it ends "
                             "(front ends' engine jobs; a shell's `segxai run` keeps running under nohup)")
    parser.set_defaults(engine_lines=True)  # segxai's main leaves the estimate lines to the engine
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="segxai run", description=__doc__.splitlines()[0]))


def run_engine(args: argparse.Namespace, stream: Optional[IO[str]] = None) -> int:
    """Run one case as the engine process does (signals included); returns the exit code."""
    from .progress import cost_limit_seconds
    from .image import SegXAIInputError
    from .progress import CancelToken, Cancelled, SegXAICostRefused, cost_limit

    lines = _Lines(stream or sys.stdout)
    token = CancelToken()
    outcome: dict[str, Any] = {}
    start = time.perf_counter()
    from .io import first_missing_folder

    created = first_missing_folder(args.out)  # what a refused run removes
    warnings = _WarningLines(lines)
    input_logger = logging.getLogger("SegXAILib.input")
    propagate = input_logger.propagate
    input_logger.addHandler(warnings)
    input_logger.propagate = False  # once each: as a JSON line and on standard error
    estimates = _EstimateLines(lines)
    memory_logger = logging.getLogger("SegXAILib.memory")
    memory_state = memory_logger.level, memory_logger.propagate
    memory_logger.addHandler(estimates)
    memory_logger.setLevel(logging.INFO)
    memory_logger.propagate = False

    def work() -> None:
        try:
            # set in this thread: a context variable does not pass into a new thread
            with cost_limit(cost_limit_seconds(args)):
                outcome["manifest"] = _run(args, lines.progress, token)
        except Cancelled:
            outcome["cancelled"] = True
        except SegXAICostRefused as error:  # before the long part: structured, with the estimate
            outcome["error"] = ("cost", str(error))
            outcome["estimate"] = error.details()
        except SegXAIInputError as error:
            outcome["error"] = ("input", str(error))
        except (MemoryError, RuntimeError) as error:
            from .models.memory import is_out_of_memory, memory_refusal

            if is_out_of_memory(error):  # refused with the estimate, like a pipeline step
                outcome["error"] = ("input", str(memory_refusal(error)))
            else:
                outcome["error"] = ("internal", f"{type(error).__name__}: {error}")
                outcome["traceback"] = traceback.format_exc()
        except BaseException as error:  # reported as a line and an exit code, never lost
            outcome["error"] = ("internal", f"{type(error).__name__}: {error}")
            outcome["traceback"] = traceback.format_exc()

    signalled = threading.Event()

    def on_signal(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        token.cancel()
        signalled.set()

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        # SIGBREAK: what a launcher's CTRL_BREAK_EVENT (Windows) delivers
        for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGBREAK", None)):
            if signum is not None:
                handlers[signum] = signal.signal(signum, on_signal)
    worker = threading.Thread(target=work, name="segxai-engine", daemon=True)
    # the parent's pid now; once it ends the process is re-parented (to init or a subreaper)
    parent = os.getppid() if getattr(args, "exit_with_parent", False) and hasattr(os, "getppid") else None
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
            if parent is not None and not signalled.is_set() and os.getppid() != parent:
                print("segxai run: the process that started this run ended; cancelling", file=sys.stderr)
                on_signal(signal.SIGTERM, None)
            if signalled.is_set():
                worker.join(GRACE_S)
                if worker.is_alive():
                    # the worker is inside a long native call: give up on it
                    remove_temporary_files(args.out)
                    lines.emit(event="cancelled", forced=True)
                    sys.stderr.flush()
                    os._exit(EXIT_CANCELLED)
                break
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        input_logger.removeHandler(warnings)
        input_logger.propagate = propagate
        memory_logger.removeHandler(estimates)
        memory_logger.setLevel(memory_state[0])
        memory_logger.propagate = memory_state[1]

    if outcome.get("cancelled") or (signalled.is_set() and "manifest" not in outcome):
        remove_temporary_files(args.out)
        lines.emit(event="cancelled")
        return EXIT_CANCELLED
    if "error" in outcome:
        kind, message = outcome["error"]
        if kind in ("input", "cost") and created is not None and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)  # a refused run leaves no folder it made
        if kind == "cost":
            lines.emit(event="error", kind=kind, message=message, estimate=outcome["estimate"])
            from .progress import CONFIRM_HINT

            print(f"segxai run: {message}; {CONFIRM_HINT}", file=sys.stderr)
        else:
            lines.emit(event="error", kind=kind, message=message)
            print(f"segxai run: {message}", file=sys.stderr)
        if kind == "internal":
            print(outcome.get("traceback", ""), file=sys.stderr)
        return EXIT_BAD_INPUT if kind in ("input", "cost") else 1
    manifest = outcome["manifest"]
    summary = json.loads(Path(manifest).read_text(encoding="utf-8"))["summary"]
    lines.emit(event="done", manifest=str(Path(manifest).resolve()), band=summary.get("qa_band"),
               seconds=round(time.perf_counter() - start, 3))
    return 0


class _WarningLines(logging.Handler):
    """The input check's warnings as ``{"event": "warning"}`` lines and on standard error."""

    def __init__(self, lines: _Lines) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.emit(event="warning", kind="input", message=message)
        print(f"segxai run: warning: {message}", file=sys.stderr)


class _EstimateLines(logging.Handler):
    """Each computation's estimate (``SegXAILib.memory``) as an ``{"event": "estimate"}`` line and on
    standard error, before the computation starts."""

    def __init__(self, lines: _Lines) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "segxai_estimate", None)
        if fields is None:
            return
        self.lines.emit(event="estimate", message=record.getMessage(),
                        **{k: v for k, v in fields.items() if k != "text"})
        print(f"segxai run: estimate: {record.getMessage()}", file=sys.stderr)


def _run(args: argparse.Namespace, progress, cancel) -> Path:
    from .io import check_output_dir, read_image
    from .pipeline import CaseSettings, load_case_model, read_case_images, resolve_model_card, run_case, write_case
    from .pipeline.run import reuse_prediction, run_steps
    from .progress import sub_progress

    settings = CaseSettings.load(args.settings)
    overrides = {"device": args.device} if args.device else {}
    if getattr(args, "strict", None):
        overrides["strict"] = True
    if overrides:
        settings = CaseSettings.from_dict({**settings.to_dict(), **overrides}, "--device")  # strict: a flag, never wrong
    card = resolve_model_card(settings.model)
    saved = None
    if getattr(args, "case", None) is not None:
        progress(0.0, "reading the saved case")
        saved = _saved_case(args.case, args.images, card)
    image = saved.image if saved is not None else read_case_images(args.images, card, settings.resample_slices)
    reference = read_image(args.reference) if args.reference is not None else None
    # checked, not made: write_case makes it with the first file, after every input check passed
    out = check_output_dir(args.out)
    # with a saved case, its reading (checksums verified) is the share a prediction would have
    start = 0.0 if saved is None else 0.05
    progress(start, "loading the model")
    model = load_case_model(settings)
    if saved is None:
        case = run_case(image, model, settings, reference=reference, progress=sub_progress(progress, 0.0, 0.97),
                        cancel=cancel)
    else:
        # the saved prediction, checked to be this model's on these inputs: no second prediction
        case = reuse_prediction(saved, model, settings, reference)
        case.notes.append(f"segment: the prediction of {Path(args.case).resolve()} reused")
        run_steps(case, model, progress=sub_progress(progress, start, 0.97), cancel=cancel)
    progress(0.97, "writing")
    return write_case(case, out, cancel=cancel, suffix=args.image_format,
                      inputs=dict(zip(card.input_channels, args.images)))


def _saved_case(folder: Path, images: Sequence[Path], card):
    """The case folder ``folder`` read back (checksums verified), after checking that it was run
    with ``card`` (checksum) on ``images`` (the files its manifest records, channel by channel)."""
    from .image import SegXAIInputError
    from .pipeline import read_case, read_manifest

    manifest = read_manifest(folder, verify=False)
    recorded = manifest.get("model") or {}
    if recorded.get("checksum") != card.checksum():
        raise SegXAIInputError(f"case {folder}: run with model {recorded.get('name')!r} (checksum "
                               f"{recorded.get('checksum')!r}), not {card.name!r} (checksum {card.checksum()!r})")
    given = {channel: str(Path(path).resolve()) for channel, path in zip(card.input_channels, images)}
    if len(images) != len(card.input_channels) or manifest.get("inputs") != given:
        raise SegXAIInputError(f"case {folder}: run on the images {manifest.get('inputs')}, not on {given}")
    return read_case(folder)  # verified: a changed file is refused, never read silently wrong


def run_process(args: argparse.Namespace) -> int:
    """:func:`run_engine` as a process's whole work: a cancelled run exits at once."""
    code = run_engine(args)
    if code == EXIT_CANCELLED:
        # the interpreter's teardown (torch, MONAI) can take seconds on a busy machine: a
        # cancelled run has nothing left to flush but the streams
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_process(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
