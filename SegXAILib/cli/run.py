"""``segxai run SETTINGS.json IMAGE... --out DIR``: the engine process (:mod:`SegXAILib.engine`)."""

from __future__ import annotations

import argparse

__all__ = ["add_commands"]


def _cmd_run(args: argparse.Namespace) -> int:
    from ..engine import run_process

    return run_process(args)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``run`` to the ``segxai`` sub-parsers."""
    from ..engine import add_arguments

    run = commands.add_parser(
        "run", help="run one case as the engine process: JSON progress lines, case folder with case.json",
        description="Runs the case pipeline on one case with CaseSettings from a JSON file and prints one JSON "
                    "object per line (progress, error, cancelled, done). SIGINT / SIGTERM stop it within 2 s "
                    "(exit 130). Exit 2 on bad input.")
    add_arguments(run)
    run.set_defaults(run=_cmd_run)
