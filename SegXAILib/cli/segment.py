"""``segxai segment`` (one case's segmentation) and ``segxai info`` (a model card)."""

from __future__ import annotations

import argparse

from .common import case_card, case_options, case_settings, load_case_model, model_help, progress_bar, trust_option
from .dicom_out import dicom_out_option, dicom_source, write_dicom_out

__all__ = ["add_commands"]


def _cmd_segment(args: argparse.Namespace) -> int:
    from ..io import check_output_dir
    from ..pipeline import read_case_images, read_manifest, start_case, write_case

    settings = case_settings(args, instances={"enabled": False}, resample_slices=args.resample_slices)
    card = case_card(args)
    series = dicom_source(args) if args.dicom_out is not None else None  # refused before anything is written
    # every check before anything is made: the folder is created by the first file written
    check_output_dir(args.out)
    image = read_case_images(args.images, card, settings.resample_slices)
    model = load_case_model(card, args)
    with progress_bar("segment", not args.quiet) as progress:
        # the input compared with the card first: a warning on stderr (and in case.json), or with --strict a refusal
        case = start_case(image, model, settings, progress=progress)
    manifest = write_case(case, args.out, suffix=args.suffix, inputs=dict(zip(card.input_channels, args.images)))
    for entry in read_manifest(args.out, verify=False)["files"]:
        print(f"{entry['role']}: {args.out / entry['path']}")
    print(f"manifest: {manifest}")
    if series is not None:
        for role, path in write_dicom_out(case, series, args.dicom_out).items():
            print(f"dicom {role}: {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ..pipeline import resolve_model_card

    card = resolve_model_card(args.model)
    print(card.summary())
    if args.load:
        model = load_case_model(card, args)
        parameters = sum(p.numel() for p in model.network.parameters())
        print(f"  parameters   : {parameters:,}")
    print(f"  checksum     : {card.checksum()}")
    print(f"  card         : {card.path}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``segment`` and ``info`` to the ``segxai`` sub-parsers."""
    segment = commands.add_parser("segment", help="segment an image (one file or DICOM folder per input channel)")
    case_options(segment)
    segment.add_argument("--suffix", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".mha"], help="output format")
    dicom_out_option(segment, maps=False)
    segment.add_argument("--resample-slices", action="store_true",
                         help="a DICOM series with missing or unevenly spaced slices: resample it onto a regular grid "
                              "(linear, along the slice normal) instead of refusing it")
    segment.set_defaults(run=_cmd_segment)

    info = commands.add_parser("info", help="describe a model from its card")
    info.add_argument("model", metavar="MODEL", help=model_help())
    info.add_argument("--load", action="store_true", help="also build the network and count its parameters")
    trust_option(info)
    info.set_defaults(run=_cmd_info, device="cpu")  # --load builds the network on the CPU
