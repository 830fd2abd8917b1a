"""A command's options as :class:`~SegXAILib.pipeline.CaseSettings`, and the pipeline's errors
(which name settings fields, ``instances.ids: no instance 9``) named by the options the user
typed (``--instances 9: no instance 9``)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from ..image import SegXAIInputError

__all__ = ["fields_named", "settings_from_options"]

# a message's leading field (``instances.ids``, ``device``) and, before its colon, the value the
# library quotes (``'x'``, ``[1.0, 2.0, 3.0]``, ``0``)
_HEAD = re.compile(r"([A-Za-z_][\w.]*)(?=[ :]|$)")
_VALUE = re.compile(r" (?:'[^']*'|\[[^\]]*\]|[^\s:]+)(?=:)")


def _renamed(message: str, options: Mapping[str, str]) -> str:
    """``message`` starting with its option instead of its field (unchanged when unknown)."""
    head = _HEAD.match(message)
    if head is None or head.group(1) not in options:
        return message
    option, rest = options[head.group(1)], message[head.end():]
    value = _VALUE.match(rest)
    if value is not None and " " in option:
        rest = rest[value.end():]  # the option text carries the value as the user typed it
    return option + rest


@contextmanager
def fields_named(options: Mapping[str, str]) -> Iterator[None]:
    """Errors of the pipeline calls inside the block name the command's options.

    ``options`` maps a settings field (``instances.ids``) or parameter (``class_name``) to the
    option text: the option alone (``--class``) or the option and the value typed
    (``--click -12,30,4``), which then replaces the value the library quotes. Other errors pass
    unchanged.
    """
    try:
        yield
    except SegXAIInputError as error:
        message = _renamed(str(error), options)
        if message == str(error):
            raise
        raise SegXAIInputError(message) from None


def settings_from_options(data: Mapping[str, Any], options: Mapping[str, str]):
    """Validated :class:`~SegXAILib.pipeline.CaseSettings` of a command's options (``data``:
    the settings as a dict); a refused value is reported naming its option (``options`` as in
    :func:`fields_named`, keyed by the field's dotted path)."""
    from pydantic import ValidationError

    from ..pipeline import CaseSettings

    try:
        return CaseSettings.model_validate(dict(data))
    except ValidationError as error:
        item = error.errors()[0]
        where = ".".join(str(part) for part in item.get("loc", ()))
        problem = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        value = item.get("input")
        if not where:  # a check across fields: its message starts with the field it names
            message = problem
        elif isinstance(value, (str, int, float)):
            message = f"{where} {value}: {problem}"
        else:
            message = f"{where}: {problem}"
        with fields_named(options):
            raise SegXAIInputError(message) from None
