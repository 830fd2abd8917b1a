"""Memory budgets: how much memory a device has free, what one window's forward + backward
costs, and the largest batch that fits.

Every batched computation (samples per backward in SmoothGrad / integrated gradients /
expected gradients, voxel terms per backward in guided per-voxel aggregation, replicas and
VJPs in instance saliency) takes its batch size through :func:`fit_batch`: a batch size of 0
(the default, "auto") becomes the largest that fits in the free memory, at most the old
fixed default; an explicit batch size that cannot fit is refused with the estimate instead
of exhausting the machine (a process killed by the kernel's out-of-memory killer leaves no
message at all).

The cost of one item is measured, not guessed from the architecture: one window of the
input goes through the network forward and backward once (:func:`measure_pass`). On CUDA
the allocator's peak is read; on the CPU the bytes of the tensors the autograd graph saves
for the backward are summed (:func:`saved_tensor_bytes`), plus the gradients in flight.

The same measured pass gives the time of the whole computation (seconds of one item times the
items). Under a time limit (:func:`cost_limit`, set by the interactive front ends: the CLI's
one-case commands, the engine, the Slicer module and the browser viewer, 10 minutes by default)
a computation estimated to take longer is refused before its long part starts
(:class:`SegXAICostRefused`, with the estimate and the ways forward); confirming (no limit) runs
the same computation, exact as ever: nothing switches method behind the caller's back. Without
a limit set (the Python API, batch and cohort runs: explicit jobs) nothing is refused.

The limit lives in :mod:`SegXAILib.progress` (re-exported here), which imports no torch: the
command-line parsers read its default. Why a context variable and not a field of the
:class:`~SegXAILib.progress.CancelToken` or a parameter: the limit is the user's policy for one request, set once by the front end, and it
must reach every batched computation however deeply it is nested, including callers that
receive no cancel token (instance mean aggregation); a cancel token is a per-job handle for
stopping, and a parameter would have to be threaded through every method and step. A context
variable is per thread (and per asyncio task): a worker thread sets it itself (the engine does),
and threads that never set it (batch workers) run with no limit.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch

from ..image import SegXAIInputError
from ..progress import (DEFAULT_MAX_MINUTES, MAX_MINUTES_ENV, SegXAICostRefused, cost_limit, current_cost_limit,
                        default_max_minutes)

__all__ = ["available_memory", "saved_tensor_bytes", "measure_pass", "PassCost", "fit_batch", "format_bytes",
           "estimate_text", "note_estimate", "is_out_of_memory",
           "memory_refusal", "SAFETY", "AUTO", "SegXAICostRefused", "cost_limit", "current_cost_limit", "check_cost",
           "format_seconds", "default_max_minutes", "DEFAULT_MAX_MINUTES", "MAX_MINUTES_ENV"]

#: share of the free memory a computation may plan to use (the rest: allocator slack,
#: temporaries the estimate does not see, the rest of the process)
SAFETY = 0.8
#: the batch-size value that means "the largest that fits"
AUTO = 0


def format_bytes(count: float) -> str:
    """``1.5e9`` -> ``"1.4 GB"`` (binary units, one decimal; MB below a gigabyte)."""
    if count >= 1024**3:
        return f"{count / 1024**3:.1f} GB"
    return f"{count / 1024**2:.0f} MB" if count >= 1024**2 else f"{count / 1024:.0f} kB"


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_available() -> Optional[int]:
    """What the process's cgroup still allows (v2, then v1); None without a limit."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_path)
        if limit is not None and limit < 2**60:  # v1 writes a huge number for "no limit"
            usage = _read_int(usage_path) or 0
            return max(0, limit - usage)
    return None


def _virtual_size() -> Optional[int]:
    """The process's current virtual size (what RLIMIT_AS is counted against)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().vms)
    except Exception:  # noqa: BLE001 - psutil is optional, and some platforms refuse
        return None


def _address_space_available() -> Optional[int]:
    """What RLIMIT_AS (``ulimit -v``) still allows; None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    size = _virtual_size()
    return None if size is None else max(0, soft - size)


def available_memory(device: Union[str, torch.device] = "cpu") -> int:
    """Bytes a computation on ``device`` can still allocate.

    CUDA: the free memory :func:`torch.cuda.mem_get_info` reports, plus what PyTorch's caching
    allocator holds but does not use. CPU (and MPS, whose memory is the machine's): the lowest
    of the machine's available memory (``psutil``, else ``MemAvailable`` of ``/proc/meminfo``),
    what the process's cgroup still allows (``memory.max``) and what its address-space limit
    (``RLIMIT_AS``) still allows.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    candidates = []
    try:
        import psutil

        candidates.append(int(psutil.virtual_memory().available))
    except Exception:  # noqa: BLE001 - optional dependency
        meminfo = _meminfo_available()
        if meminfo is not None:
            candidates.append(meminfo)
    for value in (_cgroup_available(), _address_space_available()):
        if value is not None:
            candidates.append(value)
    return min(candidates) if candidates else 2**62


def saved_tensor_bytes(function: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                       exclude: Iterable[torch.Tensor] = ()) -> tuple[torch.Tensor, int, int]:
    """Run ``function(*inputs)`` and count what its autograd graph keeps for the backward.

    Parameters
    ----------
    function : callable
        A differentiable function (a network).
    inputs : torch.Tensor
    exclude : iterable of torch.Tensor
        Tensors not to count when saved (the network's parameters: they are in memory anyway).

    Returns
    -------
    output : torch.Tensor
    total : int
        Bytes of the distinct storages saved (a tensor saved by two operations, e.g. a ReLU's
        output that the next convolution saves as its input, counts once).
    largest : int
        Bytes of the largest of them.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, functorch)
            pointer, size = id(tensor), tensor.numel() * tensor.element_size()
        if pointer not in skip:
            saved[(str(tensor.device), pointer)] = size
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function(*inputs)
    return output, sum(saved.values()), max(saved.values(), default=0)


@dataclass(frozen=True)
class PassCost:
    """Peak bytes and seconds of one network pass (forward and backward) over one window."""

    bytes: int
    seconds: float


def measure_pass(network: Callable[[torch.Tensor], torch.Tensor], patch: torch.Tensor, amp: bool = False) -> PassCost:
    """The memory and time of one forward + backward of ``network`` on ``patch`` ``(1, C, *patch)``.

    CUDA: the allocator's peak above what was allocated before (``max_memory_allocated``).
    CPU: the saved tensors of the autograd graph (:func:`saved_tensor_bytes`, the network's
    parameters excluded) plus the output, the input's gradient and two of the largest saved
    tensors (the gradients in flight while the backward runs through the largest layer).
    """
    import contextlib

    patch = patch.detach().clone().requires_grad_(True)
    parameters = list(network.parameters()) if isinstance(network, torch.nn.Module) else []
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and patch.is_cuda else contextlib.nullcontext()
    cuda = patch.is_cuda
    if cuda:
        torch.cuda.synchronize(patch.device)
        torch.cuda.reset_peak_memory_stats(patch.device)
        before = torch.cuda.memory_allocated(patch.device)
    start = time.perf_counter()
    with torch.enable_grad():
        with autocast:
            output, saved, largest = saved_tensor_bytes(network, patch, exclude=parameters)
        (gradient,) = torch.autograd.grad(output.float().sum(), patch)
    if cuda:
        torch.cuda.synchronize(patch.device)
        peak = torch.cuda.max_memory_allocated(patch.device) - before
    else:
        peak = saved + output.numel() * output.element_size() + gradient.numel() * gradient.element_size() + 2 * largest
    return PassCost(int(peak), time.perf_counter() - start)


def fit_batch(
    requested: int,
    per_item_bytes: float,
    available: float,
    name: str = "batch_size",
    cap: int = 4,
    limit: Optional[int] = None,
    fixed_bytes: float = 0,
    safety: float = SAFETY,
    device: str = "",
) -> int:
    """The batch size to use: the largest that fits when ``requested`` is 0 (auto), else
    ``requested`` once checked.

    The budget is ``safety * available - fixed_bytes``; a batch of ``b`` items needs
    ``b * per_item_bytes`` of it.

    Parameters
    ----------
    requested : int
        0: auto; else the batch size asked for (>= 1).
    per_item_bytes : float
        Estimated bytes of one item (sample, replica, voxel term) in a batch.
    available : float
        Free bytes (:func:`available_memory`).
    name : str
        The parameter the batch size was given as (named in the messages).
    cap : int
        The largest automatic batch (larger batches use more memory for little speed).
    limit : int, optional
        The number of items to batch: a batch never holds more (an explicit batch size above
        it is checked as ``limit``).
    fixed_bytes : float
        Bytes the computation needs whatever the batch size.
    safety : float
        Share of ``available`` the batch may use.
    device : str
        Named in the messages.

    Returns
    -------
    int
        ``>= 1``; ``requested`` itself when it was given and fits.

    Raises
    ------
    SegXAIInputError
        ``requested`` does not fit (the message gives the estimate and the largest that
        fits), or not even one item fits.
    """
    if requested < 0:
        raise SegXAIInputError(f"{name} must be >= 1 (or 0: the largest that fits in memory), got {requested}")
    budget = safety * float(available) - float(fixed_bytes)
    per_item = max(1.0, float(per_item_bytes))
    fits = int(budget // per_item) if budget > 0 else 0
    on = f" on {device}" if device else ""
    have = f"{format_bytes(available)} available{on}"
    if fits < 1:
        need = format_bytes(per_item + fixed_bytes)
        raise SegXAIInputError(
            f"{name}: even a batch of 1 needs about {need}; {have} (a {int(round((1 - safety) * 100))}% margin "
            "kept): not enough memory; free memory, use a smaller input or patch, or another device")
    if requested == AUTO:
        return max(1, min(fits, int(cap), int(limit) if limit is not None else fits))
    effective = min(int(requested), int(limit)) if limit is not None else int(requested)
    if effective > fits:
        need = format_bytes(effective * per_item + fixed_bytes)
        raise SegXAIInputError(
            f"{name} {requested} needs about {need}; {have} (a {int(round((1 - safety) * 100))}% margin kept): "
            f"use {fits} or fewer, or 0 to choose automatically")
    return int(requested)


def format_seconds(seconds: float) -> str:
    """``0.2`` -> ``"under a second"``, ``35`` -> ``"35 s"``, ``600`` -> ``"10 min"``, ``7500`` -> ``"2 h 5 min"``."""
    if seconds < 1:
        return "under a second"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(int(round(seconds / 60)), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def estimate_text(what: str, batch: int, per_item_bytes: float, fixed_bytes: float, seconds: float) -> str:
    """One line for progress and logs: ``"smoothgrad: batch 4, about 1.2 GB, 35 s"``."""
    memory = format_bytes(batch * per_item_bytes + fixed_bytes)
    return f"{what}: batch {batch}, about {memory} and {format_seconds(seconds)} (estimated from one measured window)"


# ---- the time limit (its policy: SegXAILib.progress, torch-free for the parsers) -----------------
def check_cost(what: str, seconds: float, memory_bytes: float, items: int, estimate: str,
               ways: str = "fewer samples (n_samples) or a smaller target") -> None:
    """Refuse a computation whose estimated ``seconds`` exceed the limit in force
    (:func:`cost_limit`); nothing without a limit.

    Parameters
    ----------
    what : str
        The computation, named in the message.
    seconds, memory_bytes : float
        Its estimated time and memory (of one batch).
    items : int
        How many items (samples, voxel terms) it computes.
    estimate : str
        The estimate line (:func:`estimate_text`).
    ways : str
        How to make it smaller (parameters of the method), named in the message.

    Raises
    ------
    SegXAICostRefused
        Over the limit: the message states the estimate and the ways forward.
    """
    limit = current_cost_limit()
    if limit is None or seconds <= limit:
        return

    def said(value: float) -> str:  # below a second: the number itself (a limit of 1 ms is a test's)
        return format_seconds(value) if value >= 1 else f"{value:.2g} s"

    raise SegXAICostRefused(
        f"{what}: estimated {said(seconds)} and about {format_bytes(memory_bytes)} (from one measured window pass), "
        f"over the time limit of {said(limit)}; not started. Confirm to run it anyway (no time limit: the result is "
        f"the same exact computation), or make it smaller: {ways}",
        what, seconds, memory_bytes, items, limit, estimate)



#: the last estimate :func:`note_estimate` recorded (named when memory runs out after all)
_LAST_ESTIMATE: dict[str, str] = {}


def note_estimate(text: str) -> None:
    """Remember ``text`` (an :func:`estimate_text`) for :func:`memory_refusal`."""
    _LAST_ESTIMATE["text"] = text


def is_out_of_memory(error: BaseException) -> bool:
    """True for Python's ``MemoryError`` and PyTorch's out-of-memory errors (CUDA, MPS, and a
    CPU allocation that fails: ``DefaultCPUAllocator: can't allocate memory``)."""
    if isinstance(error, MemoryError):
        return True
    out_of_memory = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if out_of_memory is not None and isinstance(error, out_of_memory):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def memory_refusal(error: BaseException, step: str = "") -> SegXAIInputError:
    """The refusal to raise instead of an out-of-memory ``error`` (no traceback): the step, what
    failed, the memory available now and the last estimate made."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"{step}: " if step else ""
    estimate = _LAST_ESTIMATE.get("text")
    planned = f"; estimated before the run: {estimate}" if estimate else ""
    try:
        now = f"; {format_bytes(available_memory('cpu'))} of memory available now"
    except Exception:  # noqa: BLE001 - the refusal must not fail
        now = ""
    return SegXAIInputError(
        f"{where}out of memory ({type(error).__name__}: {detail[:200]}){now}{planned}. Use a smaller batch_size or "
        "window_batch, fewer samples, a smaller input, or a device with more memory")
