"""Schema validation of the JSON files SegXAI reads (model cards, risk models, cohort indexes).

Each file has a pydantic v2 schema model (beside the code that reads the file); :func:`validate`
runs it and turns a :class:`pydantic.ValidationError` into a :class:`~SegXAILib.image.SegXAIInputError`
whose message names the file and the path of every offending field, e.g.
``model card /x/model_card.json: classes.1.color.0: Input should be less than or equal to 255, got 300``.

Schemas validate only: the callers build their own objects from the raw JSON (a model card's
checksum hashes the card as written, so validation must not rewrite its values).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from .image import SegXAIInputError

__all__ = ["validate", "input_error", "field_path", "problem"]

Schema = TypeVar("Schema", bound=BaseModel)

#: errors listed in one message (the rest are counted)
MAX_LISTED = 5
# pydantic names the schema class in these; the user only needs to know an object was expected
_OBJECT_TYPES = ("model_type", "model_attributes_type", "dict_type")


def field_path(location: tuple[int | str, ...]) -> str:
    """``("classes", 1, "color")`` -> ``"classes.1.color"`` (pydantic's error location)."""
    return ".".join(str(part) for part in location)


def _shown(value: Any) -> str:
    """A short repr of an offending value (containers only by their type)."""
    if isinstance(value, (dict, list, tuple)):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def problem(message: str) -> PydanticCustomError:
    """An error for a schema's own validators: its message is shown as written (a plain
    ``ValueError`` would be prefixed with "Value error, ")."""
    return PydanticCustomError("value_error", message)


def input_error(source: str, error: ValidationError) -> SegXAIInputError:
    """One :class:`SegXAIInputError` listing ``error``'s problems as ``field.path: message``,
    prefixed by ``source`` (the file, e.g. ``"risk model /x/risk.json"``)."""
    lines = []
    for item in error.errors(include_url=False):
        message = "Input should be an object" if item["type"] in _OBJECT_TYPES else item["msg"]
        # a validator's own ValueError (or SegXAIInputError) explains itself: no pydantic prefix,
        # and the object it checked is not repeated
        own = item["type"] == "value_error" and message.startswith("Value error, ")
        message = message.removeprefix("Value error, ") if own else message
        if item["type"] != "missing" and item["loc"] and not (own and isinstance(item["input"], (dict, list))):
            message += f", got {_shown(item['input'])}"
        where = field_path(item["loc"])
        lines.append(f"{where}: {message}" if where else message)
    text = "; ".join(lines[:MAX_LISTED])
    if len(lines) > MAX_LISTED:
        text += f"; and {len(lines) - MAX_LISTED} more"
    return SegXAIInputError(f"{source}: {text}")


def validate(schema: type[Schema], data: Any, source: str) -> Schema:
    """``schema.model_validate(data)``; a validation failure raises :class:`SegXAIInputError`
    naming ``source`` and the fields (see :func:`input_error`)."""
    if not isinstance(data, dict):
        raise SegXAIInputError(f"{source}: expected a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise input_error(source, error) from None
