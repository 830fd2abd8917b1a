"""A model card filled from a MONAI bundle's own description (``configs/metadata.json`` and the
inference config), so that a bundle folder without a ``model_card.json`` can be given as is.

The configs are read as data, never executed: the transforms and the inferer are recognised
by their ``_target_`` names and their literal arguments. What the card can express is taken
over (orientation, spacing, the intensity steps, the sliding window, the output activation,
the channel and class names); a preprocessing transform it cannot express is an error naming
it, because a card that skipped it would feed the network other inputs than the bundle does.
Loading the network itself still parses the bundle's config (``trust_code``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..image import SegXAIInputError

__all__ = ["bundle_card_dict", "is_bundle_folder"]

#: transforms that neither move voxels nor change intensities (loading, channel and type handling)
_NEUTRAL = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "AddChanneld", "EnsureTyped",
            "EnsureType", "ToTensord", "ToTensor", "CastToTyped", "CastToType", "ToDeviced", "ToDevice",
            "Identityd", "Identity"}
#: a palette for classes the bundle gives no colour
_COLOURS = [[0, 0, 0], [230, 70, 50], [70, 130, 230], [80, 190, 90], [240, 200, 60], [170, 90, 200],
            [60, 200, 200], [240, 140, 40], [150, 150, 150]]


def is_bundle_folder(path: Path) -> bool:
    """A MONAI bundle: ``configs/metadata.json`` and an inference config."""
    configs = Path(path) / "configs"
    return (configs / "metadata.json").is_file() and _inference_config(Path(path)) is not None


def _inference_config(folder: Path) -> Optional[Path]:
    for ext in ("json", "yaml", "yml"):
        candidate = folder / "configs" / f"inference.{ext}"
        if candidate.is_file():
            return candidate
    return None


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as error:  # malformed JSON / YAML, unreadable file
        raise SegXAIInputError(f"MONAI bundle file {path}: not readable ({error})") from None


def _target(entry: Any) -> str:
    target = entry.get("_target_", "") if isinstance(entry, dict) else ""
    return str(target).rsplit(".", 1)[-1].split("#")[-1]


def _transforms(config: dict, key: str) -> list[dict]:
    """The transform entries of ``config[key]`` (a Compose, or a list)."""
    node = config.get(key)
    if isinstance(node, dict) and "transforms" in node:
        node = node["transforms"]
    if isinstance(node, str) and node.startswith("@"):  # "@preprocessing"-style reference
        return _transforms(config, node[1:])
    return [entry for entry in node if isinstance(entry, dict)] if isinstance(node, list) else []


def _literal(value: Any, where: str) -> Any:
    if isinstance(value, str) and (value.startswith("@") or value.startswith("$") or value.startswith("%")):
        raise SegXAIInputError(f"{where}: {value!r} is an expression; write a model_card.json beside the bundle")
    return value


def _preprocessing(transforms: list[dict], where: str) -> dict[str, Any]:
    preprocessing: dict[str, Any] = {"intensity": []}
    unknown = []
    for entry in transforms:
        name = _target(entry)
        if name in _NEUTRAL:
            continue
        if name in ("Orientationd", "Orientation"):
            preprocessing["orientation"] = str(_literal(entry.get("axcodes", "RAS"), where))
        elif name in ("Spacingd", "Spacing"):
            preprocessing["spacing"] = [float(v) for v in _literal(entry["pixdim"], where)]
        elif name in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            a_min, a_max = float(_literal(entry["a_min"], where)), float(_literal(entry["a_max"], where))
            b_min, b_max = float(entry.get("b_min", 0.0)), float(entry.get("b_max", 1.0))
            if entry.get("clip", False):
                preprocessing["intensity"].append({"kind": "ct_window", "center": (a_min + a_max) / 2,
                                                   "width": a_max - a_min, "b_min": b_min, "b_max": b_max})
            else:  # a straight linear map
                scale = (b_max - b_min) / (a_max - a_min)
                preprocessing["intensity"].append({"kind": "affine", "scale": scale, "offset": b_min - a_min * scale})
        elif name in ("NormalizeIntensityd", "NormalizeIntensity"):
            if entry.get("subtrahend") is not None or entry.get("divisor") is not None:
                unknown.append(f"{name} with a fixed subtrahend / divisor")
            else:
                preprocessing["intensity"].append({"kind": "zscore", "nonzero": bool(entry.get("nonzero", False))})
        else:
            unknown.append(name or str(entry))
    if unknown:
        raise SegXAIInputError(f"{where}: preprocessing {unknown} cannot be written in a model card; write a "
                               "model_card.json beside the bundle (see SegXAILib.models.card)")
    return preprocessing


def bundle_card_dict(folder: Path) -> dict[str, Any]:
    """The JSON content of a model card for the bundle in ``folder``.

    Raises
    ------
    SegXAIInputError
        A missing or unreadable file, a field the card needs that the bundle does not give, or a
        preprocessing transform the card cannot express, naming it.
    """
    folder = Path(folder)
    metadata_path = folder / "configs" / "metadata.json"
    metadata = _read(metadata_path)
    config_path = _inference_config(folder)
    if config_path is None:
        raise SegXAIInputError(f"MONAI bundle {folder}: no configs/inference.json or .yaml")
    config = _read(config_path)
    where = f"MONAI bundle {folder}"
    try:
        formats = metadata["network_data_format"]
        image, output = formats["inputs"]["image"], formats["outputs"]["pred"]
    except (KeyError, TypeError):
        raise SegXAIInputError(f"{metadata_path}: no network_data_format.inputs.image / outputs.pred") from None
    in_channels = int(image.get("num_channels", 1))
    channel_def = image.get("channel_def") or {}
    inputs = [str(channel_def.get(str(i), f"{image.get('modality', 'channel')}{i if in_channels > 1 else ''}"))
              for i in range(in_channels)]
    out_channels = int(output.get("num_channels", 2))
    class_def = output.get("channel_def") or {}
    activation = None
    for entry in _transforms(config, "postprocessing"):
        if _target(entry) in ("Activationsd", "Activations"):
            activation = "softmax" if entry.get("softmax") else "sigmoid" if entry.get("sigmoid") else "none"
    activation = activation or ("softmax" if out_channels > 1 else "sigmoid")
    names = [str(class_def.get(str(i), f"class{i}")) for i in range(out_channels)]
    if activation == "sigmoid":  # one channel per foreground structure: the background has none
        names = ["background"] + names
    classes = [{"name": name, "color": _COLOURS[i % len(_COLOURS)]} for i, name in enumerate(names)]
    inferer = config.get("inferer") or {}
    if _target(inferer) not in ("SlidingWindowInferer", ""):
        raise SegXAIInputError(f"{where}: inferer {_target(inferer)!r}; only SlidingWindowInferer can be expressed")
    roi = inferer.get("roi_size") or image.get("spatial_shape")
    if not isinstance(roi, list) or len(roi) != 3:
        raise SegXAIInputError(f"{where}: no 3D roi_size in the inferer nor spatial_shape in metadata.json")
    inference = {"patch_size": [int(_literal(v, where)) for v in roi],
                 "overlap": float(inferer.get("overlap", 0.25)),
                 "blend": str(inferer.get("mode", "constant")),
                 "sw_batch_size": int(inferer.get("sw_batch_size", 1))}
    return {
        "schema_version": 1,
        "name": str(metadata.get("name") or folder.name),
        "version": str(metadata.get("version", "")),
        "architecture": {"format": "bundle", "path": ".", "weights": "models/model.pt"},
        "input_channels": inputs,
        "classes": classes,
        "preprocessing": _preprocessing(_transforms(config, "preprocessing"), where),
        "inference": inference,
        "output_activation": activation,
        "provenance": {"source": "MONAI bundle metadata", "description": str(metadata.get("description", ""))},
    }
