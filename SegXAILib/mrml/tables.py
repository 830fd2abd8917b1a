"""Lesion tables, QA results and Euler characteristic curves as table / plot nodes.

Rows are the library's JSON-ready dicts (:func:`SegXAILib.instances.lesion_table`, risk
results); nested values are flattened into columns: a 3-vector ``centroid_ras`` becomes
``centroid_R``, ``centroid_A``, ``centroid_S``; a nested dict ``channels -> FLAIR ->
peak_positive`` becomes ``FLAIR peak_positive``. Columns are typed: integers, floats (a
missing value is NaN) or text.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..image import SegXAIInputError

__all__ = ["flatten_row", "table_node_from_rows", "lesion_table_node", "qa_table_node", "table_node_columns",
           "ec_curve_chart", "table_row_of_model_row", "lesion_centroid_ras"]


def flatten_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One table row from a nested dict (see the module notes)."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            if key == "channels":
                for channel, values in value.items():
                    for name, item in flatten_row(values).items():
                        flat[f"{channel} {name}"] = item
            else:
                for name, item in flatten_row(value).items():
                    flat[f"{key} {name}"] = item
        elif isinstance(value, (list, tuple, np.ndarray)) and len(value) == 3 and key.endswith("_ras"):
            stem = key[: -len("_ras")]
            for axis, item in zip("RAS", value):
                flat[f"{stem}_{axis}"] = float(item)
        elif isinstance(value, (list, tuple, np.ndarray)):
            flat[key] = ", ".join(str(v) for v in value)
        else:
            flat[key] = value
    return flat


def _column_kind(values: Sequence[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        return "text"
    if present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present) and len(present) == len(values):
        return "int"
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in present):
        return "float"
    return "text"


def table_node_from_rows(rows: Sequence[Mapping[str, Any]], scene, name: str, node=None):
    """A table node (new, or ``node`` emptied) with one row per dict, columns in first-seen order."""
    import vtk

    flat = [flatten_row(row) for row in rows]
    columns: list[str] = []
    for row in flat:
        columns.extend(key for key in row if key not in columns)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    modified = node.StartModify()
    node.RemoveAllColumns()
    for column in columns:
        values = [row.get(column) for row in flat]
        kind = _column_kind(values)
        if kind == "int":
            array = vtk.vtkIntArray()
            for v in values:
                array.InsertNextValue(int(v))
        elif kind == "float":
            array = vtk.vtkDoubleArray()
            for v in values:
                array.InsertNextValue(math.nan if v is None else float(v))
        else:
            array = vtk.vtkStringArray()
            for v in values:
                array.InsertNextValue("" if v is None else str(v))
        array.SetName(column)
        table.AddColumn(array)
    node.Modified()
    node.EndModify(modified)
    return node


def table_node_columns(node) -> dict[str, list]:
    """The columns of a table node: name -> list of values (numbers or text)."""
    table = node.GetTable()
    columns = {}
    for index in range(table.GetNumberOfColumns()):
        array = table.GetColumn(index)
        if array.IsA("vtkStringArray"):
            values = [array.GetValue(i) for i in range(array.GetNumberOfValues())]
        elif array.IsA("vtkDataArray"):
            values = [array.GetTuple1(i) for i in range(array.GetNumberOfTuples())]
            if array.IsA("vtkIntArray") or array.IsA("vtkIdTypeArray"):
                values = [int(v) for v in values]
        else:
            values = [array.GetVariantValue(i).ToString() for i in range(array.GetNumberOfValues())]
        columns[array.GetName()] = values
    return columns


def table_row_of_model_row(node, model_row: int) -> int:
    """The table node's row that a ``qMRMLTableView`` shows at row ``model_row`` of its table
    model (``qMRMLTableModel::mrmlTableRowIndex``, not transposed): the same row, or one less
    when the model's first row holds the column titles (``UseColumnTitleAsColumnHeader`` off)."""
    return int(model_row) if node.GetUseColumnTitleAsColumnHeader() else int(model_row) - 1


def lesion_centroid_ras(node, row: int) -> Optional[list[float]]:
    """``[R, A, S]`` of a lesion table row (``centroid_R/A/S``); None for a row the table does
    not have or without centroid columns."""
    columns = table_node_columns(node)
    names = [f"centroid_{axis}" for axis in "RAS"]
    if not all(name in columns for name in names) or not 0 <= row < len(columns[names[0]]):
        return None
    return [float(columns[name][row]) for name in names]


def lesion_table_node(rows: Sequence[Mapping[str, Any]], scene, name: str = "SegXAI lesions",
                      risk_bands: Optional[Mapping[int, str]] = None, node=None):
    """The lesion table (rows of :func:`SegXAILib.instances.lesion_table` or the CLI's
    lesion rows) as a table node; ``risk_bands`` (instance id -> band) adds a ``risk_band``
    column. The widget jumps the slice views to ``centroid_R/A/S`` of a selected row."""
    if any("id" not in row for row in rows):
        raise SegXAIInputError("lesion table: every row needs an 'id'")
    rows = [dict(row) for row in rows]
    if risk_bands is not None:
        for row in rows:
            row["risk_band"] = risk_bands.get(row["id"]) if row["id"] is not None else None
    return table_node_from_rows(rows, scene, name, node=node)


def qa_table_node(results: Sequence[Mapping[str, Any]], scene, name: str = "SegXAI QA", node=None):
    """QA results, one row per structure (e.g. ``{"structure": "lesion", **RiskModel.score(...),
    "method": ..., "risk_model": ...}``), as a table node."""
    return table_node_from_rows(results, scene, name, node=node)


def ec_curve_chart(scene, thresholds: np.ndarray, curves: Mapping[str, np.ndarray], name: str = "SegXAI EC curves",
                   reference: Optional[np.ndarray] = None, reference_name: str = "calibration mean"):
    """Euler characteristic curves as a plot chart: a table node (``threshold`` and one
    column per curve), one line plot series per curve, and the chart referencing them.

    Parameters
    ----------
    thresholds : ndarray, shape (T,)
    curves : mapping name -> ndarray, shape (T,)
        e.g. ``{"lesion": saliency_curve(...)}``.
    reference : ndarray, shape (T,), optional
        A reference curve, e.g. the risk model's ``pca_mean`` (drawn dashed).

    Returns
    -------
    (vtkMRMLPlotChartNode, vtkMRMLTableNode)
    """
    import slicer
    import vtk

    thresholds = np.asarray(thresholds, dtype=float).ravel()
    series = dict(curves)
    if reference is not None:
        series[reference_name] = reference
    for key, values in series.items():
        if np.asarray(values).shape != thresholds.shape:
            raise SegXAIInputError(f"EC curve {key!r}: shape {np.asarray(values).shape}, expected {thresholds.shape}")
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
    table = table_node.GetTable()
    for column, values in [("threshold", thresholds), *series.items()]:
        array = vtk.vtkDoubleArray()
        array.SetName(column)
        for v in np.asarray(values, dtype=float):
            array.InsertNextValue(float(v))
        table.AddColumn(array)
    table_node.Modified()
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle("Euler characteristic of the saliency superlevel sets")
    chart.SetXAxisTitle("normalised saliency threshold")
    chart.SetYAxisTitle("Euler characteristic")
    for index, key in enumerate(series):
        plot = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", key)
        plot.SetAndObserveTableNodeID(table_node.GetID())
        plot.SetXColumnName("threshold")
        plot.SetYColumnName(key)
        plot.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        plot.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        if reference is not None and key == reference_name:
            plot.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
            plot.SetColor(0.5, 0.5, 0.5)
        else:
            from .nodes import instance_color

            plot.SetColor(*instance_color(index + 1))
        chart.AddAndObservePlotSeriesNodeID(plot.GetID())
    return chart, table_node
