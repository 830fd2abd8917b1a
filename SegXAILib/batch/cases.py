"""The cases of a batch: ``CASES.csv`` read into :class:`BatchCase` rows.

Columns: ``case`` (the case id, which names its output folder ``cases/<id>/``), one column per
model input channel named as the model card's ``input_channels`` (a file, or a DICOM series
folder; a relative path is relative to the CSV's folder), and an optional ``reference`` (a
reference label map on the image's grid; a cell may be empty). Other columns (a patient's
age, a site) are kept as the case's ``metadata`` and recorded in ``batch.json``. Every problem
is a :class:`~SegXAILib.image.SegXAIInputError` naming the file, the line and the column,
found before any case runs::

    case,FLAIR,T1,reference
    patient01,patient01/flair.nii.gz,patient01/t1.nii.gz,patient01/lesions.nii.gz
    patient02,/data/p02_flair.nii.gz,/data/p02_t1.nii.gz,
"""

from __future__ import annotations

import csv
import io as _io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ..image import SegXAIInputError

__all__ = ["BatchCase", "read_cases", "CASE_COLUMN", "REFERENCE_COLUMN", "CASE_ID"]

CASE_COLUMN = "case"
REFERENCE_COLUMN = "reference"
#: a case id is a folder name on every file system: no separators, no leading dot
CASE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class BatchCase:
    """One row of ``CASES.csv``.

    Attributes
    ----------
    id : str
        The case id (its output folder name).
    images : tuple of Path
        One absolute path per model input channel, in the card's order.
    reference : Path or None
        The reference label map, absolute.
    line : int
        The row's line in the CSV (for messages).
    metadata : dict
        The row's other columns.
    """

    id: str
    images: tuple[Path, ...]
    reference: Optional[Path] = None
    line: int = 0
    metadata: dict[str, str] = field(default_factory=dict, compare=False)

    def inputs(self, channels: Sequence[str]) -> dict[str, str]:
        """Channel -> image file, as a case manifest records them."""
        return {name: str(path) for name, path in zip(channels, self.images)}


def _cell_path(cell: str, base: Path, where: str) -> Path:
    path = Path(os.path.expanduser(cell))
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise SegXAIInputError(f"{where}: {path} does not exist")
    return path.resolve()


def read_cases(path: Union[str, os.PathLike], channels: Sequence[str]) -> list[BatchCase]:
    """The cases of a cases CSV (module docstring), checked: ids, columns and files.

    Parameters
    ----------
    path : path-like
        The CSV file (UTF-8, a header row).
    channels : sequence of str
        The model card's input channel names: one column each.

    Returns
    -------
    list of BatchCase
        In the file's order.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Excel's UTF-8 CSV) is not part of the first column's name
    except (OSError, UnicodeDecodeError) as error:
        raise SegXAIInputError(f"cases {path}: cannot read ({error})") from None
    reader = csv.DictReader(_io.StringIO(text, newline=""), skipinitialspace=True)
    header = [name.strip() for name in (reader.fieldnames or [])]
    if not header:
        raise SegXAIInputError(f"cases {path}: empty file; expected a header row with the columns "
                               f"{[CASE_COLUMN, *channels]}")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise SegXAIInputError(f"cases {path}: column(s) {repeated} appear twice in the header")
    missing = [name for name in (CASE_COLUMN, *channels) if name not in header]
    if missing:
        raise SegXAIInputError(f"cases {path}: missing column(s) {missing}; the header has {header} and the model "
                               f"needs {CASE_COLUMN!r} and one column per input channel {list(channels)}")
    reader.fieldnames = header
    base = path.resolve().parent
    cases: list[BatchCase] = []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if None in row:  # more cells than header columns
            raise SegXAIInputError(f"cases {path}, line {line}: {len(header) + len(row[None])} cells but "
                                   f"{len(header)} columns in the header")
        values = {name: (value or "").strip() for name, value in row.items()}
        if not any(values.values()):
            continue  # a blank line
        identifier = values[CASE_COLUMN]
        where = f"cases {path}, line {line}, column {CASE_COLUMN!r}"
        if not CASE_ID.match(identifier):
            raise SegXAIInputError(f"{where}: case id {identifier!r} is not a folder name (letters, digits, "
                                   "'_', '.', '+', '-'; not starting with '.' or '-')")
        # case-insensitive: two ids that differ only in case share a folder on macOS and Windows
        if identifier.lower() in seen:
            raise SegXAIInputError(f"{where}: case id {identifier!r} repeats the case of line "
                                   f"{seen[identifier.lower()]}")
        seen[identifier.lower()] = line
        images = []
        for channel in channels:
            where = f"cases {path}, line {line}, column {channel!r}"
            if not values[channel]:
                raise SegXAIInputError(f"{where}: empty; give the case's {channel} image")
            images.append(_cell_path(values[channel], base, where))
        reference = None
        if values.get(REFERENCE_COLUMN):
            reference = _cell_path(values[REFERENCE_COLUMN], base,
                                   f"cases {path}, line {line}, column {REFERENCE_COLUMN!r}")
        metadata = {k: v for k, v in values.items() if k not in (CASE_COLUMN, REFERENCE_COLUMN, *channels)}
        cases.append(BatchCase(identifier, tuple(images), reference, line, metadata))
    if not cases:
        raise SegXAIInputError(f"cases {path}: no case rows under the header")
    return cases
