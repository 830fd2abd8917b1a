"""``write_case_report``: the HTML report of any case (a :class:`~SegXAILib.pipeline.Case`, e.g.
read back from its folder with :func:`~SegXAILib.pipeline.read_case`).

What the case has is shown, nothing is invented: the summary (model, structure, volumes per
class, device, notes), the class-level maps through the largest instance (or the structure's
centre), the lesion table with each lesion's instance saliency and uncertainty columns, the QA
(band, estimated Dice, EC curve), the review list of given contours, where the model is unsure,
the Agg2Exp matrix and each explained lesion's counterfactual relevance (G+(x), G-(x), R and the
scores). The sections
are those of the demo's report (:mod:`SegXAILib.report.sections`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import numpy as np

from ..image import SegXAIInputError
from ..models.expectations import INPUT_WARNING_TITLE
from ..progress import CancelToken
from .html import HtmlReport
from .sections import (OVERLAY_THRESHOLD, add_agg2exp_section, add_class_maps_section, add_contour_qa_section,
                       add_counterfactual_section, add_lesion_section, add_qa_section, add_timings,
                       add_uncertainty_section, lesion_report_rows, prediction_outlines, structure_uncertainty,
                       view_point)

if TYPE_CHECKING:
    from ..pipeline import Case

__all__ = ["write_case_report", "case_summary", "INPUT_WARNING_TITLE"]


def case_summary(case: "Case") -> dict[str, Any]:
    """The report's summary key-values: model, structure, volume per class, instances, QA band,
    the structure's uncertainty, device and the notes of the run."""
    image, card = case.image, case.card
    labels = case.segmentation.labels.array[0]
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(card.classes))
    structure = structure_uncertainty(case)
    summary: dict[str, Any] = {
        "model": f"{card.name} {card.version}",
        "structure": case.structure,
        **{f"{name} volume (mm^3)": float(counts[index] * image.voxel_volume)
           for index, name in enumerate(card.class_names) if index > 0},
        "instances of the structure": len(case.instances),
    }
    if case.contour_qa is not None and case.contour_qa.rows:
        first = case.contour_qa.rows[0]
        summary["most suspicious given contour"] = f"{first['structure']} (suspicion {first['suspicion']:.2f})"
    if case.qa is not None:
        summary["QA risk band"] = case.qa.summary_text()
    if structure is not None:
        summary[f"{case.structure} uncertainty ({case.uncertainty.samples} samples)"] = (
            f"mean entropy {structure.mean_entropy:.3f} nats, pairwise Dice "
            + (f"{structure.pairwise_dice:.3f}" if structure.pairwise_dice is not None else "n/a"))
    summary["device"] = case.device
    summary["notes"] = "; ".join(case.notes) if case.notes else "none"
    return summary


def write_case_report(case: "Case", out_dir: Union[str, Path], title: Optional[str] = None,
                      extra_summary: Optional[Mapping[str, Any]] = None,
                      cancel: Optional[CancelToken] = None) -> Path:
    """Write ``report.html`` (and ``figures/``) of ``case`` into ``out_dir``; returns its path.

    Parameters
    ----------
    case : Case
        Images on the input grid ``(C, I, J, K)``; maps, instances, counterfactuals, QA,
        uncertainty and Agg2Exp are shown when present.
    out_dir : path-like
        Usually the case's own folder (the report's figures go to ``out_dir/figures``).
    title : str, optional
        Default: ``SegXAI case report: <structure> (<model>)``.
    extra_summary : mapping, optional
        More summary rows (a batch adds the case id, the Dice against its reference).
    cancel : CancelToken, optional
    """
    from ..pipeline import Case

    if not isinstance(case, Case):
        raise SegXAIInputError(f"case: expected a Case (read_case), got {type(case).__name__}")
    card = case.card
    html = HtmlReport(title or f"SegXAI case report: {case.structure} ({card.name})", Path(out_dir))
    html.add_paragraph(
        f"The case segmented by {card.name} and explained for the {case.structure} class: class-level maps, "
        "instance saliency of each instance and the lesion table, counterfactual relevance, the QA risk band, where "
        "the model is unsure and the Agg2Exp matrix, as far as the run computed them. Red outline: the model's "
        f"{case.structure}. Overlays are transparent below {OVERLAY_THRESHOLD:.0%} of the map's maximum."
    )
    # before everything else: the results below may be meaningless for an input the model was not made for
    html.add_warning_banner(INPUT_WARNING_TITLE, case.warnings)
    html.add_key_values({**case_summary(case), **dict(extra_summary or {})}, caption="Summary")

    outlines = prediction_outlines(case)
    point, where = view_point(case)
    if case.maps:
        add_class_maps_section(html, case, point, outlines, where, cancel)
    if case.instance_labels is not None and case.instance_maps:
        add_lesion_section(html, case, lesion_report_rows(case), outlines, cancel)
    elif case.lesions:
        # instances without instance maps: the table alone
        html.add_heading("Lesions")
        html.add_table([{k: row.get(k) for k in ("id", "group", "voxels", "volume_mm3", "mean_probability")}
                        for row in case.lesions], caption="Lesion table")
    if case.counterfactuals:
        add_counterfactual_section(html, case, outlines, cancel)
    if case.qa is not None:
        qa = case.qa
        if qa.risk is not None:
            if qa.saliency is None:  # a feature risk model
                how = (f"the case's {qa.method.partition(':')[2]} (a reference-free score, QA_PROTOCOL.md), mapped "
                       "through the risk model's calibration cohort")
            else:
                how = (f"paper 000's score: the Euler characteristic curve of the {qa.method} map inside the predicted "
                       f"{case.structure}, projected on the first principal component of the risk model's "
                       "calibration cohort")
            paragraph = f"Risk without a reference, from {how}: {qa.summary_text()}."
        else:
            paragraph = (f"The Euler characteristic curve of the {qa.method} map inside the predicted "
                         f"{case.structure}; without a risk model there is no band (calibrate one on a cohort with "
                         "references: segxai qa calibrate, or the batch report's calibration).")
        add_qa_section(html, case, paragraph)
    if case.contour_qa is not None:
        add_contour_qa_section(html, case)
    if case.uncertainty is not None:
        add_uncertainty_section(html, case, structure_uncertainty(case), point, outlines, where)
    if case.agg2exp is not None:
        add_agg2exp_section(html, case)
    add_timings(html, case.timings, case.device)
    return html.write("report.html")
