"""Progress reporting and cancellation, shared by every long operation.

A long operation takes ``progress: ProgressCallback | None`` and ``cancel: CancelToken | None``.
It calls ``progress(fraction, message)`` with ``fraction`` in [0, 1] and checks
``cancel.raise_if_cancelled()`` between units of work. Front ends adapt these: the CLI to a
tqdm bar, the Slicer module to its progress dialog and Cancel button.

The time limit of the user's request (:func:`cost_limit`) is here too: a context variable that
the front ends set and that :func:`SegXAILib.models.memory.check_cost` reads before a batched
computation starts (see :mod:`SegXAILib.models.memory` for why a context variable rather than a
field of :class:`CancelToken`).
"""

from __future__ import annotations

import argparse
import contextvars
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

from .image import SegXAIInputError

__all__ = ["ProgressCallback", "CancelToken", "Cancelled", "sub_progress", "report", "track", "cost_limit",
           "current_cost_limit", "default_max_minutes", "SegXAICostRefused", "DEFAULT_MAX_MINUTES", "MAX_MINUTES_ENV", "cost_options", "cost_limit_seconds", "CONFIRM_HINT"]

ProgressCallback = Callable[[float, str], None]

T = TypeVar("T")


class Cancelled(RuntimeError):
    """Raised inside a long operation when its cancel token was set."""


class CancelToken:
    """A thread-safe flag that a front end sets and a worker polls."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("operation cancelled")


def report(progress: Optional[ProgressCallback], fraction: float, message: str = "") -> None:
    """Call ``progress`` if given, with ``fraction`` clipped to [0, 1]."""
    if progress is not None:
        progress(min(1.0, max(0.0, float(fraction))), message)


def sub_progress(progress: Optional[ProgressCallback], start: float, stop: float) -> Optional[ProgressCallback]:
    """A callback that maps [0, 1] onto [start, stop] of ``progress`` (for nested steps)."""
    if progress is None:
        return None

    def scaled(fraction: float, message: str = "") -> None:
        report(progress, start + (stop - start) * fraction, message)

    return scaled


def track(
    items: Sequence[T],
    progress: Optional[ProgressCallback],
    cancel: Optional[CancelToken],
    message: str = "",
) -> Iterator[T]:
    """Iterate ``items``, checking ``cancel`` before each and reporting after each."""
    total = max(1, len(items))
    for index, item in enumerate(items):
        if cancel is not None:
            cancel.raise_if_cancelled()
        yield item
        report(progress, (index + 1) / total, message)


# ---- the time limit of a request ----------------------------------------------------------------
#: the interactive front ends' default limit (minutes); 0 means no limit
DEFAULT_MAX_MINUTES = 10.0
#: the environment variable that sets the front ends' default limit (minutes; 0: no limit); how a
#: launcher that only passes an environment (the Slicer session's engine processes) confirms
MAX_MINUTES_ENV = "SEGXAI_MAX_MINUTES"

#: seconds a computation may be estimated to take; None: no limit (the library's default)
_COST_LIMIT: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("segxai_cost_limit", default=None)


def default_max_minutes() -> float:
    """The front ends' default limit in minutes: :data:`MAX_MINUTES_ENV` when set, else
    :data:`DEFAULT_MAX_MINUTES`.

    Raises
    ------
    SegXAIInputError
        The variable is not a number >= 0.
    """
    text = os.environ.get(MAX_MINUTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_MINUTES
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise SegXAIInputError(f"{MAX_MINUTES_ENV}={text!r}: expected minutes >= 0 (0: no limit)")
    return value


@contextmanager
def cost_limit(seconds: Optional[float]) -> Iterator[None]:
    """Within the block (this thread or task), refuse computations estimated to take longer than
    ``seconds`` (:class:`SegXAICostRefused`); None or 0: no limit (a confirmed run).

    Raises
    ------
    SegXAIInputError
        ``seconds`` negative or not a number.
    """
    if seconds is not None and not float(seconds) >= 0:
        raise SegXAIInputError(f"cost limit: expected seconds >= 0 (0 or None: no limit), got {seconds}")
    token = _COST_LIMIT.set(float(seconds) if seconds else None)
    try:
        yield
    finally:
        _COST_LIMIT.reset(token)


def current_cost_limit() -> Optional[float]:
    """The time limit in force here (seconds), None without one."""
    return _COST_LIMIT.get()


class SegXAICostRefused(SegXAIInputError):
    """A computation refused before it started because its estimated time is over the limit.

    Attributes
    ----------
    what : str
        The computation (``"per-voxel maps: 5184 sample(s) x 1 window pass(es)"``).
    seconds : float
        Its estimated time.
    bytes : float
        The estimated memory of one batch.
    items : int
        The items (samples, voxel terms) it would compute.
    limit_seconds : float
        The limit it is over.
    estimate : str
        The estimate line (:func:`estimate_text`).
    """

    def __init__(self, message: str, what: str, seconds: float, memory_bytes: float, items: int,
                 limit_seconds: float, estimate: str) -> None:
        super().__init__(message)
        self.what, self.seconds, self.bytes, self.items = what, float(seconds), float(memory_bytes), int(items)
        self.limit_seconds, self.estimate = float(limit_seconds), estimate

    def details(self) -> dict[str, Any]:
        """The estimate as JSON-ready fields (the engine's structured refusal)."""
        return {"what": self.what, "seconds": round(self.seconds, 3), "bytes": int(self.bytes), "items": self.items,
                "limit_seconds": round(self.limit_seconds, 6), "text": self.estimate}


# ---------------------------------------------------------------- the limit's command-line options
# (here, below the CLI, because the engine process parses them too)

#: what a refusal for the estimated time tells the user of a command
CONFIRM_HINT = "to confirm: --confirm-long (or --max-minutes N to set the limit; 0: none)"


def cost_options(command: argparse.ArgumentParser) -> None:
    """``--max-minutes N`` and ``--confirm-long``: the time limit of the command's computations
    (:func:`cost_limit`); segxai's main and the engine apply it."""
    command.add_argument("--max-minutes", type=float, default=None, metavar="N",
                         help="refuse, before it starts, a computation estimated (from one measured pass) to take "
                              f"longer than N minutes; 0: no limit (default: ${MAX_MINUTES_ENV}, else "
                              f"{DEFAULT_MAX_MINUTES:g})")
    command.add_argument("--confirm-long", action="store_true",
                         help="run computations whatever their estimated time (no limit; the estimate is still printed)")
    command.set_defaults(cost_limited=True)


def cost_limit_seconds(args: argparse.Namespace) -> Optional[float]:
    """The time limit (seconds) of a command's computations: None without one (``--confirm-long``,
    ``--max-minutes 0``, or a command without the options: batch and cohort jobs)."""
    if not getattr(args, "cost_limited", False) or getattr(args, "confirm_long", False):
        return None
    minutes = getattr(args, "max_minutes", None)
    if minutes is None:
        minutes = default_max_minutes()
    if not minutes >= 0:
        raise SegXAIInputError(f"--max-minutes {minutes}: must be >= 0 (0: no limit)")
    return 60.0 * float(minutes) or None
