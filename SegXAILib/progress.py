"""Progress reporting and cancellation, shared by every long operation.

A long operation takes ``progress: ProgressCallback | None`` and ``cancel: CancelToken | None``.
It calls ``progress(fraction, message)`` with ``fraction`` in [0, 1] and checks
``cancel.raise_if_cancelled()`` between units of work. Front ends adapt these: the CLI to a
tqdm bar, the Slicer module to its progress dialog and Cancel button.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Optional, Sequence, TypeVar

__all__ = ["ProgressCallback", "CancelToken", "Cancelled", "sub_progress", "report", "track"]

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
