"""Fitting patterns: the model's sliding windows of each volume through the network while
:class:`~.statistics.PatternStatistics` collects, one volume in memory at a time."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ...image import Image, SegXAIInputError
from ...models.card import ModelCard
from ...progress import CancelToken, ProgressCallback, report
from .statistics import ESTIMATORS, PatternStatistics
from .store import PatternSet, weights_sha256

__all__ = ["fit_patterns_on_tensors", "fit_patterns"]


def _windows_of(network, card: ModelCard, x: torch.Tensor, max_windows: Optional[int],
                rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """The card's sliding windows of ``x`` ``(1, C, D, H, W)`` as inference places and pads them
    (all, or a seeded subset of ``max_windows``), one tensor ``(1, C, *patch)`` each."""
    from ...models.windows import WindowedForward

    windowed = WindowedForward(network, card, x.shape[2:])
    padded = torch.nn.functional.pad(x, windowed.pad, mode="replicate") if any(windowed.pad) else x
    indices = np.arange(len(windowed.windows))
    if max_windows is not None and len(indices) > max_windows:
        indices = np.sort(rng.choice(indices, size=max_windows, replace=False))
    for index in indices:
        yield padded[(slice(None), slice(None), *windowed.windows[int(index)])]


def fit_patterns_on_tensors(
    network: torch.nn.Module,
    card: ModelCard,
    volumes: Sequence[Union[torch.Tensor, Callable[[], torch.Tensor]]],
    estimators: Sequence[str] = ESTIMATORS,
    max_windows: Optional[int] = None,
    window_batch: int = 1,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict[str, PatternSet]:
    """Fit patterns from model-grid volumes ``(1, C, D, H, W)`` (tensors, or callables that make
    one when called, so that only one volume is in memory at a time).

    Parameters
    ----------
    network : torch.nn.Module
        The eager network, in eval mode.
    card : ModelCard
        Gives the sliding windows (patch size, overlap) and the provenance recorded.
    volumes : sequence
        Preprocessed network inputs on the model grid.
    estimators : sequence of str
        Which pattern sets to return (one pass of statistics serves both).
    max_windows : int, optional
        At most this many windows per volume, a seeded random subset; all when None.
    window_batch : int
        Windows per network call.
    seed : int
        Seed of the window subsets.

    Returns
    -------
    dict
        ``estimator -> PatternSet``.
    """
    for estimator in estimators:
        if estimator not in ESTIMATORS:
            raise SegXAIInputError(f"estimator {estimator!r}: expected one of {', '.join(ESTIMATORS)} or both")
    if not volumes:
        raise SegXAIInputError("patterns: no volumes to fit on")
    if window_batch < 1:
        raise SegXAIInputError(f"window_batch must be >= 1, got {window_batch}")
    if max_windows is not None and max_windows < 1:
        raise SegXAIInputError(f"max_windows must be >= 1, got {max_windows}")
    statistics = PatternStatistics(network, regimes="two_component" in estimators)
    rng = np.random.default_rng(seed)
    device = next(network.parameters()).device
    windows = voxels = 0
    with statistics.collecting(), torch.no_grad():
        for index, volume in enumerate(volumes):
            if cancel is not None:
                cancel.raise_if_cancelled()
            x = volume() if callable(volume) else volume
            x = torch.as_tensor(x).float().to(device)
            if x.ndim != 5 or x.shape[:2] != (1, len(card.input_channels)):
                raise SegXAIInputError(
                    f"patterns: volume {index} must be (1, {len(card.input_channels)}, D, H, W), got {tuple(x.shape)}"
                )
            patches = list(_windows_of(network, card, x, max_windows, rng))
            for start in range(0, len(patches), window_batch):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                batch = torch.cat(patches[start : start + window_batch])
                network(batch)
                windows += batch.shape[0]
                voxels += int(batch[0, 0].numel()) * batch.shape[0]
                report(progress, (index + min(len(patches), start + window_batch) / len(patches)) / len(volumes),
                       f"patterns: volume {index + 1}/{len(volumes)}")
    sets = {}
    shapes = {name: tuple(m.weight.shape) for name, m in statistics.layers.items()}
    for estimator in estimators:
        sets[estimator] = PatternSet(
            estimator=estimator,
            patterns=statistics.patterns(estimator),
            layer_shapes=shapes,
            weights_sha256=weights_sha256(card),
            model_name=card.name,
            card_checksum=card.checksum(),
            volumes=len(volumes),
            windows=windows,
            voxels=voxels,
            seed=int(seed),
        )
    return sets


def fit_patterns(
    model,
    images: Sequence[Union[Image, Callable[[], Image]]],
    estimators: Sequence[str] = ESTIMATORS,
    max_volumes: Optional[int] = None,
    max_windows: Optional[int] = None,
    window_batch: int = 1,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict[str, PatternSet]:
    """Fit a loaded model's patterns on input images, preprocessed exactly as for inference.

    Parameters
    ----------
    model : LoadedModel
    images : sequence of Image or of callables returning one
        Each ``(C, I, J, K)`` with the card's channels, on any grid (callables load lazily).
    max_volumes : int, optional
        Use a seeded random subset of this many images (all when None).
    max_windows, window_batch, seed, progress, cancel
        See :func:`fit_patterns_on_tensors`.
    """
    from ...models.preprocessing import model_input

    images = list(images)
    if max_volumes is not None:
        if max_volumes < 1:
            raise SegXAIInputError(f"max_volumes {max_volumes}: must be >= 1")
        if len(images) > max_volumes:
            chosen = np.sort(np.random.default_rng(seed).choice(len(images), size=max_volumes, replace=False))
            images = [images[int(i)] for i in chosen]

    def loader(item):
        def load() -> torch.Tensor:
            image = item() if callable(item) else item
            return model_input(image, model.card, model.device)[0]

        return load

    return fit_patterns_on_tensors(model.network, model.card, [loader(item) for item in images], estimators,
                                   max_windows, window_batch, seed, progress, cancel)
