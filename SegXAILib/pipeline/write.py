"""``write_case``: one output layout for every front end, with a ``case.json`` manifest.

Layout of a case folder (every file on the input grid, written atomically; ``case.json``
last, so a folder without it is an unfinished run)::

    case.json                                 manifest: every file with its role and SHA-256,
                                              the settings, versions, model checksum, timings
    labels.nii.gz                             predicted class indices
    probability_<class>.nii.gz                one per foreground class
    segmentation.json                         volumes per class, device, timings
    maps/<map>_<channel>.nii.gz               class-level maps, one per input channel
    maps/<map>.json                           how each map was made (method, parameters, target)
    instances.nii.gz                          instance ids of the structure (1 = largest)
    instances/instance<id>_<agg>_<channel>.nii.gz   instance saliency (paper 001)
    lesions.json, lesions.csv                 the lesion table
    qa.json                                   QA: band, PC1, estimated Dice, EC curve
    qa_saliency.nii.gz                        the map the EC curve was taken of (channel sum)
    contour_qa.json                           QA of given contours: the review list, one row per
                                              structure, most suspicious first
    agg2exp.json                              Agg2Exp matrix
    uncertainty/<map>_<channel>.nii.gz        uncertainty maps (mean probability, variance per class;
                                              predictive / expected entropy, mutual information;
                                              mask frequency per foreground class)
    uncertainty.json                          how they were sampled, per-structure and per-lesion tables
    counterfactual/instance<id>_{plus,minus,relevance}_<channel>.nii.gz
                                              counterfactual relevance (paper 004): G+(x), G-(x) and
                                              R = G+(x) - G-(x), model intensity units
    counterfactual/instance<id>_patch.nii.gz  where the generators rewrote the image (uint8)
    counterfactual.json                       scores of x, G+(x), G-(x) per instance; the generators
                                              (path, SHA-256, model, geometry, training config)
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import platform
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..image import SegXAIInputError
from ..instances.table import LESION_SALIENCY_KEYS
from ..io import atomic_path, check_writable_dir, write_image
from ..models import Segmentation
from ..progress import CancelToken
from .case import Case
from .steps import LESION_UNCERTAINTY_KEYS

__all__ = ["MANIFEST", "MANIFEST_FORMAT", "write_case", "write_segmentation", "write_json", "read_manifest",
           "add_to_manifest", "lesion_csv", "file_sha256"]

MANIFEST = "case.json"
MANIFEST_FORMAT = "segxai-case"
MANIFEST_VERSION = 1


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(document: Any, path: Union[str, Path]) -> Path:
    """``document`` as indented JSON, atomically (NaN written as null)."""
    text = json.dumps(_json_ready(document), indent=2) + "\n"
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_segmentation(segmentation: Segmentation, out_dir: Union[str, Path], suffix: str = ".nii.gz") -> dict[str, Path]:
    """Write the label map, one probability map per foreground class and ``segmentation.json``
    (volumes per class, device, timings, grid) into ``out_dir``. Returns the paths by role."""
    out_dir = check_writable_dir(out_dir)
    card = segmentation.card
    written = {"labels": write_image(segmentation.labels, out_dir / f"labels{suffix}")}
    for index, name in enumerate(card.class_names):
        if index == 0:
            continue
        written[f"probability_{name}"] = write_image(
            segmentation.probabilities.channel(index), out_dir / f"probability_{name}{suffix}"
        )
    labels = segmentation.labels
    counts = np.bincount(labels.array[0].ravel(), minlength=len(card.classes))
    summary = {
        "model": card.name,
        "model_version": card.version,
        "model_checksum": card.checksum(),
        "device": segmentation.device,
        "timings_s": {k: round(v, 3) for k, v in segmentation.timings.items()},
        "grid": {
            "shape": list(labels.spatial_shape),
            "spacing_mm": [float(s) for s in labels.spacing],
            "ijk_to_ras": labels.ijk_to_ras.tolist(),
        },
        "classes": [
            {"index": index, "name": info.name, "color": list(info.color), "voxels": int(counts[index]),
             "volume_mm3": float(counts[index] * labels.voxel_volume)}
            for index, info in enumerate(card.classes)
        ],
        "files": {role: path.name for role, path in written.items()},
    }
    written["summary"] = write_json(summary, out_dir / "segmentation.json")
    return written


def lesion_csv(rows: list[dict], channels: list[str], aggregations: list[str]) -> str:
    """The lesion table as CSV: one row per lesion, ``<key>_<aggregation>_<channel>`` columns
    for the saliency values of :data:`~SegXAILib.instances.table.LESION_SALIENCY_KEYS`."""
    base = ("id", "group", "reference_id", "voxels", "volume_mm3", "centroid_r", "centroid_a", "centroid_s",
            "mean_probability")
    has_maps = any(row.get("saliency") for row in rows)
    extra = [f"{key}_{aggregation}_{channel}" for aggregation in aggregations for channel in channels
             for key in LESION_SALIENCY_KEYS] if has_maps else []
    if any(row.get("uncertainty") for row in rows):
        extra += [f"uncertainty_{key}" for key in LESION_UNCERTAINTY_KEYS]
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*base, *extra])
    for row in rows:
        r, a, s = row["centroid_ras"]
        values = [row.get("id"), row.get("group"), row.get("reference_id"), row["voxels"], row["volume_mm3"], r, a, s,
                  row.get("mean_probability")]
        flat = {f"{key}_{aggregation}_{channel}": value
                for aggregation, per_channel in (row.get("saliency") or {}).items()
                for channel, stats in per_channel.items() for key, value in stats.items()}
        flat.update({f"uncertainty_{key}": value for key, value in (row.get("uncertainty") or {}).items()})
        writer.writerow(["" if v is None else v for v in [*values, *(flat.get(c) for c in extra)]])
    return buffer.getvalue()


def _versions() -> dict[str, str]:
    import monai
    import torch

    from .. import __version__

    return {"segxai": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def write_case(case: Case, out_dir: Union[str, Path], cancel: Optional[CancelToken] = None,
               extra_files: Optional[Mapping[str, Union[str, Path]]] = None, suffix: str = ".nii.gz",
               inputs: Optional[Mapping[str, Union[str, Path]]] = None) -> Path:
    """Write ``case`` into ``out_dir`` (the layout in the module docstring); returns the
    manifest's path. ``extra_files`` (role -> path inside ``out_dir``) are listed in the
    manifest too; ``suffix`` is the image format (``.nii.gz``, ``.nrrd``, ``.mha``...);
    ``inputs`` (channel -> file) records where the images came from."""
    out_dir = check_writable_dir(out_dir)
    # a folder without case.json is an unfinished run: never leave an earlier run's manifest
    (out_dir / MANIFEST).unlink(missing_ok=True)
    image, card = case.image, case.card
    files: dict[str, Path] = {}

    def check() -> None:
        if cancel is not None:
            cancel.raise_if_cancelled()

    files.update(write_segmentation(case.segmentation, out_dir, suffix))
    if case.maps:
        check_writable_dir(out_dir / "maps")
    for name, result in case.maps.items():
        check()
        for channel in image.channel_names:
            files[f"map:{name}:{channel}"] = write_image(result.maps.channel(channel),
                                                         out_dir / "maps" / f"{name}_{channel}{suffix}")
        metadata = {**result.metadata(), "files": {c: f"{name}_{c}{suffix}" for c in image.channel_names},
                    "value_range": {c: [float(np.min(result.maps.channel(c).array)),
                                        float(np.max(result.maps.channel(c).array))] for c in image.channel_names}}
        files[f"map:{name}:metadata"] = write_json(metadata, out_dir / "maps" / f"{name}.json")
    if case.instance_labels is not None:
        files["instances"] = write_image(case.instance_labels.with_array(case.instance_labels.array.astype(np.uint16)),
                                         out_dir / f"instances{suffix}")
        if case.instance_maps:
            check_writable_dir(out_dir / "instances")
        for identifier, per_aggregation in case.instance_maps.items():
            check()
            for aggregation, maps in per_aggregation.items():
                for channel in image.channel_names:
                    files[f"instance:{identifier}:{aggregation}:{channel}"] = write_image(
                        maps.channel(channel), out_dir / "instances" / f"instance{identifier}_{aggregation}_{channel}{suffix}")
        settings = case.settings.instances
        lesions = {"structure": case.structure, "min_voxels": settings.min_voxels,
                   "saliency": {"method": "instance_smoothgrad", "aggregations": list(settings.aggregations),
                                "n_samples": settings.n_samples, "noise_level": settings.noise_level,
                                "batch_size": settings.batch_size, "seed": settings.seed},
                   "selected": sorted(case.instance_maps), "instances": case.lesions}
        files["lesions"] = write_json(lesions, out_dir / "lesions.json")
        text = lesion_csv(case.lesions, list(image.channel_names), list(settings.aggregations))
        with atomic_path(out_dir / "lesions.csv") as temporary:
            temporary.write_text(text, encoding="utf-8")
        files["lesions_csv"] = out_dir / "lesions.csv"
    if case.qa is not None:
        files["qa"] = write_json(case.qa.to_dict(), out_dir / "qa.json")
        if case.qa.saliency is not None:
            files["qa_saliency"] = write_image(image.with_array(case.qa.saliency[None], ("saliency",)),
                                               out_dir / f"qa_saliency{suffix}")
    if case.contour_qa is not None:
        files["contour_qa"] = write_json(case.contour_qa.to_dict(), out_dir / "contour_qa.json")
    if case.agg2exp is not None:
        files["agg2exp"] = write_json(case.agg2exp.to_dict(), out_dir / "agg2exp.json")
    if case.uncertainty is not None:
        check_writable_dir(out_dir / "uncertainty")
        written: dict[str, dict[str, str]] = {}
        for name, values in case.uncertainty.maps().items():
            check()
            for channel in values.channel_names:
                files[f"uncertainty:{name}:{channel}"] = write_image(
                    values.channel(channel), out_dir / "uncertainty" / f"{name}_{channel}{suffix}")
                written.setdefault(name, {})[channel] = f"{name}_{channel}{suffix}"
        files["uncertainty"] = write_json({**case.uncertainty.summary(), "files": written},
                                          out_dir / "uncertainty.json")
    if case.counterfactuals:
        files.update(_write_counterfactuals(case, out_dir, suffix, check))
    for role, path in (extra_files or {}).items():
        files[role] = Path(path)
    check()
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "model": {"name": card.name, "version": card.version, "checksum": card.checksum()},
        "structure": case.structure,
        "device": case.device,
        "inputs": {name: str(Path(path).resolve()) for name, path in (inputs or {}).items()},
        "grid": {"shape": list(image.spatial_shape), "spacing_mm": [float(s) for s in image.spacing],
                 "ijk_to_ras": image.ijk_to_ras.tolist(), "channels": list(image.channel_names)},
        "summary": _summary(case),
        "settings": case.settings.to_dict(),
        "versions": _versions(),
        "timings_s": {k: round(v, 3) for k, v in case.timings.items()},
        "files": _file_entries(out_dir, files),
    }
    return write_json(manifest, out_dir / MANIFEST)


#: the images of one instance's counterfactual relevance (CounterfactualRelevance attributes)
COUNTERFACTUAL_KINDS = ("plus", "minus", "relevance")


def _write_counterfactuals(case: Case, out_dir: Path, suffix: str, check) -> dict[str, Path]:
    """``counterfactual/`` and ``counterfactual.json`` (see the module docstring)."""
    folder = check_writable_dir(out_dir / "counterfactual")
    files: dict[str, Path] = {}
    instances: dict[str, Any] = {}
    for identifier, result in case.counterfactuals.items():
        check()
        names: dict[str, Any] = {}
        for kind in COUNTERFACTUAL_KINDS:
            values = getattr(result, kind)
            for channel in values.channel_names:
                name = f"instance{identifier}_{kind}_{channel}{suffix}"
                files[f"counterfactual:{identifier}:{kind}:{channel}"] = write_image(values.channel(channel),
                                                                                     folder / name)
                names.setdefault(kind, {})[channel] = name
        names["patch"] = f"instance{identifier}_patch{suffix}"
        files[f"counterfactual:{identifier}:patch"] = write_image(result.patch, folder / names["patch"])
        instances[str(identifier)] = {"centre_model_ijk": list(result.centre), "scores": dict(result.scores),
                                      "files": names}
    document = {"method": "cyclegan_activation_maximisation", "structure": case.structure,
                "units": "the model's normalised input intensities", "generators": case.counterfactual_generators,
                "instances": instances}
    files["counterfactual"] = write_json(document, out_dir / "counterfactual.json")
    return files


def _summary(case: Case) -> dict[str, Any]:
    summary: dict[str, Any] = {"status": "ok" if case.mask.any() else "empty_prediction", "notes": list(case.notes),
                               # how the input differs from what the model expects (case.warnings)
                               "warnings": list(case.warnings),
                               "structure_voxels": int(case.mask.sum()),
                               "structure_volume_mm3": float(case.mask.sum() * case.image.voxel_volume),
                               "instances": len(case.instances), "maps": list(case.maps)}
    if case.qa is not None:
        summary["qa_band"] = case.qa.band
        if case.qa.risk is not None:
            summary["qa_pc1"] = case.qa.risk["pc1"]
            summary["qa_estimated_dice"] = case.qa.risk["estimated_dice"]
    if case.contour_qa is not None and case.contour_qa.rows:
        first = case.contour_qa.rows[0]
        summary["contour_qa_most_suspicious"] = {"structure": first["structure"], "suspicion": first["suspicion"],
                                                 "sort_key": first["sort_key"]}
    if case.uncertainty is not None:
        summary["uncertainty_samples"] = case.uncertainty.samples
        for row in case.uncertainty.structures:
            if row.class_index == case.class_index:
                summary.update({f"uncertainty_{key}": getattr(row, key) for key in LESION_UNCERTAINTY_KEYS})
    if case.counterfactuals:
        summary["counterfactuals"] = [int(i) for i in case.counterfactuals]
    return summary


def _file_entries(out_dir: Path, files: Mapping[str, Path]) -> list[dict[str, Any]]:
    """Manifest entries of ``files`` (role -> a file inside ``out_dir``: absolute, relative to the
    working folder as the writers return it for a relative ``out_dir``, or relative to ``out_dir``)."""
    root = Path(out_dir).resolve()
    entries = []
    for role, path in files.items():
        path = Path(path)
        if not path.is_absolute() and not (path.is_file() and path.resolve().is_relative_to(root)):
            path = Path(out_dir) / path
        path = path.resolve()
        if not path.is_file() or not path.is_relative_to(root):
            raise SegXAIInputError(f"manifest: file {path} of role {role!r} does not exist in {root}")
        entries.append({"role": role, "path": path.relative_to(root).as_posix(), "sha256": file_sha256(path),
                        "bytes": path.stat().st_size})
    return entries


def read_manifest(out_dir: Union[str, Path], verify: bool = True) -> dict[str, Any]:
    """The ``case.json`` of a case folder; with ``verify``, every file's checksum checked."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SegXAIInputError(f"{path}: not a readable case manifest ({error})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise SegXAIInputError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if verify:
        for entry in manifest["files"]:
            target = Path(out_dir) / entry["path"]
            if not target.is_file() or file_sha256(target) != entry["sha256"]:
                raise SegXAIInputError(f"{path}: file {entry['path']} ({entry['role']}) is missing or changed")
    return manifest


def add_to_manifest(out_dir: Union[str, Path], files: Mapping[str, Union[str, Path]]) -> Path:
    """List more files (role -> path inside ``out_dir``) in an existing manifest (a report or a
    scene a front end wrote beside the case), rewriting it atomically."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir, verify=False)
    known = {entry["role"]: entry for entry in manifest["files"]}
    for entry in _file_entries(out_dir, files):
        known[entry["role"]] = entry
    manifest["files"] = list(known.values())
    return write_json(manifest, out_dir / MANIFEST)
