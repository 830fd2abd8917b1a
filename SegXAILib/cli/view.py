"""``segxai view [CASE_DIR | IMAGE ...] [--model M] [--generators PATH]``: the browser viewer
(:mod:`SegXAILib.viewer`)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

__all__ = ["add_commands"]


def _cmd_view(args: argparse.Namespace) -> int:
    from ..image import SegXAIInputError

    try:
        from ..viewer.app import ViewerApp
    except ImportError as error:  # the viewer extra is not installed
        raise SegXAIInputError(f"segxai view needs the viewer extra (pip install 'SegXAILib[viewer]'): {error}") \
            from None
    for path in args.paths:
        if not path.exists():
            raise SegXAIInputError(f"{path}: no such case folder or image")
    if len(args.paths) > 1 and any(path.is_dir() and (path / "case.json").is_file() for path in args.paths):
        raise SegXAIInputError("give one case folder, or image files (one per model input)")
    if args.generators is not None and not args.generators.exists():
        raise SegXAIInputError(f"--generators {args.generators}: no such file or folder (generators.pt or the folder "
                               "'segxai counterfactual train' wrote)")
    if args.port < 0 or args.port > 65535:
        raise SegXAIInputError(f"--port must be in 0..65535, got {args.port}")
    if args.max_minutes is not None and not args.max_minutes >= 0:
        raise SegXAIInputError(f"--max-minutes {args.max_minutes}: must be >= 0 (0: no limit)")
    out = args.out or Path(tempfile.mkdtemp(prefix="segxai-view-"))
    viewer = ViewerApp(out, model=args.model, device=args.device, three_d=args.three_d,
                       generators=None if args.generators is None else str(args.generators.resolve()),
                       max_minutes=args.max_minutes)
    viewer.open_paths(args.paths)
    if args.model and viewer.volumes:
        viewer.segment()
    viewer.start(host=args.host, port=args.port)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``view`` to the ``segxai`` sub-parsers."""
    view = commands.add_parser(
        "view", help="browser viewer: Slicer's views, saliency overlays, pick a lesion, QA",
        description="Starts the browser viewer on 127.0.0.1 and prints its URL, which carries a random access token "
                    "(requests without it are refused). A case folder (segxai run, segxai demo) is shown at once; "
                    "image files (one per model input) are segmented with --model. Work runs in the engine process.")
    view.add_argument("paths", nargs="*", type=Path, help="a case folder, or image files (one per model input)")
    view.add_argument("--model", default=None, help="bundled model name or model card, for images")
    view.add_argument("--generators", type=Path, default=None,
                      help="counterfactual generators (generators.pt or the folder 'segxai counterfactual train' "
                           "wrote): the viewer's Counterfactual explains the selected lesion with them")
    view.add_argument("--device", default="auto", help="the engine's device: auto, cpu, cuda, cuda:N, mps")
    view.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1; another address still needs the token)")
    view.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    view.add_argument("--out", type=Path, default=None, help="folder for the engine jobs (default: a new temporary one)")
    view.add_argument("--3d", dest="three_d", action="store_true", help="add a 3D view")
    view.add_argument("--max-minutes", type=float, default=None, metavar="N",
                      help="the engine jobs refuse a computation estimated to take longer than N minutes, and the "
                           "page asks whether to run it anyway; 0: no limit (default: $SEGXAI_MAX_MINUTES, else 10)")
    view.set_defaults(run=_cmd_view)
