"""The ``segxai`` command: its parser and :func:`main`.

Exit codes: 0 success, 2 bad input (a clear message names the file or option), 130
interrupted, 1 any other failure; ``segxai batch``: 3 when some cases failed (the others finished).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..image import SegXAIInputError
from ..progress import Cancelled
from . import batch, counterfactual, demo, evaluate, explain, lesions, patterns, qa, run, segment, uncertainty, view

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]

EXIT_BAD_INPUT = 2

# Each adds its sub-commands with ``add_commands(subparsers)``, in the order ``segxai --help`` lists them.
_COMMAND_GROUPS = (segment, explain, uncertainty, counterfactual, demo, lesions, patterns, evaluate, qa, run, batch, view)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segxai",
        description="Explainability and quality assurance for 3D medical segmentation models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.run(args))
    except SegXAIInputError as error:
        print(f"segxai {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Cancelled):
        print(f"segxai {args.command}: interrupted", file=sys.stderr)
        return 130
