"""The ``segxai`` command line (console script ``segxai = SegXAILib.cli:main``; also
``python -m SegXAILib.cli``).

One module per command group, each adding its sub-commands with ``add_commands(subparsers)``:
:mod:`.segment` (segment, info), :mod:`.explain` (explain, methods), :mod:`.demo` (demo,
train-demo), :mod:`.lesions` (lesions, lesion-context), :mod:`.patterns` (patterns fit),
:mod:`.evaluate` (evaluate, agg2exp), :mod:`.qa` (qa cohort / calibrate / score), :mod:`.run`
(run: the engine process), :mod:`.counterfactual` (counterfactual train / explain); :mod:`.common`
holds what they share. The commands only parse and check options, call the library and write
or print its results; the library never imports this package.
"""

from .app import EXIT_BAD_INPUT, build_parser, main
from .common import progress_bar

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main", "progress_bar"]
