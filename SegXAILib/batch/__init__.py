"""Cohort runs on Dask: one case-engine task per case, on this machine or a cluster, resumable.

``read_cases(CASES.csv, card.input_channels)`` -> ``run_batch(cases, settings, out_dir, client)``
(:mod:`.run`), with the client from :func:`connect` (:mod:`.cluster`: a LocalCluster on
127.0.0.1, an existing scheduler, SLURM / PBS / SGE through dask-jobqueue, one worker per GPU).
``client=None`` runs the cases in this process. The command is ``segxai batch``;
:func:`cohort_report` (:mod:`.report`, ``segxai batch-report``) writes each case's report and the
cohort's analyses; :func:`evaluate_batch` (:mod:`.evaluate`, ``segxai batch-evaluate``) the
evaluation tables of attribution methods over the finished cases. Dask (the ``batch`` extra) is
imported only when a cluster is used.
"""

from .cases import BatchCase, read_cases
from .cluster import CLUSTER_KINDS, JobOptions, connect, job_script, jobqueue_kwargs, local_cluster, visible_gpus
from .evaluate import BatchEvaluation, check_batch_evaluation, evaluate_batch, evaluate_case_task
from .report import COHORT_COLUMNS, cohort_report
from .run import (BATCH_FORMAT, BatchResult, ModelPlugin, case_state, check_batch, dashboard_link, run_batch,
                  run_case_task)

__all__ = ["BatchCase", "read_cases", "run_batch", "BatchResult", "ModelPlugin", "run_case_task", "case_state",
           "check_batch", "dashboard_link", "BATCH_FORMAT", "CLUSTER_KINDS", "JobOptions", "connect", "job_script",
           "jobqueue_kwargs", "local_cluster", "visible_gpus", "cohort_report", "COHORT_COLUMNS",
           "evaluate_batch", "evaluate_case_task", "check_batch_evaluation", "BatchEvaluation"]
