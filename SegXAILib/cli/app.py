"""The ``segxai`` command: its parser and :func:`main`.

Exit codes: 0 success, 2 bad input (a clear message names the file or option), not enough
memory or a computation estimated to take longer than ``--max-minutes`` (refused with the
estimate before it starts, never a traceback), 130
interrupted, 1 any other failure; ``segxai batch``: 3 when some cases failed (the others finished).

The one-case commands print each computation's estimate (memory of a batch, time of the whole,
from one measured pass) on standard error before it starts, and apply the time limit of
``--max-minutes`` / ``--confirm-long`` (:func:`~SegXAILib.progress.cost_limit`); batch and
cohort commands are explicit jobs and run with no limit.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..image import SegXAIInputError
from ..io import first_missing_folder
from ..progress import Cancelled, SegXAICostRefused, cost_limit
from .common import CONFIRM_HINT, cost_limit_seconds
from . import batch, counterfactual, demo, evaluate, explain, lesions, patterns, qa, run, segment, uncertainty, view

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]

EXIT_BAD_INPUT = 2

# Each adds its sub-commands with ``add_commands(subparsers)``, in the order ``segxai --help`` lists them.
_COMMAND_GROUPS = (segment, explain, uncertainty, counterfactual, demo, lesions, patterns, evaluate, qa, run, batch, view)


class _StandardError(logging.Handler):
    """Writes to the standard error of the moment (a test's captured stream included)."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        print(f"segxai {self.command}: warning: {record.getMessage()}", file=sys.stderr)


class _Estimates(logging.Handler):
    """Each computation's estimate (``SegXAILib.memory``) on standard error, above any progress bar."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.INFO)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "segxai_estimate", None) is None:
            return
        from tqdm import tqdm

        tqdm.write(f"segxai {self.command}: estimate: {record.getMessage()}", file=sys.stderr)


@contextmanager
def _estimates(command: str, enabled: bool) -> Iterator[None]:
    """The estimate lines of the block's computations on standard error (once each: the logger
    does not also pass them on to ``--verbose``'s handler)."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("SegXAILib.memory")
    handler = _Estimates(command)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@contextmanager
def _input_warnings(command: str) -> Iterator[None]:
    """The input check's warnings (``SegXAILib.input``: the input does not fit the model card) on
    standard error, once each, as ``segxai COMMAND: warning: ...``."""
    logger = logging.getLogger("SegXAILib.input")
    handler = _StandardError(command)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _remove_new_output(out: Path) -> None:
    """A refused run leaves nothing behind: the output folder it created, with any parent folder it
    created (none existed when the command started, so everything in them is the run's), is removed."""
    if out.is_dir():
        shutil.rmtree(out, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segxai",
        description="Explainability and quality assurance for 3D medical segmentation models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    # one-case commands: a refusal leaves no output folder behind (batch outputs are kept: resumable)
    out = getattr(args, "out", None) if getattr(args, "one_case_output", False) else None
    created = first_missing_folder(out) if out is not None else None
    limited = getattr(args, "cost_limited", False)
    try:
        limit = cost_limit(cost_limit_seconds(args)) if limited else nullcontext()
        # the engine (segxai run) prints its estimates itself, as JSON lines too
        with _input_warnings(args.command), _estimates(args.command, limited and not getattr(args, "engine_lines", False)):
            with limit:
                return int(args.run(args))
    except SegXAIInputError as error:
        # a computation refused for its estimated time (SegXAICostRefused), before it started
        hint = f"; {CONFIRM_HINT}" if isinstance(error, SegXAICostRefused) else ""
        print(f"segxai {args.command}: error: {error}{hint}", file=sys.stderr)
        if created is not None:
            _remove_new_output(created)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Cancelled):
        print(f"segxai {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as error:
        from ..models.memory import is_out_of_memory, memory_refusal

        if not is_out_of_memory(error):
            raise
        # out of memory outside a pipeline step (which refuses by itself): the same refusal
        print(f"segxai {args.command}: error: {memory_refusal(error)}", file=sys.stderr)
        if created is not None:
            _remove_new_output(created)
        return EXIT_BAD_INPUT
