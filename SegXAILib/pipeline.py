"""Case pipelines shared by the CLI, the Slicer logic and the demo.

Resolving a model given by name or path (:func:`resolve_model_card`), segmenting a case and
writing its outputs (:func:`segment_case`, :func:`write_segmentation`). The demo is
:mod:`SegXAILib.demo`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .image import Image, SegXAIInputError
from .io import atomic_path, check_writable_dir, read_channels, write_image
from .models import LoadedModel, Segmentation, load_model_card, segment
from .models.card import ModelCard
from .progress import CancelToken, ProgressCallback, report, sub_progress

__all__ = ["resolve_model_card", "segment_case", "write_segmentation"]

def resolve_model_card(model: str | Path) -> ModelCard:
    """A model given on the command line: a bundled name (``lesions``), a card file or its folder."""
    from .sample_data import BUNDLED_MODELS, bundled_model_card

    if str(model) in BUNDLED_MODELS:
        return load_model_card(bundled_model_card(str(model)))
    return load_model_card(model)


def segment_case(
    images: Sequence[str | Path],
    model: LoadedModel,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> tuple[Image, Segmentation]:
    """Read one file per input channel (in the card's channel order) and segment them."""
    card = model.card
    if len(images) != len(card.input_channels):
        raise SegXAIInputError(
            f"model {card.name!r} takes {len(card.input_channels)} image(s) "
            f"({', '.join(card.input_channels)}), got {len(images)}"
        )
    report(progress, 0.0, "reading images")
    image = read_channels(images, card.input_channels)
    return image, segment(image, model, progress=sub_progress(progress, 0.05, 1.0), cancel=cancel)


def write_segmentation(segmentation: Segmentation, out_dir: str | Path, suffix: str = ".nii.gz") -> dict[str, Path]:
    """Write the label map, one probability map per class and a JSON summary into ``out_dir``.

    Every file is written atomically. Returns the written paths by role.
    """
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
            {
                "index": index,
                "name": info.name,
                "color": list(info.color),
                "voxels": int(np.count_nonzero(labels.array[0] == index)),
                "volume_mm3": float(np.count_nonzero(labels.array[0] == index) * labels.voxel_volume),
            }
            for index, info in enumerate(card.classes)
        ],
        "files": {role: path.name for role, path in written.items()},
    }
    with atomic_path(out_dir / "segmentation.json") as temporary:
        temporary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    written["summary"] = out_dir / "segmentation.json"
    return written
