"""``segxai uncertainty``: where the model is unsure of one case.

Runs the case pipeline (``start_case`` + ``add_uncertainty`` + ``write_case``): the case folder
holds the prediction, ``uncertainty/`` (mean probability, variance, predictive and expected
entropy, mutual information, mask frequency), ``uncertainty.json`` (per-structure and per-lesion
tables) and the lesion table with its uncertainty columns.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from ..image import SegXAIInputError
from .case_settings import fields_named, settings_from_options
from .common import case_card, case_options, load_case_model, progress_bar

__all__ = ["add_commands", "parse_source"]

# ``k=v`` pairs separated by commas outside brackets (``axes=[0,1],...``)
_PAIRS = re.compile(r"([A-Za-z_]\w*)=(\[[^\]]*\]|[^,]*)(?:,|$)")


def parse_source(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:key=value,key=value`` -> ``(NAME, {key: value})``; values are read as
    JSON (numbers, ``[0,1]``, ``true``) or else kept as text, then checked by the source."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    position = 0
    while position < len(rest):
        match = _PAIRS.match(rest, position)
        if match is None:
            raise SegXAIInputError(f"--source {text!r}: expected NAME or NAME:key=value,key=value "
                                   "(e.g. noise:std=0.2 or flips:axes=[0,2])")
        key, value = match.group(1), match.group(2)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
        position = match.end()
    if not name:
        raise SegXAIInputError(f"--source {text!r}: no source name")
    return name, params


def _cmd_uncertainty(args: argparse.Namespace) -> int:
    from ..io import check_writable_dir
    from ..pipeline import add_uncertainty, read_case_images, start_case, write_case

    sources: dict[str, dict[str, Any]] = {}
    for text in args.source or ["flips"]:
        name, params = parse_source(text)
        if name in sources:
            raise SegXAIInputError(f"--source {name}: given twice")
        sources[name] = params
    options = {"uncertainty.sources": "--source", "uncertainty.samples": "--samples", "uncertainty.seed": "--seed",
               "uncertainty.models": "--ensemble-model", "uncertainty.band_width_mm": "--band-width-mm",
               "uncertainty.region_width_mm": "--region-width-mm", "class_name": "--class", "device": "--device"}
    settings = settings_from_options({
        "model": str(args.model), "device": args.device, "trust_code": args.trust_code, "class_name": args.class_name,
        "uncertainty": {"enabled": True, "sources": sources, "samples": args.samples, "seed": args.seed,
                        "models": list(args.ensemble_model or []), "band_width_mm": args.band_width_mm,
                        "region_width_mm": args.region_width_mm},
    }, options)
    card = case_card(args)
    check_writable_dir(args.out)
    model = load_case_model(card, args)
    image = read_case_images(args.images, card)
    with progress_bar("uncertainty", not args.quiet) as progress, fields_named(options):
        case = start_case(image, model, settings, progress=progress)
        add_uncertainty(case, model, progress=progress)
    manifest = write_case(case, args.out, suffix=args.suffix, inputs=dict(zip(card.input_channels, args.images)))
    result = case.uncertainty
    print(f"{result.samples} samples ({', '.join(result.sources)}), seed {result.seed}")
    for row in result.structures:
        print(f"{row.structure}: mean entropy {_number(row.mean_entropy)} nats, pairwise Dice "
              f"{_number(row.pairwise_dice)}, volume CV {_number(row.volume_cv)}, soft Dice confidence "
              f"{_number(row.soft_dice_confidence)}")
    for row in case.lesions:
        values = row.get("uncertainty")
        if values:
            print(f"  lesion {row['id']}: {row['voxels']} voxels, mean entropy {_number(values['mean_entropy'])}, "
                  f"boundary entropy {_number(values['boundary_entropy'])}, pairwise Dice "
                  f"{_number(values['pairwise_dice'])}")
    print(f"manifest: {manifest}")
    return 0


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``uncertainty`` to the ``segxai`` sub-parsers."""
    command = commands.add_parser(
        "uncertainty", help="where the model is unsure: entropy, mutual information and per-lesion scores from "
                            "flips, test-time augmentation, MC dropout or ensembles")
    case_options(command)
    command.add_argument("--source", action="append", metavar="NAME[:k=v,...]",
                         help="a sample source, repeatable: flips (the card's mirror axes; flips:axes=[0,1,2]), "
                              "gamma, noise (noise:std=0.1), intensity_scale, spatial (spatial:rotation_degrees=5), "
                              "mc_dropout, ensemble (default: flips)")
    command.add_argument("--samples", type=int, default=None,
                         help="number of samples (default: every flip / member combination, or 10 with a random "
                              "source)")
    command.add_argument("--seed", type=int, default=0, help="seed of the random sources")
    command.add_argument("--ensemble-model", action="append", metavar="MODEL",
                         help="another model of the same classes for the ensemble source (repeatable)")
    command.add_argument("--class", dest="class_name", default="", help="the structure of the lesion table")
    command.add_argument("--band-width-mm", type=float, default=2.0, help="boundary band of the boundary entropy")
    command.add_argument("--region-width-mm", type=float, default=10.0,
                         help="how far a sample's version of a lesion may lie from it")
    command.add_argument("--suffix", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".mha"],
                         help="output format")
    command.set_defaults(run=_cmd_uncertainty)
