"""Fit the PatternNet / PatternAttribution patterns shipped with the bundled demo models.

Run from the repository root (about 2-3 minutes on 2 CPU cores)::

    python Testing/Benchmarks/fit_bundled_patterns.py [--models lesions parotid-S2 ...]
        [--volumes-lesions 16] [--volumes-parotid 48] [--seed-start 5000] [--threads 1]
        [--models-dir Resources/Models] [--out Testing/Benchmarks/results]

Each model gets ``patterns_linear.pt`` and ``patterns_two_component.pt`` beside its card,
fitted on freshly generated phantoms of the kind it was trained on, with seeds
``seed_start, seed_start + 1, ...``: disjoint from the training seeds (0-47 lesions, 0-399
parotid), the held-out seeds (1000-1007) and the demo / test seeds (2026, 2027) of
``SegXAILib/training.py`` and the tests. Phantoms are made one at a time (lazily), preprocessed
exactly as inference does, and every sliding window of each is used. The same seeds and torch
version give the same files. A summary (sizes, counts, seconds) goes to
``results/patterns.json`` and ``results/patterns.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

#: phantom seeds: outside training (0-399), held-out (1000-1007) and demo / test (2026, 2027) seeds
SEED_START = 5000


def phantom_factories(name: str, count: int, seed_start: int) -> list[Callable]:
    """``count`` callables, each making one phantom image of the kind model ``name`` was trained on."""
    from SegXAILib.training import PAROTID_SHAPE, PAROTID_SPACING_MM

    seeds = range(seed_start, seed_start + count)
    if name == "lesions":
        from SegXAILib.phantoms import make_lesion_phantom
        from SegXAILib.sample_data import load_sample_head

        head = load_sample_head()
        return [lambda s=s: make_lesion_phantom(head, seed=s).image for s in seeds]
    from SegXAILib.phantoms import make_parotid_phantom

    variant = name.split("-", 1)[1]
    return [lambda s=s: make_parotid_phantom(variant, seed=s, shape=PAROTID_SHAPE, spacing=PAROTID_SPACING_MM).image
            for s in seeds]


def fit_bundled(names, volumes: dict[str, int], seed_start: int, models_dir: Path) -> dict[str, Any]:
    from SegXAILib.attribution.patterns import fit_patterns
    from SegXAILib.models import load_model, load_model_card
    from SegXAILib.sample_data import BUNDLED_MODELS

    rows = []
    for name in names:
        card = load_model_card(models_dir / BUNDLED_MODELS[name])
        model = load_model(card, "cpu")
        count = volumes["lesions" if name == "lesions" else "parotid"]
        start = time.perf_counter()
        sets = fit_patterns(model, phantom_factories(name, count, seed_start), window_batch=2, seed=0)
        seconds = time.perf_counter() - start
        for estimator, pattern_set in sets.items():
            path = pattern_set.save(card.path.parent / f"patterns_{estimator}.pt")
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            rows.append({
                "model": name, "estimator": estimator, "file": str(shown),
                "megabytes": round(path.stat().st_size / 1e6, 3), "volumes": pattern_set.volumes,
                "windows": pattern_set.windows, "voxels": pattern_set.voxels, "layers": len(pattern_set.patterns),
                "seeds": [seed_start, seed_start + count - 1], "fit_seconds": round(seconds, 1),
            })
            print(f"{name} {estimator}: {path} {rows[-1]['megabytes']} MB, {pattern_set.volumes} volumes, "
                  f"{pattern_set.windows} windows, {seconds:.1f} s")
    return {
        "benchmark": "fit_bundled_patterns",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Shipped PatternNet / PatternAttribution patterns",
        "",
        f"torch {results['versions']['torch']}, {results['machine']['threads']} thread(s). "
        "Fitting time covers both estimators (one pass of statistics).",
        "",
        "| model | estimator | file | MB | volumes (seeds) | windows | voxels | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['estimator']} | `{r['file']}` | {r['megabytes']} | {r['volumes']} "
                     f"({r['seeds'][0]}-{r['seeds'][1]}) | {r['windows']} | {r['voxels']} | {r['fit_seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from SegXAILib.sample_data import BUNDLED_MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(BUNDLED_MODELS), choices=list(BUNDLED_MODELS))
    parser.add_argument("--volumes-lesions", type=int, default=16)
    parser.add_argument("--volumes-parotid", type=int, default=48)
    parser.add_argument("--seed-start", type=int, default=SEED_START)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "Resources" / "Models")
    parser.add_argument("--out", type=Path, default=ROOT / "Testing" / "Benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = fit_bundled(args.models, {"lesions": args.volumes_lesions, "parotid": args.volumes_parotid},
                          args.seed_start, args.models_dir)
    from bench_attribution import write_results

    paths = write_results(results, args.out, name="patterns", as_markdown=markdown)
    print(markdown(results))
    print(f"written: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
