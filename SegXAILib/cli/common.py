"""What the ``segxai`` commands share: the progress bar, the options every model command takes,
and the translation of library errors (which name parameters) into the options the user typed."""

from __future__ import annotations

import argparse
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..image import SegXAIInputError
from ..progress import CONFIRM_HINT, ProgressCallback, cost_limit_seconds, cost_options  # noqa: F401 (re-exported)

__all__ = ["progress_bar", "model_help", "device_option", "trust_option", "strict_option", "case_options", "case_card",
           "options_named", "load_case_model", "case_settings", "cost_options", "cost_limit_seconds", "CONFIRM_HINT"]

@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[ProgressCallback]:
    """A tqdm bar driven by a SegXAI progress callback (fractions 0..1)."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=description, disable=not enabled, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, message: str = "") -> None:
        target = int(round(fraction * 1000))
        if target > bar.n:
            bar.update(target - bar.n)
        if message:
            bar.set_postfix_str(message, refresh=False)

    try:
        yield update
    finally:
        bar.close()


def model_help() -> str:
    from ..sample_data import BUNDLED_MODELS

    return f"a model card file or folder, or a bundled model: {', '.join(BUNDLED_MODELS)}"


def device_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")


def trust_option(command: argparse.ArgumentParser) -> None:
    # --trust-bundle: the option's former name, when only bundles ran code
    command.add_argument("--trust-code", "--trust-bundle", dest="trust_code", action="store_true",
                         help="allow models whose loading runs their own code: MONAI bundles (their configs) and "
                              "'python' model cards (their module is imported)")


def case_options(command: argparse.ArgumentParser) -> None:
    """The options every command that runs a model on one case takes."""
    command.add_argument("images", nargs="+", metavar="IMAGE", help="one image per model input channel, in the card's order")
    command.add_argument("--model", required=True, help=model_help())
    command.add_argument("--out", required=True, type=Path, help="output folder")
    strict_option(command)
    trust_option(command)
    device_option(command)
    cost_options(command)
    # a refused run of one case removes the output folder it made (segxai's main)
    command.set_defaults(one_case_output=True)


def strict_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--strict", action="store_true",
                         help="refuse an input that does not fit what the model card expects (modality, intensities, "
                              "spacing, extent) instead of warning")


def case_card(args: argparse.Namespace):
    """The model card of ``--model``, checked against the number of IMAGE arguments."""
    from ..pipeline import resolve_model_card

    card = resolve_model_card(args.model)
    card.check_input_count(len(args.images), "image(s)")
    return card


@contextmanager
def options_named(*parameters: str, **renamed: str) -> Iterator[None]:
    """Errors of the library calls inside the block name the command's options.

    Library messages start with the parameter they reject (``window_batch 0: must be >= 1``,
    ``target 'x': expected ...``), but the user of a command typed an option. A message that starts
    with one of ``parameters`` (option ``--`` + the name with dashes) or with a key of ``renamed``
    (option: its value, e.g. ``cohort_dir="--cohort"``) is raised again starting with the option
    instead; any other error passes unchanged.
    """
    options = {name: "--" + name.replace("_", "-") for name in parameters} | renamed
    try:
        yield
    except SegXAIInputError as error:
        message = str(error)
        # the whole leading word, followed by a space, a colon or nothing (not ``trust=True``, ``model.0``)
        head = re.match(r"([A-Za-z_]\w*)(?=[ :]|$)", message)
        if head is None or head.group(1) not in options:
            raise
        raise SegXAIInputError(options[head.group(1)] + message[head.end():]) from None


def case_settings(args: argparse.Namespace, **fields):
    """The :class:`~SegXAILib.pipeline.CaseSettings` of a command: ``--model``, ``--device``,
    ``--trust-code``, ``--strict`` and ``fields``; validation errors name the settings' fields."""
    from ..models import resolve_device
    from ..pipeline import CaseSettings

    device = getattr(args, "device", "auto")
    with options_named("device"):
        resolve_device(device)  # an unknown or absent device is named by its option, before any work
    values = {"model": str(args.model), "device": device,
              "trust_code": bool(getattr(args, "trust_code", False)), "strict": bool(getattr(args, "strict", False)),
              **fields}
    return CaseSettings.from_dict(values, "options")


def load_case_model(card, args: argparse.Namespace):
    """The network of ``card`` (through the pipeline's loader) with the command's ``--device``
    and ``--trust-code``, its errors naming those options."""
    from ..models import load_model

    # the library refuses naming its ``trust_code`` parameter; here the option is named
    if card.format == "bundle" and not args.trust_code:
        raise SegXAIInputError(f"--model {args.model}: a MONAI bundle, whose configs can run arbitrary code; "
                               "pass --trust-code if you trust its source")
    if card.format == "python" and not args.trust_code:
        raise SegXAIInputError(f"--model {args.model}: a 'python' model card, whose network module is imported "
                               "(which runs its code); pass --trust-code if you trust its source")
    with options_named("device"):
        return load_model(card, device=args.device, trust_code=args.trust_code)
