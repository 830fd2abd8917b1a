"""The case engine: one pipeline behind every front end (ARCHITECTURE.md).

``CaseSettings -> run_case -> Case -> write_case`` (``case.json`` manifest), and back with
``read_case``. The CLI, the engine process (``segxai run``), the demo, the Slicer Logic and
cohort building all call it; none re-implements a step. The steps stay callable one by one (:mod:`.steps`).
"""

from .case import Case, ContourQA, QAResult
from .read import read_case
from .run import (add_agg2exp, add_contour_qa, add_counterfactual, add_instance_maps, add_maps, add_qa,
                  add_uncertainty, run_case, start_case)
from .settings import (
    Agg2ExpSettings,
    CaseSettings,
    CounterfactualSettings,
    InstanceSettings,
    MethodSettings,
    PrecisionSettings,
    QASettings,
)
from .job import EngineJob, JobStatus
from .steps import (
    agg2exp_case,
    ModelCache,
    agg2exp_matrix,
    check_case_input,
    check_channels,
    explain_instances,
    explain_map,
    find_case_instances,
    lesion_rows,
    load_case_model,
    predict,
    read_case_images,
    resolve_model_card,
    resolve_risk_model,
    score_contours,
    score_qa,
    select_instances,
    structure_index,
)
from .write import MANIFEST, add_to_manifest, lesion_csv, read_manifest, write_case, write_json, write_segmentation

__all__ = [
    "Case",
    "QAResult",
    "ContourQA",
    "CaseSettings",
    "MethodSettings",
    "InstanceSettings",
    "QASettings",
    "Agg2ExpSettings",
    "PrecisionSettings",
    "CounterfactualSettings",
    "run_case",
    "start_case",
    "add_maps",
    "add_instance_maps",
    "add_qa",
    "add_contour_qa",
    "add_agg2exp",
    "add_uncertainty",
    "add_counterfactual",
    "write_case",
    "read_case",
    "EngineJob",
    "JobStatus",
    "write_segmentation",
    "write_json",
    "read_manifest",
    "add_to_manifest",
    "lesion_csv",
    "MANIFEST",
    "resolve_model_card",
    "load_case_model",
    "ModelCache",
    "check_case_input",
    "check_channels",
    "read_case_images",
    "predict",
    "explain_map",
    "find_case_instances",
    "select_instances",
    "structure_index",
    "explain_instances",
    "lesion_rows",
    "resolve_risk_model",
    "score_qa",
    "score_contours",
    "agg2exp_case",
    "agg2exp_matrix",
]

