"""Train the counterfactual generators shipped for the bundled lesion model (issue 20, paper 004).

The two generators (G+ raises, G- lowers the model's mean lesion logit over the central 8 x 8
region of a 32 x 32 axial patch) are trained on the CPU against the frozen bundled lesion model
(``Resources/Models/lesions``), on lesion phantoms of the bundled head whose seeds are disjoint
from every other use of the lesion phantoms (the model's training seeds 0-47 and held-out
1000-1003, the demo's 2026, the QA cohort's from 10 000, and the held-out evaluation seeds of
``Testing/Benchmarks/bench_counterfactual.py``). No reference label is used: the domains come
from the model's own predictions (:func:`~SegXAILib.counterfactual.build_domains`), the
lesion-free patches from each phantom's deformed white matter.

Written to ``--out`` (default ``Resources/Models/lesions/counterfactual``):

- ``generators.pt``: :meth:`CounterfactualGenerators.save` (``weights_only=True`` readable),
- ``training_log.csv``: the loss history, one row per iteration (``HISTORY_COLUMNS``),
- ``card.json``: what the generators explain (model name and checksum, target, geometry,
  config, seeds, phantom seeds), iterations, training seconds, torch version and the SHA-256 of
  ``generators.pt``; the benchmark adds its quantitative results under ``"evaluation"``.

Resumable: checkpoints go to ``--checkpoint-dir`` every ``CHECKPOINT_EVERY`` iterations;
running the same command again continues from the last one (bit for bit on the same machine,
torch build and thread count). Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=. python Utilities/train_counterfactual_demo.py \\
        --iterations 3000 --checkpoint-dir /tmp/segxai_counterfactual
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SegXAILib.counterfactual import (HISTORY_COLUMNS, CounterfactualConfig, PatchGeometry,  # noqa: E402
                                      SegmentationScore, build_domains, train_counterfactual)
from SegXAILib.models.card import sha256_of  # noqa: E402
from SegXAILib.models.loaders import load_model  # noqa: E402
from SegXAILib.phantoms import make_lesion_phantom  # noqa: E402
from SegXAILib.sample_data import WHITE_MATTER_LABEL, bundled_model_card, load_sample_head  # noqa: E402

#: phantom seeds the generators are trained on (disjoint from every other lesion-phantom use)
TRAINING_SEEDS = tuple(range(7000, 7040))
#: held-out phantom seeds of the benchmark (never seen in training)
HELD_OUT_SEEDS = tuple(range(7100, 7120))
CHECKPOINT_EVERY = 200
SEED = 0
MODEL = "lesions"
CLASS_INDEX = 1
PATCH_SIZE = (32, 32)
REGION_SIZE = (8, 8)
SLICE_AXIS = 2  # axial on the RAS model grid
#: half the default widths: the shipped file stays under 2 MB (the defaults give 6.7 MB)
GENERATOR_FEATURES = (16, 32, 64, 128)
FILES = {"generators": "generators.pt", "card": "card.json", "log": "training_log.csv"}
SECONDS_FILE = "seconds.json"  # in the checkpoint folder: training time summed over resumed runs


def geometry_for(model) -> PatchGeometry:
    """The generators' geometry: axial 32 x 32 patches in the card's inference window."""
    return PatchGeometry(2, PATCH_SIZE, tuple(model.card.patch_size), REGION_SIZE, SLICE_AXIS)


def training_images(seeds=TRAINING_SEEDS):
    """The phantoms' images and white-matter masks (the lesion-free domain's tissue)."""
    head = load_sample_head()
    images, masks = [], []
    for seed in seeds:
        phantom = make_lesion_phantom(head, seed=seed)
        white = (phantom.tissue.array[0] == WHITE_MATTER_LABEL) & (phantom.brain.array[0] > 0)
        images.append(phantom.image)
        masks.append(phantom.tissue.with_array(white[None].astype(np.uint8), ("white_matter",)))
    return images, masks


def write_log(history: np.ndarray, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("iteration", *HISTORY_COLUMNS))
        for index, row in enumerate(history, start=1):
            writer.writerow((index, *(f"{v:.6g}" for v in row)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "Models" / "lesions" / "counterfactual")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/segxai_counterfactual"))
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--phantoms", type=int, default=len(TRAINING_SEEDS), help="how many training phantoms")
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    card_path = bundled_model_card(MODEL)
    model = load_model(card_path, "cpu")
    geometry = geometry_for(model)
    seeds = TRAINING_SEEDS[: args.phantoms]
    began = time.perf_counter()
    images, masks = training_images(seeds)
    domains = build_domains(images, model, geometry, CLASS_INDEX, tissue_masks=masks, seed=SEED)
    domain_seconds = time.perf_counter() - began
    print(f"domains: {len(domains.lesion)} lesion and {len(domains.free)} lesion-free patches from "
          f"{len(seeds)} phantoms in {domain_seconds:.0f} s", flush=True)

    config = CounterfactualConfig(iterations=args.iterations, checkpoint_every=CHECKPOINT_EVERY, seed=SEED,
                                  generator_features=GENERATOR_FEATURES)
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    seconds_path = args.checkpoint_dir / SECONDS_FILE
    previous = json.loads(seconds_path.read_text())["seconds"] if seconds_path.is_file() else 0.0
    ticks = {"last": time.perf_counter(), "start": time.perf_counter()}

    def progress(fraction: float, message: str) -> None:
        done = round(fraction * config.iterations)
        now = time.perf_counter()
        if done % CHECKPOINT_EVERY == 0:  # a checkpoint was just written: its training time with it
            seconds_path.write_text(json.dumps({"seconds": previous + now - ticks["start"], "iteration": done}))
        if done % 50 == 0:
            print(f"{message} ({now - ticks['last']:.1f} s since the last report)", flush=True)
            ticks["last"] = now

    trained = train_counterfactual(domains, SegmentationScore(model, geometry, CLASS_INDEX), config,
                                   args.checkpoint_dir, model_name=model.card.name, progress=progress)
    # time of the iterations only, summed over runs: a resumed run starts from the time recorded
    # with its checkpoint (a finished checkpoint returns at once and adds ~0)
    seconds = previous + trained.seconds
    seconds_path.write_text(json.dumps({"seconds": seconds, "iteration": len(trained.history)}))

    args.out.mkdir(parents=True, exist_ok=True)
    generators_path = trained.generators.save(args.out / FILES["generators"])
    write_log(trained.history, args.out / FILES["log"])
    card_file = args.out / FILES["card"]
    evaluation = json.loads(card_file.read_text()).get("evaluation") if card_file.is_file() else None
    card = {
        "name": f"{model.card.name}-counterfactual",
        "description": ("CycleGAN activation-maximisation generators (paper 004, METHODS section 7) for the "
                        "bundled lesion model: G+ raises, G- lowers its mean lesion logit over the central "
                        "region of an axial patch; R = G+(x) - G-(x)."),
        "explains": {"model": model.card.name, "model_version": model.card.version,
                     "model_checksum": model.card.checksum(), "class_index": CLASS_INDEX,
                     "class": model.card.class_names[CLASS_INDEX]},
        "target": (f"mean class-{CLASS_INDEX} logit over the central {REGION_SIZE[0]} x {REGION_SIZE[1]} region of the "
                   "patch, the model run on its inference window around the patch"),
        "geometry": geometry.describe(),
        "config": config.to_dict(),
        "seed": SEED,
        "training_phantoms": {"generator": "SegXAILib.phantoms.make_lesion_phantom(load_sample_head(), seed)",
                              "seeds": list(seeds), "tissue": "white matter of each phantom (lesion-free domain)"},
        "held_out_phantom_seeds": list(HELD_OUT_SEEDS),
        "domains": {"lesion_patches": int(len(domains.lesion)), "lesion_free_patches": int(len(domains.free))},
        "iterations": int(len(trained.history)),
        "training_seconds": round(float(seconds), 1),
        "domain_seconds": round(domain_seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "files": {"generators": FILES["generators"], "log": FILES["log"]},
        "generators_sha256": sha256_of(generators_path),
        "generators_bytes": generators_path.stat().st_size,
    }
    if evaluation is not None and evaluation.get("generators_sha256") == card["generators_sha256"]:
        card["evaluation"] = evaluation  # still about these generators: keep it
    card_file.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {generators_path} ({card['generators_bytes'] / 1e6:.2f} MB), {card['iterations']} iterations, "
          f"{seconds:.0f} s of training", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
