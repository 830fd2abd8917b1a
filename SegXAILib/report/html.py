"""A small, self-contained HTML report builder.

Features add sections (headings, paragraphs, tables, figures, key/value lists) to one
:class:`HtmlReport` and write it once. The written page has inline CSS only: no scripts,
no external URLs or fonts, and figures referenced by relative paths under
``<out_dir>/figures``, so the folder can be zipped, archived or opened offline. Every piece
of user text is HTML-escaped.
"""

from __future__ import annotations

import datetime as _datetime
import html as _html
import math
import numbers
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np

from ..image import SegXAIInputError
from ..io import atomic_path, check_writable_dir

__all__ = ["HtmlReport", "ImageCell", "LinkCell", "format_value", "escape"]


class ImageCell:
    """A table cell showing an image of the report (from :meth:`HtmlReport.save_image`)."""

    def __init__(self, src: str, alt: str = "") -> None:
        self.src, self.alt = str(src), str(alt)

    def to_html(self) -> str:
        return f'<img class="thumb" src="{escape(quote(self.src))}" alt="{escape(self.alt)}" loading="lazy">'


class LinkCell:
    """A table cell linking to a file of the report's folder (``href`` relative to it, e.g. a
    case's own report)."""

    def __init__(self, href: str, text: str) -> None:
        self.href, self.text = str(href), str(text)

    def to_html(self) -> str:
        return f'<a href="{escape(quote(self.href))}">{escape(self.text)}</a>'


_CSS = """
:root { color-scheme: light; }
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       "Noto Sans", "Liberation Sans", sans-serif; color: #1f2328; background: #ffffff;
       margin: 0 auto; padding: 1.5rem 2rem 3rem; max-width: 1200px; line-height: 1.45; font-size: 15px; }
header { border-bottom: 3px solid #2b5797; margin-bottom: 1.2rem; padding-bottom: 0.4rem; }
header h1 { margin: 0 0 0.2rem; font-size: 1.6rem; color: #1b365d; }
header .meta { color: #57606a; font-size: 0.85rem; }
h2 { font-size: 1.25rem; color: #1b365d; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem;
     margin-top: 2rem; }
h3 { font-size: 1.08rem; color: #1b365d; margin-top: 1.4rem; }
h4, h5, h6 { font-size: 1rem; color: #1b365d; }
p { margin: 0.5rem 0 0.8rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1.2rem; font-size: 0.9rem; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0 0 0.3rem; color: #24292f; }
th, td { border: 1px solid #b8c0c8; padding: 0.28rem 0.6rem; vertical-align: top; }
th { background: #eef2f7; text-align: left; font-weight: 600; }
tbody tr:nth-child(even) td { background: #f8fafc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { width: 16rem; }
figure { margin: 0.8rem 0 1.6rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; display: block; }
img.thumb { max-height: 9rem; width: auto; display: block; }
figcaption { color: #444c56; font-size: 0.88rem; margin-top: 0.35rem; }
footer { margin-top: 2.5rem; border-top: 1px solid #d0d7de; padding-top: 0.5rem; color: #6e7781;
         font-size: 0.8rem; }
div.warning-banner { border: 2px solid #bf8700; background: #fff8c5; color: #3b2300; padding: 0.6rem 1rem;
                      margin: 0.8rem 0 1.2rem; border-radius: 4px; }
div.warning-banner strong { display: block; margin-bottom: 0.3rem; }
div.warning-banner ul { margin: 0; padding-left: 1.2rem; }
@media print { body { padding: 0; max-width: none; } figure, table { page-break-inside: avoid; } }
"""

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def escape(text: Any) -> str:
    """``str(text)`` with ``& < > " '`` escaped for HTML text and attribute values."""
    return _html.escape("" if text is None else str(text), quote=True)


def format_value(value: Any, digits: int = 4) -> str:
    """A short display string for a table cell (not yet escaped).

    Floats get ``digits`` significant digits (``0.1235``, ``1.235e+05``), integers stay
    exact, ``None`` is empty, NaN is ``"n/a"``, booleans ``"yes"``/``"no"``, sequences are
    joined with ", ".
    """
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "n/a"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        if number == 0:
            return "0"
        return f"{number:.{digits}g}"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item, digits) for item in value)
    if isinstance(value, Path):
        return value.as_posix()
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


class HtmlReport:
    """Build a self-contained HTML report in ``out_dir`` (figures go under ``out_dir/figures``).

    Example
    -------
    >>> report = HtmlReport("Case 012 - QA", Path("out"))
    >>> report.add_heading("Saliency")
    >>> report.add_figure(fig, caption="Axial/coronal/sagittal through the lesion", name="saliency")
    >>> report.add_table([{"lesion": 1, "volume_ml": 0.4213}], caption="Lesions")
    >>> report.write()  # out/report.html
    """

    def __init__(self, title: str, out_dir: str | os.PathLike, timestamp: bool = True):
        self.title = str(title)
        self.out_dir = check_writable_dir(Path(out_dir))
        self.figures_dir = self.out_dir / "figures"
        self.timestamp = timestamp
        self._parts: list[str] = []
        self._figure_names: set[str] = set()
        self._figure_count = 0

    # ---- sections -------------------------------------------------------------------------
    def add_heading(self, text: str, level: int = 2) -> None:
        """A heading, ``level`` 2-6 (level 1 is the report title)."""
        if not isinstance(level, int) or not 1 <= level <= 6:
            raise SegXAIInputError(f"add_heading: level must be 1-6, got {level!r}")
        self._parts.append(f"<h{level}>{escape(text)}</h{level}>")

    def add_paragraph(self, text: str) -> None:
        """A paragraph of plain text (escaped; blank lines start new paragraphs)."""
        blocks = [block.strip() for block in re.split(r"\n\s*\n", str(text))]
        for block in blocks:
            if block:
                self._parts.append("<p>" + escape(block).replace("\n", "<br>\n") + "</p>")

    def add_table(
        self,
        rows: Sequence[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
        caption: str = "",
        digits: int = 4,
    ) -> None:
        """A table with one row per mapping; ``columns`` (default: every key, first-seen order).

        Values go through :func:`format_value` (floats to ``digits`` significant digits),
        numbers are right-aligned, missing keys are empty cells; everything is escaped.
        An :class:`ImageCell` value shows its image (a thumbnail), a :class:`LinkCell` its link.
        """
        rows = list(rows)
        for position, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise SegXAIInputError(f"add_table: row {position} is a {type(row).__name__}, expected a dict")
        if columns is None:
            columns = list(dict.fromkeys(key for row in rows for key in row))
        columns = [str(column) for column in columns]
        lines = ["<table>"]
        if caption:
            lines.append(f"<caption>{escape(caption)}</caption>")
        lines.append("<thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr></thead>")
        lines.append("<tbody>")
        if not rows:
            lines.append(f'<tr><td colspan="{max(len(columns), 1)}">(none)</td></tr>')
        for row in rows:
            cells = []
            for column in columns:
                value = row.get(column)
                if isinstance(value, (ImageCell, LinkCell)):
                    cells.append(f"<td>{value.to_html()}</td>")
                    continue
                css = ' class="num"' if _is_number(value) else ""
                cells.append(f"<td{css}>{escape(format_value(value, digits))}</td>")
            lines.append("<tr>" + "".join(cells) + "</tr>")
        lines.append("</tbody></table>")
        self._parts.append("\n".join(lines))

    def add_key_values(self, mapping: Mapping[str, Any], caption: str = "", digits: int = 4) -> None:
        """A two-column table of ``key: value`` pairs (e.g. model, input files, settings)."""
        if not isinstance(mapping, Mapping):
            raise SegXAIInputError(f"add_key_values: expected a dict, got {type(mapping).__name__}")
        lines = ['<table class="kv">']
        if caption:
            lines.append(f"<caption>{escape(caption)}</caption>")
        lines.append("<tbody>")
        for key, value in mapping.items():
            css = ' class="num"' if _is_number(value) else ""
            lines.append(f"<tr><th>{escape(key)}</th><td{css}>{escape(format_value(value, digits))}</td></tr>")
        lines.append("</tbody></table>")
        self._parts.append("\n".join(lines))

    def add_figure(self, fig_or_png_path, caption: str = "", name: str | None = None) -> Path:
        """Add a figure: a matplotlib ``Figure`` (saved to ``figures/<name>.png``) or an existing
        PNG file (copied there unless already inside ``figures/``). Returns the PNG's path.

        ``name`` defaults to ``figure_01``, ``figure_02``...; unsafe characters are replaced
        and a name already used in this report gets a ``_2``, ``_3``... suffix.
        """
        target = self.save_image(fig_or_png_path, name)
        relative = target.resolve().relative_to(self.out_dir.resolve()).as_posix()
        alt = caption or target.stem
        parts = [
            "<figure>",
            f'<img src="{escape(quote(relative))}" alt="{escape(alt)}" loading="lazy">',
        ]
        if caption:
            parts.append(f"<figcaption>{escape(caption)}</figcaption>")
        parts.append("</figure>")
        self._parts.append("\n".join(parts))
        return target

    def image_cell(self, fig_or_png_path, alt: str = "", name: str | None = None) -> ImageCell:
        """Save a figure as :meth:`add_figure` does, without adding it to the page: a table cell."""
        target = self.save_image(fig_or_png_path, name)
        return ImageCell(target.resolve().relative_to(self.out_dir.resolve()).as_posix(), alt or target.stem)

    def save_image(self, fig_or_png_path, name: str | None = None) -> Path:
        """Write a ``Figure`` or copy a PNG into ``figures/`` under a unique name; returns the path."""
        from matplotlib.figure import Figure

        from .figures import save_figure

        self._figure_count += 1
        stem = _SAFE_NAME.sub("_", str(name)).strip("._") if name else ""
        if stem.lower().endswith(".png"):
            stem = stem[:-4]
        stem = stem or f"figure_{self._figure_count:02d}"
        unique, counter = stem, 1
        while unique in self._figure_names:
            counter += 1
            unique = f"{stem}_{counter}"
        check_writable_dir(self.figures_dir)

        if isinstance(fig_or_png_path, Figure):
            target = save_figure(fig_or_png_path, self.figures_dir / f"{unique}.png")
        elif isinstance(fig_or_png_path, (str, os.PathLike)):
            source = Path(fig_or_png_path)
            if not source.is_file():
                raise SegXAIInputError(f"add_figure: {source} is not a file")
            with open(source, "rb") as handle:
                if handle.read(8) != b"\x89PNG\r\n\x1a\n":
                    raise SegXAIInputError(f"add_figure: {source} is not a PNG image")
            if source.resolve().parent == self.figures_dir.resolve():
                target = source
                unique = source.stem
            else:
                target = self.figures_dir / f"{unique}.png"
                with atomic_path(target) as temporary:
                    shutil.copyfile(source, temporary)
        else:
            raise SegXAIInputError(
                f"add_figure: expected a matplotlib Figure or a PNG path, got {type(fig_or_png_path).__name__}"
            )
        self._figure_names.add(unique)
        return target
    def add_warning_banner(self, title: str, messages: Sequence[str]) -> None:
        """A visible banner (yellow, bordered) of ``title`` and one item per message (escaped)."""
        if not messages:
            return
        items = "".join(f"<li>{escape(message)}</li>" for message in messages)
        self._parts.append(f'<div class="warning-banner" role="alert"><strong>{escape(title)}</strong>'
                           f"<ul>{items}</ul></div>")

    def add_raw_html(self, fragment: str) -> None:
        """Insert trusted HTML as is (library-generated markup only, never user text)."""
        self._parts.append(str(fragment))

    # ---- output ---------------------------------------------------------------------------
    def to_html(self) -> str:
        """The whole page as a string."""
        meta = "Generated by SegXAI"
        if self.timestamp:
            meta += " on " + _datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
        body = "\n".join(self._parts)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f'<header><h1>{escape(self.title)}</h1><div class="meta">{escape(meta)}</div></header>\n'
            f"<main>\n{body}\n</main>\n"
            "<footer>SegXAI report. For research and quality assurance; not a diagnostic device.</footer>\n"
            "</body>\n</html>\n"
        )

    def write(self, filename: str = "report.html") -> Path:
        """Write the report to ``out_dir/filename`` atomically; returns its path."""
        name = str(filename)
        if not name or Path(name).name != name or name in (".", ".."):
            raise SegXAIInputError(f"write: filename must be a plain file name inside out_dir, got {filename!r}")
        path = self.out_dir / name
        check_writable_dir(self.out_dir)
        with atomic_path(path) as temporary:
            temporary.write_text(self.to_html(), encoding="utf-8")
        return path
