"""Per-lesion summaries of instance saliency and the TP / FP / FN / TN analysis of paper 001
(METHODS section 3, figure 11).

* :func:`lesion_table`: one row per instance: volume, centroid, mean probability and, per
  saliency channel, the peak positive / negative values and the share of the positive mass
  inside the instance, in a shell of ``shell_mm`` mm (physical distance) around it, and
  outside both.
* :func:`classify_instances`: TP / FP instances of the prediction, FN components of the
  reference, TN spheres of the mean reference lesion volume drawn (seeded) inside a body
  mask, away from both masks.
* :func:`lesion_rows`: the lesion table of a prediction (the rows of ``lesions.json`` /
  ``lesions.csv``): geometry, TP / FP / FN group against a reference, and the
  :func:`lesion_table` values of each explained instance's own maps.
* :func:`compare_groups`: two-sided Mann-Whitney U tests between every pair of groups of
  peak values.

Plain numpy on one grid (the input grid or the model grid, whichever the arrays live on).
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ..image import Image, SegXAIInputError
from .instances import Instance, _grid_matrix, find_instances

__all__ = ["lesion_table", "classify_instances", "lesion_rows", "compare_groups", "GROUPS", "LESION_SALIENCY_KEYS"]

GROUPS = ("TP", "FP", "FN", "TN")

Grid = Union[Image, np.ndarray]


def _geometry(grid: Grid, shape: Sequence[int], name: str) -> Image:
    if isinstance(grid, Image):
        if tuple(grid.spatial_shape) != tuple(shape):
            raise SegXAIInputError(f"{name}: the grid's shape {grid.spatial_shape} differs from the labels' {tuple(shape)}")
        return grid
    return _grid_matrix(grid, shape)


def _saliency_array(value: Union[Image, np.ndarray], shape: Sequence[int], geometry: Image, name: str) -> np.ndarray:
    """``(C, I, J, K)`` float64 on the labels' grid."""
    if isinstance(value, Image):
        if not np.allclose(value.ijk_to_ras, geometry.ijk_to_ras, atol=1e-4):
            raise SegXAIInputError(f"{name}: the saliency map is not on the labels' grid; resample it first")
        array = value.array
    else:
        array = np.asarray(value)
        if array.ndim == 3:
            array = array[None]
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(shape):
        raise SegXAIInputError(f"{name}: expected a saliency map (C, {', '.join(map(str, shape))}), got {array.shape}")
    return array.astype(np.float64)


def _channel_names(value: Union[Image, np.ndarray], channels: int) -> tuple[str, ...]:
    if isinstance(value, Image):
        return tuple(value.channel_names)
    return tuple(f"ch{c}" for c in range(channels))


def lesion_table(
    instances: Sequence[Instance],
    labels: np.ndarray,
    saliency: Union[Image, np.ndarray, Mapping[int, Union[Image, np.ndarray]]],
    grid: Grid,
    shell_mm: float = 5.0,
) -> list[dict]:
    """One row (a JSON-ready dict) per instance.

    Parameters
    ----------
    instances : sequence of Instance
        From :func:`~SegXAILib.instances.find_instances`.
    labels : numpy.ndarray
        ``(I, J, K)`` instance ids (0 = background), the ``labels`` of ``find_instances``.
    saliency : Image, numpy.ndarray or dict
        One map ``(C, I, J, K)`` for all instances, or ``{instance id: map}`` (the instance's own
        saliency, e.g. :func:`~SegXAILib.instances.instance_smoothgrad` of its target), on the
        labels' grid. An instance missing from the dict is refused.
    grid : Image or numpy.ndarray
        The labels' grid (an Image on it, or its 4x4 IJK-to-RAS matrix).
    shell_mm : float
        Width of the shell around the instance, in mm: the non-instance voxels whose centre
        lies within ``shell_mm`` of an instance voxel centre
        (:func:`scipy.ndimage.distance_transform_edt` with ``sampling = spacing``; the shell
        may contain voxels of other instances).

    Returns
    -------
    list of dict
        ``id, voxels, volume_mm3, centroid_ras, mean_probability, channels``; ``channels`` maps
        each channel name to

        * ``peak_positive`` / ``peak_negative``: ``max(0, max s)`` / ``min(0, min s)`` over the
          whole map;
        * ``peak_positive_local`` / ``peak_negative_local``: the same over the instance and its
          shell (with one shared map the whole-map peaks are the same for every instance);
        * ``positive_mass``: ``sum relu(s)`` over the map;
        * ``share_inside`` / ``share_shell`` / ``share_outside``: parts of ``positive_mass``
          (they sum to 1); NaN when ``positive_mass`` is 0.
    """
    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 3:
        raise SegXAIInputError(f"lesion_table: labels must be (I, J, K), got {labels.shape}")
    if shell_mm < 0 or not math.isfinite(shell_mm):
        raise SegXAIInputError(f"lesion_table: shell_mm must be a finite value >= 0, got {shell_mm}")
    geometry = _geometry(grid, labels.shape, "lesion_table")
    spacing = geometry.spacing
    per_instance = isinstance(saliency, Mapping)
    shared = None if per_instance else _saliency_array(saliency, labels.shape, geometry, "lesion_table")
    rows = []
    for instance in instances:
        inside = labels == instance.id
        if not inside.any():
            raise SegXAIInputError(f"lesion_table: instance {instance.id} has no voxel in the labels")
        if per_instance:
            if instance.id not in saliency:
                raise SegXAIInputError(f"lesion_table: no saliency map for instance {instance.id}")
            value = saliency[instance.id]
            maps = _saliency_array(value, labels.shape, geometry, f"lesion_table: instance {instance.id}")
        else:
            value, maps = saliency, shared
        assert maps is not None
        names = _channel_names(value, maps.shape[0])
        distance = ndimage.distance_transform_edt(~inside, sampling=spacing)
        shell = ~inside & (distance <= shell_mm)
        local = inside | shell
        channels = {}
        for name, s in zip(names, maps):
            positive = np.maximum(s, 0.0)
            total = float(positive.sum())
            mass_inside = float(positive[inside].sum())
            mass_shell = float(positive[shell].sum())
            mass_outside = total - mass_inside - mass_shell
            share = (lambda m: m / total) if total > 0 else (lambda m: float("nan"))
            channels[name] = {
                "peak_positive": max(0.0, float(s.max())),
                "peak_negative": min(0.0, float(s.min())),
                "peak_positive_local": max(0.0, float(s[local].max())),
                "peak_negative_local": min(0.0, float(s[local].min())),
                "positive_mass": total,
                "share_inside": share(mass_inside),
                "share_shell": share(mass_shell),
                "share_outside": share(max(mass_outside, 0.0)),
            }
        rows.append({
            "id": int(instance.id),
            "voxels": int(instance.voxels),
            "volume_mm3": float(instance.volume_mm3),
            "centroid_ras": [float(v) for v in instance.centroid_ras],
            "mean_probability": None if instance.mean_probability is None else float(instance.mean_probability),
            "shell_mm": float(shell_mm),
            "channels": channels,
        })
    return rows


def _sphere_offsets(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Integer IJK offsets ``(N, 3)`` whose physical length is at most ``radius_mm`` (N >= 1)."""
    reach = [int(math.floor(radius_mm / s)) for s in spacing]
    axes = [np.arange(-r, r + 1) for r in reach]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    inside = ((grid * spacing) ** 2).sum(axis=1) <= radius_mm**2 + 1e-9
    return grid[inside]


def _footprint(offsets: np.ndarray) -> np.ndarray:
    reach = np.abs(offsets).max(axis=0)
    footprint = np.zeros(tuple(2 * reach + 1), dtype=bool)
    footprint[tuple((offsets + reach).T)] = True
    return footprint


def classify_instances(
    prediction_labels: np.ndarray,
    reference_mask: np.ndarray,
    grid: Grid,
    body_mask: Optional[np.ndarray] = None,
    rng_seed: int = 0,
    n_tn: Optional[int] = None,
    tn_volume_mm3: Optional[float] = None,
    min_voxels: int = 1,
    min_volume_mm3: float = 0.0,
) -> dict:
    """TP / FP / FN / TN volumes of a prediction against a reference (paper 001, section 2.5).

    Parameters
    ----------
    prediction_labels : numpy.ndarray
        ``(I, J, K)`` instance ids of the prediction (the ``labels`` of ``find_instances``); a
        boolean mask is split into its 26-connected components first.
    reference_mask : numpy.ndarray
        ``(I, J, K)`` reference lesions (non-zero); split into 26-connected components, those
        below ``min_voxels`` / ``min_volume_mm3`` dropped (paper 001 drops small components).
    grid : Image or numpy.ndarray
        The grid of both (an Image on it, or its 4x4 IJK-to-RAS matrix).
    body_mask : numpy.ndarray, optional
        ``(I, J, K)`` where TN spheres may lie (the brain and skull in paper 001); the whole
        volume when omitted.
    rng_seed : int
        Seed of the TN draws (:func:`numpy.random.default_rng`).
    n_tn : int, optional
        Number of TN spheres; ``None``: 10, as paper 001 draws per patient. Fewer are returned
        when no more fit (``TN["requested"]`` keeps the number asked for).
    tn_volume_mm3 : float, optional
        Sphere volume; default the mean volume of the reference components (of the predicted
        instances when the reference is empty).
    min_voxels, min_volume_mm3
        Minimum size of a reference component (the prediction is taken as given).

    Returns
    -------
    dict
        ``"TP"``, ``"FP"``: ``{"ids": prediction instance ids, "mask": bool (I, J, K)}``;
        ``"FN"``: ``{"ids": reference component ids, "mask"}``; ``"TN"``: ``{"ids": 1..n,
        "mask", "labels": int32 (I, J, K) sphere numbers, "centres_ijk": (n, 3), "requested"}``;
        ``"reference_labels"``: the reference components (int32), ``"tn_radius_mm"``,
        ``"tn_volume_mm3"`` (the target volume; a voxelised sphere is within one voxel shell of it).
    """
    prediction = np.asarray(prediction_labels)
    reference = np.asarray(reference_mask) != 0
    if prediction.ndim != 3 or prediction.shape != reference.shape:
        raise SegXAIInputError(
            f"classify_instances: prediction {prediction.shape} and reference {reference.shape} must be the same (I, J, K)"
        )
    geometry = _geometry(grid, prediction.shape, "classify_instances")
    if prediction.dtype == bool:
        prediction, _ = find_instances(prediction, grid=geometry.ijk_to_ras)
    prediction = prediction.astype(np.int64)
    predicted = prediction > 0
    reference_labels, reference_instances = find_instances(
        reference, min_voxels=min_voxels, min_volume_mm3=min_volume_mm3, grid=geometry.ijk_to_ras
    )
    prediction_ids = [int(i) for i in np.unique(prediction[predicted])]
    overlapping = {int(i) for i in np.unique(prediction[predicted & reference])}
    tp_ids = [i for i in prediction_ids if i in overlapping]
    fp_ids = [i for i in prediction_ids if i not in overlapping]
    missed = {int(i) for i in np.unique(reference_labels[(reference_labels > 0) & predicted])}
    fn_ids = [r.id for r in reference_instances if r.id not in missed]

    # TN spheres
    if n_tn is None:
        n_tn = 10
    if n_tn < 0:
        raise SegXAIInputError(f"classify_instances: n_tn must be >= 0, got {n_tn}")
    if tn_volume_mm3 is None:
        if reference_instances:
            tn_volume_mm3 = float(np.mean([r.volume_mm3 for r in reference_instances]))
        elif prediction_ids:
            counts = np.bincount(prediction[predicted])[prediction_ids]
            tn_volume_mm3 = float(counts.mean() * geometry.voxel_volume)
        elif n_tn > 0:
            raise SegXAIInputError("classify_instances: no lesion in either mask to size the TN spheres; give tn_volume_mm3")
        else:
            tn_volume_mm3 = 0.0
    if tn_volume_mm3 < 0:
        raise SegXAIInputError(f"classify_instances: tn_volume_mm3 must be >= 0, got {tn_volume_mm3}")
    radius = (3.0 * tn_volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
    if body_mask is None:
        body = np.ones(prediction.shape, dtype=bool)
    else:
        body = np.asarray(body_mask) != 0
        if body.shape != prediction.shape:
            raise SegXAIInputError(f"classify_instances: body_mask {body.shape} differs from the masks' {prediction.shape}")
    offsets = _sphere_offsets(radius, geometry.spacing)
    footprint = _footprint(offsets)
    allowed = body & ~reference & ~predicted
    # a centre is valid when its whole sphere lies in `allowed` (and in the volume)
    valid = ndimage.binary_erosion(allowed, structure=footprint, border_value=0)
    # centres whose spheres would touch a placed sphere: the Minkowski sum of two spheres
    pad = [(r, r) for r in np.array(footprint.shape) // 2]
    clash = np.argwhere(ndimage.binary_dilation(np.pad(footprint, pad), structure=footprint)) - (np.array(footprint.shape) - 1)
    rng = np.random.default_rng(rng_seed)
    shape = np.array(prediction.shape)
    tn_labels = np.zeros(prediction.shape, dtype=np.int32)
    centres = []
    for n in range(n_tn):
        candidates = np.flatnonzero(valid)
        if candidates.size == 0:
            break
        centre = np.array(np.unravel_index(int(rng.choice(candidates)), prediction.shape))
        voxels = centre + offsets
        tn_labels[tuple(voxels.T)] = n + 1
        near = centre + clash
        near = near[np.all((near >= 0) & (near < shape), axis=1)]
        valid[tuple(near.T)] = False
        centres.append(centre)
    tn_ids = list(range(1, len(centres) + 1))

    return {
        "TP": {"ids": tp_ids, "mask": np.isin(prediction, tp_ids) & predicted},
        "FP": {"ids": fp_ids, "mask": np.isin(prediction, fp_ids) & predicted},
        "FN": {"ids": fn_ids, "mask": np.isin(reference_labels, fn_ids) & (reference_labels > 0)},
        "TN": {
            "ids": tn_ids,
            "mask": tn_labels > 0,
            "labels": tn_labels,
            "centres_ijk": np.array(centres, dtype=int).reshape(-1, 3),
            "requested": int(n_tn),
        },
        "reference_labels": reference_labels,
        "tn_radius_mm": float(radius),
        "tn_volume_mm3": float(tn_volume_mm3),
    }


#: the saliency values each lesion row carries per aggregation and channel (:func:`lesion_rows`)
LESION_SALIENCY_KEYS = ("peak_positive", "peak_negative", "peak_positive_local", "peak_negative_local",
                        "share_inside", "share_shell", "share_outside")


def lesion_rows(
    instances: Sequence[Instance],
    labels: np.ndarray,
    grid: Image,
    saliency: Optional[Mapping[int, Mapping[str, Image]]] = None,
    reference_mask: Optional[np.ndarray] = None,
    shell_mm: float = 5.0,
) -> list[dict]:
    """The lesion table of a prediction: one row per predicted instance, then one per reference
    lesion that no instance touches. The one row builder of the library: the case pipeline's
    lesion table (:func:`SegXAILib.pipeline.lesion_rows`, ``lesions.json`` / ``lesions.csv``)
    is this function of the case.

    Parameters
    ----------
    instances : sequence of Instance
        The predicted instances, from :func:`~SegXAILib.instances.find_instances`.
    labels : numpy.ndarray
        ``(I, J, K)`` their ids (0 = background), on ``grid``.
    grid : Image
        The labels' grid (the input image).
    saliency : dict, optional
        ``{instance id: {aggregation: map (C, I, J, K)}}`` for the explained instances
        (:func:`~SegXAILib.instances.instance_saliency`), on ``grid``. Ids that are not among
        ``instances`` are ignored.
    reference_mask : numpy.ndarray, optional
        ``(I, J, K)`` reference lesions (non-zero) on ``grid``: the predicted rows get their group
        (TP / FP, :func:`classify_instances`) and the missed reference lesions are added (FN).
    shell_mm : float
        The shell of :func:`lesion_table` (mm) for the ``*_local`` peaks and the shares.

    Returns
    -------
    list of dict
        ``id, group, reference_id, voxels, volume_mm3, centroid_ras, mean_probability``; an
        explained instance also has ``saliency``: ``{aggregation: {channel: {key: value}}}`` with
        the keys :data:`LESION_SALIENCY_KEYS` (``peak_positive``, ``peak_negative``,
        ``peak_positive_local``, ``peak_negative_local``, ``share_inside``, ``share_shell``,
        ``share_outside``; :func:`lesion_table` of the instance's own map: the peaks over the
        whole map, the ``*_local`` peaks over the instance and its shell, the shares of the
        positive mass). An FN row has ``id`` and ``mean_probability`` None and its reference
        component's id as ``reference_id``. ``group`` is None without a reference.
    """
    saliency = dict(saliency or {})
    groups: dict[int, str] = {}
    false_negatives: list[dict] = []
    if reference_mask is not None:
        reference = np.asarray(reference_mask) != 0
        classes = classify_instances(labels, reference, grid, n_tn=0)
        groups = {i: "TP" for i in classes["TP"]["ids"]} | {i: "FP" for i in classes["FP"]["ids"]}
        # the same components (and ids) as classify_instances' reference labels
        _, reference_instances = find_instances(reference, grid=grid)
        for component in reference_instances:
            if component.id in classes["FN"]["ids"]:
                false_negatives.append({"id": None, "group": "FN", "reference_id": int(component.id),
                                        **_geometry_entry(component), "mean_probability": None})
    by_id = {instance.id: instance for instance in instances}
    explained = [i for i in saliency if i in by_id]
    # the aggregations in order of first appearance; one table per aggregation, over the
    # explained instances that have a map of it (each with its own map)
    aggregations = list(dict.fromkeys(a for i in explained for a in saliency[i]))
    tables: dict[str, dict[int, dict]] = {}
    for aggregation in aggregations:
        having = [i for i in explained if aggregation in saliency[i]]
        table = lesion_table([by_id[i] for i in having], labels, {i: saliency[i][aggregation] for i in having}, grid,
                             shell_mm=shell_mm)
        tables[aggregation] = {row["id"]: row for row in table}
    rows = []
    for instance in instances:
        row = {"id": int(instance.id), "group": groups.get(instance.id), "reference_id": None,
               **_geometry_entry(instance),
               "mean_probability": None if instance.mean_probability is None else float(instance.mean_probability)}
        if instance.id in explained:
            row["saliency"] = {aggregation: {name: {key: values[key] for key in LESION_SALIENCY_KEYS}
                                             for name, values in tables[aggregation][instance.id]["channels"].items()}
                               for aggregation in aggregations if instance.id in tables[aggregation]}
        rows.append(row)
    return rows + false_negatives


def _geometry_entry(instance: Instance) -> dict:
    """``voxels, volume_mm3, centroid_ras`` of a row (JSON-ready)."""
    return {"voxels": int(instance.voxels), "volume_mm3": float(instance.volume_mm3),
            "centroid_ras": [float(v) for v in instance.centroid_ras]}


def compare_groups(peaks: Mapping[str, Sequence[float]]) -> list[dict]:
    """Two-sided Mann-Whitney U tests between every pair of groups (paper 001, figure 11).

    Parameters
    ----------
    peaks : dict
        Group name -> values (e.g. the ``peak_positive`` of each TP / FP / FN / TN volume).
        Pairs follow ``TP, FP, FN, TN`` first, then other names in the dict's order.

    Returns
    -------
    list of dict
        One per pair: ``group_a, group_b, n_a, n_b, statistic`` (U of ``group_a``),
        ``p_value``, ``note``. A pair with an empty group is not tested: statistic and p-value
        are NaN and ``note`` says which group is empty (``note`` is ``""`` otherwise). Values
        are used as given (NaN propagates, as scipy's default).
    """
    from scipy.stats import mannwhitneyu

    names = [g for g in GROUPS if g in peaks] + [g for g in peaks if g not in GROUPS]
    if len(names) < 2:
        raise SegXAIInputError(f"compare_groups: needs at least two groups, got {names}")
    data = {g: np.asarray(peaks[g], dtype=float).ravel() for g in names}
    rows = []
    for a, b in itertools.combinations(names, 2):
        x, y = data[a], data[b]
        row = {"group_a": a, "group_b": b, "n_a": int(x.size), "n_b": int(y.size)}
        empty = [g for g, v in ((a, x), (b, y)) if v.size == 0]
        if empty:
            row.update(statistic=float("nan"), p_value=float("nan"),
                       note=f"not tested: group {' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty")
        else:
            result = mannwhitneyu(x, y, alternative="two-sided")
            row.update(statistic=float(result.statistic), p_value=float(result.pvalue), note="")
        rows.append(row)
    return rows
