"""The common shape of every attribution method (Captum style).

One class per method, constructed on a :class:`~SegXAILib.attribution.forward.SegmentationForward`,
with one entry point ``attribute(inputs, ...)`` taking ``inputs`` ``(1, C, D, H, W)`` on the
model grid and returning a map of the same shape. Shared keyword names: ``batch_size``
(samples per backward pass; 0, the default of the gradient family: the largest that fits in
the free memory, see :mod:`SegXAILib.models.memory`), ``seed``, ``progress``, ``cancel``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional

import numpy as np
import torch

from ..image import SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report
from .forward import SegmentationForward

__all__ = ["Attribution", "Parameter", "batched", "generator_for", "check_inputs", "memory_batch_size",
           "AUTO_BATCH"]

_LOG = logging.getLogger("SegXAILib.memory")


@dataclass(frozen=True)
class Parameter:
    """One parameter of a method, as front ends show it (CLI ``--param``, Slicer forms).

    ``kind`` is ``"int"``, ``"float"``, ``"bool"``, ``"choice"``, ``"str"`` or ``"object"``
    (a value only Python code can pass, e.g. reference volumes; no text form); ``minimum`` /
    ``maximum`` bound numbers; ``choices`` lists the values of a choice. ``objects`` are the
    Python types a caller may pass instead of a value of ``kind`` (tensors, images, a number
    for a named baseline): they go to the method unchecked, and the method checks them.
    """

    name: str
    kind: str
    default: Any
    help: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: tuple = ()
    objects: tuple = ()
    #: an int parameter whose 0 means "chosen automatically" (a batch size fitted to the free
    #: memory): the text ``auto`` is read as 0
    auto: bool = False

    def parse(self, text: str) -> Any:
        """A value from its text (``"20"``, ``"0.1"``, ``"true"``, ``"min"``), checked."""
        if self.kind == "object":
            raise SegXAIInputError(f"parameter {self.name}: takes {self._object_names()} from Python code, not text")
        if self.auto and str(text).strip().lower() == "auto":
            return 0
        try:
            if self.kind == "int":
                value: Any = int(text)
            elif self.kind == "float":
                value = float(text)
            elif self.kind == "bool":
                if str(text).lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                value = str(text).lower() in ("1", "true", "yes")
            else:
                value = str(text)
        except ValueError:
            raise SegXAIInputError(f"parameter {self.name}: expected {self.kind}, got {text!r}") from None
        return self.check(value)

    def check(self, value: Any) -> Any:
        """``value`` as the method takes it: text parsed (:meth:`parse`), JSON numbers coerced
        (``3.0`` -> 3 for an int, ``1`` -> 1.0 for a float), then range and choice checked;
        a value of one of ``objects`` is returned unchecked.

        Raises
        ------
        SegXAIInputError
            A value of another type, out of range, or not one of the choices.
        """
        # bool is an int in Python: True is no sample count, and no number for a baseline
        is_bool = isinstance(value, (bool, np.bool_))
        if self.objects and not (is_bool and self.kind != "bool") and isinstance(value, self.objects):
            return value
        if value is None and self.default is None:
            return None
        if isinstance(value, str) and self.kind in ("int", "float", "bool", "object"):
            return self.parse(value)
        if self.kind == "int":
            integral = isinstance(value, (int, np.integer)) or (
                isinstance(value, (float, np.floating)) and float(value).is_integer())
            if is_bool or not integral:
                raise SegXAIInputError(f"parameter {self.name}: expected int, got {value!r}")
            value = int(value)
        elif self.kind == "float":
            if is_bool or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
                raise SegXAIInputError(f"parameter {self.name}: expected a finite float, got {value!r}")
            value = float(value)
        elif self.kind == "bool":
            if not is_bool and not (isinstance(value, (int, np.integer)) and value in (0, 1)):
                raise SegXAIInputError(f"parameter {self.name}: expected bool, got {value!r}")
            value = bool(value)
        elif self.kind in ("str", "choice"):
            if not isinstance(value, str):
                expected = f"one of {list(self.choices)}" if self.kind == "choice" else "str"
                raise SegXAIInputError(
                    f"parameter {self.name}: expected {expected}{self._or_objects()}, got {value!r}")
        elif self.kind == "object":
            raise SegXAIInputError(f"parameter {self.name}: expected {self._object_names()}, got {type(value).__name__}")
        if self.kind == "choice" and value not in self.choices:
            raise SegXAIInputError(f"parameter {self.name}: expected one of {list(self.choices)}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise SegXAIInputError(f"parameter {self.name}: must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise SegXAIInputError(f"parameter {self.name}: must be <= {self.maximum}, got {value}")
        return value

    def _object_names(self) -> str:
        return " or ".join(t.__name__ for t in self.objects) or "a Python object"

    def _or_objects(self) -> str:
        return f" or {self._object_names()}" if self.objects else ""


def check_inputs(inputs: torch.Tensor) -> torch.Tensor:
    if inputs.ndim != 5 or inputs.shape[0] != 1:
        raise SegXAIInputError(f"inputs must be one volume (1, C, D, H, W), got {tuple(inputs.shape)}")
    return inputs.detach()


def generator_for(seed: Optional[int], device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed`` (0 when None: results stay reproducible)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(0 if seed is None else int(seed))
    return generator


def batched(
    total: int,
    batch_size: int,
    progress: Optional[ProgressCallback],
    cancel: Optional[CancelToken],
    message: str,
) -> Iterator[range]:
    """Ranges of at most ``batch_size`` sample indices covering ``range(total)``, checking
    ``cancel`` before and reporting progress after each."""
    if batch_size < 1:
        raise SegXAIInputError(f"batch_size must be >= 1, got {batch_size}")
    done = 0
    while done < total:
        if cancel is not None:
            cancel.raise_if_cancelled()
        chunk = range(done, min(total, done + batch_size))
        yield chunk
        done = chunk.stop
        report(progress, done / total, message)


def memory_batch_size(
    forward: SegmentationForward,
    inputs: torch.Tensor,
    requested: int,
    total: int,
    what: str,
    cap: int = 4,
    name: str = "batch_size",
    progress: Optional[ProgressCallback] = None,
    whole_graph: bool = False,
    check_time: bool = True,
) -> int:
    """The batch size of ``total`` gradient samples of ``forward`` on ``inputs``: ``requested``
    checked against the free memory, or with 0 (auto) the largest that fits, at most ``cap``
    (:func:`~SegXAILib.models.memory.fit_batch`, from one measured window pass). ``whole_graph``:
    the items are replicas run through the windowed forward with their whole graph (per-voxel
    and instance-max aggregation), not :meth:`SegmentationForward.gradient` samples.
    ``check_time=False``: the caller checks the time itself from a measurement of its own
    items (instance max by batched VJPs of one shared forward, whose items cost a fraction
    of a window pass).

    The estimate (memory of a batch, time of the whole) is logged (logger ``SegXAILib.memory``,
    the record's ``segxai_estimate``: its fields) and reported as the progress message, so that
    front ends show it before the long part starts. Under a time limit
    (:func:`~SegXAILib.progress.cost_limit`) a computation estimated to take longer is
    refused here, before its first batch.

    Raises
    ------
    SegXAIInputError
        ``requested`` (named ``name``) does not fit, or not even one sample does.
    SegXAICostRefused
        The estimated time is over the limit in force (the message gives the estimate).
    """
    from ..models.memory import available_memory, check_cost, estimate_text, fit_batch, note_estimate

    if requested < 0:
        raise SegXAIInputError(f"{name} must be >= 1 (or 0: the largest that fits in memory), got {requested}")
    cost = forward.gradient_cost(inputs)
    per_item = cost.graph_bytes if whole_graph else cost.per_sample_bytes
    size = fit_batch(requested, per_item, available_memory(inputs.device), name=name, cap=cap,
                     limit=total, device=str(inputs.device))
    batch, seconds = min(size, total), cost.seconds * total
    text = estimate_text(f"{what}: {total} sample(s) x {cost.passes} window pass(es)", batch, per_item, 0, seconds)
    note_estimate(text)
    if check_time:
        check_cost(f"{what}: {total} sample(s) x {cost.passes} window pass(es)", seconds, batch * per_item, total,
                   text, _SMALLER.get(what, _SMALLER[""]))
    log_estimate(text, seconds, batch * per_item, total) if check_time else _LOG.info(text)
    report(progress, 0.0, text)
    return size


def log_estimate(text: str, seconds: float, memory_bytes: float, items: int) -> None:
    """Log a computation's estimate (logger ``SegXAILib.memory``; the record's
    ``segxai_estimate`` holds its fields): the CLI prints it and the engine sends it as an
    ``estimate`` event before the computation's long part."""
    _LOG.info(text, extra={"segxai_estimate": {"text": text, "seconds": round(seconds, 3),
                                               "bytes": int(memory_bytes), "items": int(items)}})


#: how to make a computation (by its ``what``) smaller when it is refused for its time
_SMALLER = {
    "per-voxel maps": 'aggregation="target" (one backward of the target scalar instead of one per target voxel '
                      "term), or a smaller target (a region, an instance)",
    "instance saliency (max)": 'aggregation "mean" (one backward per noise sample instead of one per sample and '
                               "voxel of the instance), or fewer samples (n_samples)",
    "": "fewer samples (n_samples), or a smaller input or target",
}


#: the batch-size value that means "the largest that fits in the free memory"
AUTO_BATCH = 0


class Attribution:
    """Base class. Subclasses set ``name`` and implement ``attribute``."""

    name: ClassVar[str] = ""
    #: one line for ``segxai methods`` and the Slicer method list
    summary: ClassVar[str] = ""
    #: the parameters ``attribute`` takes besides inputs / progress / cancel
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    #: True when the method draws random numbers (it then takes ``seed``)
    stochastic: ClassVar[bool] = False

    def __init__(self, forward: SegmentationForward) -> None:
        self.forward = forward

    def attribute(self, inputs: torch.Tensor, **kwargs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # a helper shared by the gradient family: mean over samples of a per-sample statistic
    def _mean_over_samples(
        self,
        make_batch: Callable[[range], torch.Tensor],
        total: int,
        batch_size: int,
        statistic: Callable[[torch.Tensor, torch.Tensor, range], torch.Tensor],
        progress: Optional[ProgressCallback],
        cancel: Optional[CancelToken],
    ) -> torch.Tensor:
        """``mean_k statistic(x_k, dT/dx(x_k))`` over ``total`` samples made by ``make_batch``
        (``batch_size`` 0: chosen from the free memory, :func:`memory_batch_size`)."""
        batch_size = memory_batch_size(self.forward, make_batch(range(1)), batch_size, total, self.name,
                                       progress=progress)
        accumulated: Optional[torch.Tensor] = None
        for chunk in batched(total, batch_size, progress, cancel, self.name):
            samples = make_batch(chunk)
            gradients = self.forward.gradient(samples)
            contribution = statistic(samples, gradients, chunk).sum(dim=0, keepdim=True)
            accumulated = contribution if accumulated is None else accumulated + contribution
        assert accumulated is not None
        return accumulated / total
