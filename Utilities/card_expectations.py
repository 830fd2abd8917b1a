"""Compute what the bundled models expect of their inputs and store it in their model cards.

The statistics (:func:`SegXAILib.models.expectations.input_statistics`: intensity percentiles
per channel, spacing and extent ranges) are taken from the very training inputs each model
was made from: the lesion phantoms and the parotid phantoms of :mod:`SegXAILib.training`
(``DEMO_MODELS``: the same case factories and training seeds), and the nnU-Net demo's
synthetic spheres (``Utilities/make_nnunet_demo.py``: the same generator, seed and grid).
Each card gets an ``input_expectations`` block; that block is not part of the card's
checksum, so the risk models, patterns and counterfactual generators recorded with the
models stay valid.

Usage (a minute or two on a CPU)::

    OMP_NUM_THREADS=1 python Utilities/card_expectations.py [--models lesions parotid-S2 ...] [--check]

``--check`` recomputes and compares with the stored numbers (to 1e-6 relative) instead of
writing them (exit 1 on a difference).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SegXAILib.image import Image, geometry_matrix  # noqa: E402
from SegXAILib.models.expectations import EXPECTATIONS_KEY, input_statistics  # noqa: E402
from SegXAILib.training import DEMO_MODELS  # noqa: E402

MODELS = ROOT / "Resources" / "Models"
#: what each model was made for (the card's description says the same in words)
MADE_FOR = {
    "lesions": ("MR", "head (brain)"),
    "parotid-S2": ("CT", "head and neck (parotid phantom)"),
    "parotid-S4": ("CT", "head and neck (parotid phantom)"),
    "parotid-S6": ("CT", "head and neck (parotid phantom)"),
    "nnunet-demo": ("MR", "synthetic sphere phantom"),
}


def _demo_images(name: str) -> tuple[Path, list[Image], str]:
    folder, _card, cases, train_seeds, _heldout, _config = DEMO_MODELS[name]
    images = [case.image for case in cases(train_seeds)]
    source = (f"the {len(images)} training inputs of SegXAILib.training.DEMO_MODELS[{name!r}] (seeds "
              f"{train_seeds.start}-{train_seeds.stop - 1}), Utilities/card_expectations.py")
    return MODELS / folder / "model_card.json", images, source


def _nnunet_images(cases: int = 6, seed: int = 0) -> tuple[Path, list[Image], str]:
    """The nnU-Net demo's training cases, as ``make_nnunet_demo._write_raw`` writes them
    (SimpleITK arrays ``(z, y, x)``, spacing ``SPACING_XYZ``, identity direction in LPS)."""
    from SegXAILib.image import LPS_TO_RAS

    spec = importlib.util.spec_from_file_location("make_nnunet_demo", ROOT / "Utilities" / "make_nnunet_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    rng = np.random.default_rng(seed)
    matrix = LPS_TO_RAS @ geometry_matrix(module.SPACING_XYZ, (0.0, 0.0, 0.0), np.eye(3))
    images = [Image(module._phantom(rng)[0].transpose(2, 1, 0)[None], matrix, ("MR",)) for _ in range(cases)]
    source = f"the {cases} training inputs of Utilities/make_nnunet_demo.py (seed {seed}), Utilities/card_expectations.py"
    return MODELS / "nnunet_demo" / "model_card.json", images, source


def _close(stored, computed) -> bool:
    """The same block, numbers to 1e-6 relative: the 6-decimal rounding of a float64 sum may
    fall either way where another CPU's vector width orders the additions differently."""
    if isinstance(stored, dict) and isinstance(computed, dict):
        return stored.keys() == computed.keys() and all(_close(stored[k], computed[k]) for k in stored)
    if isinstance(stored, list) and isinstance(computed, list):
        return len(stored) == len(computed) and all(_close(a, b) for a, b in zip(stored, computed))
    if isinstance(stored, (int, float)) and isinstance(computed, (int, float)) and not isinstance(stored, bool):
        return abs(stored - computed) <= 1e-6 * max(1.0, abs(stored), abs(computed))
    return stored == computed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MADE_FOR), choices=list(MADE_FOR))
    parser.add_argument("--check", action="store_true", help="compare with the cards instead of writing")
    args = parser.parse_args(argv)
    status = 0
    for name in args.models:
        card_path, images, source = _nnunet_images() if name == "nnunet-demo" else _demo_images(name)
        modality, anatomy = MADE_FOR[name]
        block = input_statistics(images, modality, anatomy, source)
        data = json.loads(card_path.read_text(encoding="utf-8"))
        if args.check:
            same = _close(data.get(EXPECTATIONS_KEY), block)
            print(f"{name}: {'matches' if same else 'DIFFERS from'} {card_path}")
            status |= not same
            continue
        data[EXPECTATIONS_KEY] = block
        card_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"{name}: {card_path} <- {json.dumps(block)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
