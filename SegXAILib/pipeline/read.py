"""``read_case``: a case folder written by :func:`~SegXAILib.pipeline.write_case` read back
into a :class:`~SegXAILib.pipeline.Case`.

Front ends launch the engine process (``segxai run``) and then show its folder with the same
node-making code as an in-memory case (:func:`SegXAILib.mrml.show_case`). Nothing is read
silently wrong: the manifest's checksums are verified (``verify``), the model must be the one
the case was run with, every image must lie on the manifest's grid, and a missing, corrupt or
inconsistent file is a :class:`~SegXAILib.image.SegXAIInputError` naming that file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..image import Image, SegXAIInputError
from ..io import read_image
from ..models import Segmentation
from .case import Case, ContourQA, QAResult
from .settings import CaseSettings
from .steps import find_case_instances, read_case_images, resolve_model_card, structure_index
from .write import COUNTERFACTUAL_KINDS, MANIFEST, read_manifest

__all__ = ["read_case"]

#: how far a file's IJK-to-RAS matrix may be from the manifest's, relative to the matrix's
#: largest entry: NIfTI stores the geometry in float32 (2^-24 relative rounding per entry,
#: plus the quaternion round trip of the qform); a moved or resampled image is far outside it
GRID_RTOL = 1e-5


def read_case(out_dir: Union[str, Path], verify: bool = True, ijk_to_ras: Optional[np.ndarray] = None) -> Case:
    """The :class:`~SegXAILib.pipeline.Case` of a case folder (the inverse of
    :func:`~SegXAILib.pipeline.write_case`).

    Parameters
    ----------
    out_dir : path-like
        The case folder (holding ``case.json``).
    verify : bool
        Check every listed file's SHA-256 against the manifest first. Without it the files are
        still checked for being readable images on the manifest's grid.
    ijk_to_ras : ndarray, shape (4, 4), optional
        The caller's own matrix of the input grid (e.g. the input volume node the case was run
        on): the manifest's must agree with it to :data:`GRID_RTOL`, and the case is placed on
        it exactly. A front end's nodes then carry its volume's geometry bit for bit, where a
        file round trip (spacing and direction stored apart) can move the last bit.

    Returns
    -------
    Case
        On the manifest's grid exactly (its float64 ``ijk_to_ras``, not the float32 copy NIfTI
        files keep): ``image`` ``(C, I, J, K)`` read from the manifest's ``inputs``; the
        segmentation's labels ``(1, I, J, K)`` uint8 and probabilities ``(K, I, J, K)`` float32;
        ``instance_labels`` ``(1, I, J, K)`` int32 and ``instances`` (recomputed from the labels
        and the structure's probability, as :func:`~SegXAILib.pipeline.find_case_instances` did,
        and checked against the written instance map); ``maps`` and ``instance_maps``
        ``(C, I, J, K)`` float32; ``lesions``, ``qa``, ``contour_qa``, ``agg2exp``, ``timings`` (rounded to
        milliseconds as written), ``notes`` and ``settings``; ``counterfactuals`` (instance id ->
        :class:`~SegXAILib.counterfactual.CounterfactualRelevance`, maps ``(C, I, J, K)``
        float32, patch ``(1, I, J, K)`` uint8) and ``counterfactual_generators``.

        What is not in the folder is not invented: ``segmentation.model_labels`` is None (an
        attribution step on a read case predicts again); ``reference`` is None; the background
        probability channel is not written, so it is rebuilt from the foreground channels the way
        the card's activation makes it (softmax: ``1 - sum``, to float32 rounding; sigmoid:
        ``1 - max``, exact on the model grid and an approximation after resampling to the input
        grid); the labels are the written ones, never an argmax of the rebuilt channel.
        A map's tensor-valued parameters (never written) are absent from its ``parameters``.

    Raises
    ------
    SegXAIInputError
        Naming the file: no or unreadable manifest, a changed file (``verify``), a missing or
        unreadable image, an image off the manifest's grid, a model whose checksum differs from
        the one the case was run with, an input image that is missing or not recorded.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir, verify)
    source = str(out_dir / MANIFEST)
    if ijk_to_ras is not None:
        manifest = _on_callers_grid(manifest, np.asarray(ijk_to_ras, dtype=float), source)
    try:
        return _read(out_dir, manifest, source)
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, SegXAIInputError):
            raise
        # a manifest or JSON file that parses but lacks a field: name the folder, not a traceback
        raise SegXAIInputError(f"{source}: not a complete case folder ({type(error).__name__}: {error})") from None


# ---------------------------------------------------------------------------- helpers


def _on_callers_grid(manifest: dict, ijk_to_ras: np.ndarray, source: str) -> dict:
    """The manifest with its grid's matrix replaced by the caller's, after checking they agree."""
    try:
        recorded = np.asarray(manifest["grid"]["ijk_to_ras"], dtype=float)
    except (KeyError, TypeError, ValueError):
        raise SegXAIInputError(f"{source}: no grid recorded") from None
    tolerance = GRID_RTOL * max(1.0, float(np.abs(ijk_to_ras).max()))
    if ijk_to_ras.shape != (4, 4) or not np.allclose(recorded, ijk_to_ras, rtol=0, atol=tolerance):
        raise SegXAIInputError(f"{source}: the case's grid (ijk_to_ras {np.round(recorded, 4).tolist()}) is not the "
                               f"given ijk_to_ras {np.round(ijk_to_ras, 4).tolist()}")
    return {**manifest, "grid": {**manifest["grid"], "ijk_to_ras": ijk_to_ras.tolist()}}


class _Folder:
    """The manifest's files by role, the grid, and readers that check both."""

    def __init__(self, out_dir: Path, manifest: Mapping[str, Any], source: str) -> None:
        self.out_dir = out_dir
        self.source = source
        self.files = {entry["role"]: out_dir / entry["path"] for entry in manifest["files"]}
        self.roles = [entry["role"] for entry in manifest["files"]]  # write order (dict orders follow it)
        grid = manifest["grid"]
        self.shape = tuple(int(s) for s in grid["shape"])
        self.ijk_to_ras = np.asarray(grid["ijk_to_ras"], dtype=float)
        self.channels = tuple(grid["channels"])

    def has(self, role: str) -> bool:
        return role in self.files

    def path(self, role: str) -> Path:
        if role not in self.files:
            raise SegXAIInputError(f"{self.source}: lists no file of role {role!r}")
        return self.files[role]

    def on_grid(self, image: Image, where: str) -> Image:
        """``image``'s voxels on the manifest's exact grid, once its own grid is checked to be it."""
        tolerance = GRID_RTOL * max(1.0, float(np.abs(self.ijk_to_ras).max()))
        if image.spatial_shape != self.shape or not np.allclose(image.ijk_to_ras, self.ijk_to_ras, rtol=0,
                                                                atol=tolerance):
            raise SegXAIInputError(
                f"{where}: not on the case's grid (shape {image.spatial_shape}, ijk_to_ras "
                f"{np.round(image.ijk_to_ras, 4).tolist()}; {self.source} records shape {self.shape}, "
                f"ijk_to_ras {np.round(self.ijk_to_ras, 4).tolist()})"
            )
        return Image(image.array, self.ijk_to_ras.copy(), image.channel_names)

    def image(self, role: str, channel_name: str) -> Image:
        path = self.path(role)
        try:
            image = read_image(path, channel_name)  # a truncated file is refused there
        except SegXAIInputError as error:
            raise SegXAIInputError(f"{error} ({role})") from None
        return self.on_grid(image, f"{path} ({role})")

    def json(self, role: str) -> Any:
        path = self.path(role)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SegXAIInputError(f"{path} ({role}): not readable JSON ({error})") from None


def _integers(image: Image, where: str, dtype: type) -> Image:
    """``image`` cast to ``dtype`` after checking that its voxels are whole numbers in range."""
    array = image.array
    if not np.issubdtype(array.dtype, np.integer):
        raise SegXAIInputError(f"{where}: voxel type {array.dtype}, expected integer labels")
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise SegXAIInputError(f"{where}: labels outside {info.min}..{info.max}")
    return image.with_array(array.astype(dtype), image.channel_names)


def _background(foreground: np.ndarray, activation: str) -> np.ndarray:
    """``(I, J, K)`` float32 background probability from the ``(K - 1, I, J, K)`` foreground
    channels, as :func:`SegXAILib.models.inference.activate` makes it."""
    if activation == "sigmoid":
        return (1.0 - foreground.max(axis=0)).astype(np.float32)
    # softmax: the channels sum to 1 (linear resampling keeps sums)
    return np.clip(1.0 - foreground.astype(np.float64).sum(axis=0), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------- the case


def _read(out_dir: Path, manifest: Mapping[str, Any], source: str) -> Case:
    settings = CaseSettings.from_dict(manifest["settings"], f"{source}: settings")
    card = resolve_model_card(settings.model)
    recorded = manifest["model"]
    if card.checksum() != recorded["checksum"]:
        raise SegXAIInputError(
            f"case folder {out_dir}: run with model {recorded.get('name')!r} (checksum {recorded['checksum']!r}), "
            f"but settings.model {settings.model!r} is now {card.name!r} (checksum {card.checksum()!r})"
        )
    class_index = structure_index(card, settings.class_name)
    if card.class_names[class_index] != manifest["structure"]:
        raise SegXAIInputError(f"{source}: structure {manifest['structure']!r}, but settings.class_name gives "
                               f"{card.class_names[class_index]!r}")
    folder = _Folder(out_dir, manifest, source)
    if list(folder.channels) != list(card.input_channels):
        raise SegXAIInputError(f"{source}: grid channels {list(folder.channels)}, the model's inputs are "
                               f"{list(card.input_channels)}")

    image = _read_inputs(folder, manifest, card, settings.resample_slices)
    segmentation = _read_segmentation(folder, manifest, card)
    summary = manifest["summary"]
    case = Case(image=image, settings=settings, segmentation=segmentation, class_index=class_index,
                timings={k: float(v) for k, v in manifest["timings_s"].items()}, notes=list(summary["notes"]),
                warnings=list(summary.get("warnings", [])))  # folders written before warnings have none

    if "instances" in folder.files:
        path = folder.path("instances")
        labels = _integers(folder.image("instances", "instances"), f"{path} (instances)", np.int32)
        case.instance_labels = labels
        # recomputed exactly as the run found them (same labels, same float32 probability, same
        # grid); the written map must agree, so a mismatched folder is caught, not shown
        found, case.instances = find_case_instances(segmentation, class_index, settings.instances.min_voxels)
        if not np.array_equal(found, labels.array[0]):
            raise SegXAIInputError(f"{path} (instances): differs from the instances of the structure in "
                                   f"{folder.path('labels')}")
        lesions = folder.json("lesions")
        case.lesions = list(lesions["instances"])
        predicted = [row for row in case.lesions if row.get("id") is not None]
        if [(r["id"], r["voxels"]) for r in predicted] != [(i.id, i.voxels) for i in case.instances]:
            raise SegXAIInputError(f"{folder.path('lesions')} (lesions): its rows do not match the instances in "
                                   f"{path}")
        case.instance_maps = _read_instance_maps(folder)
    if summary["instances"] != len(case.instances):
        raise SegXAIInputError(f"{source}: summary lists {summary['instances']} instance(s), the folder has "
                               f"{len(case.instances)}")

    for name in summary["maps"]:
        case.maps[name] = _read_map(folder, name)
    if "qa" in folder.files:
        case.qa = _read_qa(folder)
    if "contour_qa" in folder.files:
        case.contour_qa = ContourQA.from_dict(folder.json("contour_qa"), f"{folder.path('contour_qa')} (contour_qa)")
    if "agg2exp" in folder.files:
        from ..evaluation import ImportanceMatrix

        case.agg2exp = ImportanceMatrix.from_dict(folder.json("agg2exp"))
    if "uncertainty" in folder.files:
        case.uncertainty = _read_uncertainty(folder)
    if "counterfactual" in folder.files:
        case.counterfactuals, case.counterfactual_generators = _read_counterfactuals(folder, len(case.instances))
    return case


def _read_counterfactuals(folder: _Folder, instances: int) -> tuple[dict, Optional[dict]]:
    """``({id: CounterfactualRelevance}, generators)`` as ``write_case`` wrote them."""
    from ..counterfactual import CounterfactualRelevance

    document = folder.json("counterfactual")
    source = f"{folder.path('counterfactual')} (counterfactual)"
    results = {}
    for key, entry in document["instances"].items():
        identifier = int(key)
        if not 1 <= identifier <= instances:
            raise SegXAIInputError(f"{source}: instance {identifier}, the case has {instances} instance(s)")
        images = {kind: Image.stack([folder.image(f"counterfactual:{identifier}:{kind}:{channel}", channel)
                                     for channel in folder.channels]) for kind in COUNTERFACTUAL_KINDS}
        role = f"counterfactual:{identifier}:patch"
        patch = _integers(folder.image(role, "patch"), f"{folder.path(role)} ({role})", np.uint8)
        centre = tuple(int(v) for v in entry["centre_model_ijk"])
        if len(centre) != 3:
            raise SegXAIInputError(f"{source}: instance {identifier}: centre_model_ijk {list(centre)}, expected 3 indices")
        results[identifier] = CounterfactualRelevance(images["plus"], images["minus"], images["relevance"], patch,
                                                      centre, {k: float(v) for k, v in entry["scores"].items()})
    return results, document.get("generators")


def _read_uncertainty(folder: _Folder):
    """The :class:`~SegXAILib.uncertainty.UncertaintyResult` ``write_case`` wrote (maps and tables)."""
    from ..uncertainty import RegionUncertainty, UncertaintyResult

    document = folder.json("uncertainty")
    maps = {}
    for name, per_channel in document["files"].items():
        maps[name] = Image.stack([folder.image(f"uncertainty:{name}:{channel}", channel) for channel in per_channel])
    expected = {"mean_probability", "variance", "predictive_entropy", "expected_entropy", "mutual_information",
                "mask_frequency"}
    if set(maps) != expected:
        raise SegXAIInputError(f"{folder.path('uncertainty')} (uncertainty): maps {sorted(maps)}, expected "
                               f"{sorted(expected)}")
    try:
        structures = [RegionUncertainty(**row) for row in document["structures"]]
        instances = [RegionUncertainty(**row) for row in document["instances"]]
    except TypeError as error:
        raise SegXAIInputError(f"{folder.path('uncertainty')} (uncertainty): a table row is malformed ({error})") from None
    return UncertaintyResult(**maps, structures=structures, instances=instances, samples=int(document["samples"]),
                             sources=dict(document["sources"]), seed=int(document["seed"]),
                             activation=str(document["activation"]), settings=dict(document["settings"]),
                             timings={k: float(v) for k, v in document["timings"].items()})


def _read_inputs(folder: _Folder, manifest: Mapping[str, Any], card, resample_slices: bool = False) -> Image:
    inputs = manifest.get("inputs") or {}
    if not inputs:
        raise SegXAIInputError(f"{folder.source}: records no input images (inputs); the case's image cannot be read")
    if list(inputs) != list(card.input_channels):
        raise SegXAIInputError(f"{folder.source}: inputs name channels {list(inputs)}, the model's are "
                               f"{list(card.input_channels)}")
    for channel, path in inputs.items():
        if not Path(path).exists():
            raise SegXAIInputError(f"{folder.source}: input image {path} (channel {channel!r}) is missing")
    image = read_case_images(list(inputs.values()), card, resample_slices)  # as the run read them
    return folder.on_grid(image, f"input image(s) {', '.join(map(str, inputs.values()))}")


def _read_segmentation(folder: _Folder, manifest: Mapping[str, Any], card) -> Segmentation:
    labels_path = folder.path("labels")
    labels = _integers(folder.image("labels", "labels"), f"{labels_path} (labels)", np.uint8)
    if labels.array.size and int(labels.array.max()) >= len(card.classes):
        raise SegXAIInputError(f"{labels_path} (labels): class index {int(labels.array.max())}, the model has "
                               f"{len(card.classes)} classes")
    foreground = []
    for name in card.class_names[1:]:
        role = f"probability_{name}"
        probability = folder.image(role, name).array[0]
        if not np.issubdtype(probability.dtype, np.floating):
            raise SegXAIInputError(f"{folder.path(role)} ({role}): voxel type {probability.dtype}, expected float")
        foreground.append(probability.astype(np.float32))
    stacked = np.stack(foreground)
    probabilities = labels.with_array(np.concatenate([_background(stacked, card.output_activation)[None], stacked]),
                                      tuple(card.class_names))
    summary = folder.json("summary")
    return Segmentation(labels, probabilities, card, str(manifest["device"]),
                        {k: float(v) for k, v in summary["timings_s"].items()}, model_labels=None)


def _read_map(folder: _Folder, name: str):
    from ..attribution import AttributionResult

    metadata_path = folder.path(f"map:{name}:metadata")
    metadata = folder.json(f"map:{name}:metadata")
    channels = [folder.image(f"map:{name}:{channel}", channel) for channel in folder.channels]
    for channel, written in zip(folder.channels, channels):
        # the range written beside the map: a file that reads but holds other voxels is caught
        # even without checksums
        low, high = metadata["value_range"][channel]
        if written.array.size and (float(written.array.min()), float(written.array.max())) != (low, high):
            raise SegXAIInputError(f"{folder.path(f'map:{name}:{channel}')}: values span "
                                   f"[{float(written.array.min())}, {float(written.array.max())}], {metadata_path} "
                                   f"records [{low}, {high}]")
    maps = Image.stack(channels)
    return AttributionResult(maps=maps, method=metadata["method"], parameters=dict(metadata["parameters"]),
                             target=dict(metadata["target"]), model=metadata["model"],
                             model_checksum=metadata["model_checksum"], device=metadata["device"],
                             timings={k: float(v) for k, v in metadata["timings_s"].items()},
                             postprocessing=metadata["postprocessing"])


def _read_instance_maps(folder: _Folder) -> dict[int, dict[str, Image]]:
    """``{id: {aggregation: Image (C, I, J, K)}}`` in the order they were written."""
    found: dict[int, dict[str, dict[str, Image]]] = {}
    for role in folder.roles:
        kind, _, rest = role.partition(":")
        if kind != "instance":
            continue
        identifier, aggregation, channel = rest.split(":", 2)
        found.setdefault(int(identifier), {}).setdefault(aggregation, {})[channel] = folder.image(role, channel)
    maps: dict[int, dict[str, Image]] = {}
    for identifier, per_aggregation in found.items():
        maps[identifier] = {}
        for aggregation, per_channel in per_aggregation.items():
            missing = [c for c in folder.channels if c not in per_channel]
            if missing:
                raise SegXAIInputError(f"{folder.source}: instance {identifier} ({aggregation}) has no map of "
                                       f"channel(s) {missing}")
            maps[identifier][aggregation] = Image.stack([per_channel[c] for c in folder.channels])
    return maps


def _read_qa(folder: _Folder) -> QAResult:
    document = folder.json("qa")
    # a feature risk model's QA has no map (QAResult.saliency)
    saliency = folder.image("qa_saliency", "saliency").array[0] if folder.has("qa_saliency") else None
    risk: Optional[dict] = None
    if "pc1" in document:  # written only with a risk model (QAResult.to_dict)
        risk = {"pc1": document["pc1"], "band": document["band"], "estimated_dice": document["estimated_dice"],
                "insufficient_probability": document["insufficient_probability"]}
        risk.update({k: document[k] for k in ("outside_calibration", "calibration") if k in document})
    reference = document.get("reference_curve")
    auroc = document.get("calibration_auroc_cv")
    return QAResult(structure=document["structure"], method=document["method"],
                    thresholds=np.asarray(document["thresholds"], dtype=float),
                    curve=np.asarray(document["curve"], dtype=float), saliency=saliency, risk=risk,
                    risk_model=document["risk_model"],
                    reference_curve=None if reference is None else np.asarray(reference, dtype=float),
                    calibration_auroc_cv=None if auroc is None else float(auroc))
