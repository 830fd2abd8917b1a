"""``segxai run SETTINGS.json IMAGE... --out DIR``: the engine process (:mod:`SegXAILib.engine`)."""

from __future__ import annotations

import argparse
import json

from .dicom_out import dicom_out_option, dicom_source, write_dicom_out

__all__ = ["add_commands"]


def _cmd_run(args: argparse.Namespace) -> int:
    from ..engine import run_process

    series = dicom_source(args) if args.dicom_out is not None else None  # before any work
    code = run_process(args)
    if code != 0 or series is None:
        return code
    from ..pipeline import read_case

    # from the case folder just written (checksums verified): the engine runs the case
    files = write_dicom_out(read_case(args.out), series, args.dicom_out)
    print(json.dumps({"event": "dicom", "files": {role: str(path.resolve()) for role, path in files.items()}}), flush=True)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``run`` to the ``segxai`` sub-parsers."""
    from ..engine import add_arguments

    run = commands.add_parser(
        "run", help="run one case as the engine process: JSON progress lines, case folder with case.json",
        description="Runs the case pipeline on one case with CaseSettings from a JSON file and prints one JSON "
                    "object per line (progress, error, cancelled, done). SIGINT / SIGTERM stop it within 2 s "
                    "(exit 130). Exit 2 on bad input.")
    add_arguments(run)
    # after the "done" line, one {"event": "dicom", "files": {...}} line lists what it wrote
    dicom_out_option(run, maps=True)
    run.set_defaults(run=_cmd_run)
