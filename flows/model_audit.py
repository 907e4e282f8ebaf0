"""The scheduled model audit: SIFT extraction, attention analysis and, on labelled data, the
spurious-correlation audit of a model on a data set — each image decoded and run through SIFT
once, by the extraction; the later steps read the stored views and keypoints."""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from flows.attention_analysis import AnalysisParams, attention_analysis
from flows.common import (
    DataParams,
    ParentRun,
    artifact_key,
    flow_options,
    lineage,
    parent_run,
    publish,
    tracked,
    with_registered_weights,
)
from flows.runners import PerRunTaskRunner, RunnerParams, shared_cluster
from flows.sift_extraction import sift_extraction
from flows.spurious_audit import AuditParams, spurious_audit
from vitsem.data.inputs import resolve_inputs
from vitsem.platform import tracking
from vitsem.platform.settings import Settings
from vitsem.render.markdown import model_audit_markdown


class ModelAuditParams(AnalysisParams):
    """The model, the data and the semantic settings, chosen once for every step."""

    top_fraction: float = Field(default=0.1, gt=0, le=1,
                                description="Audit: share of patches counted as most attended.")
    alpha: float = Field(default=0.01, gt=0, lt=1, description="Audit: causal significance.")
    min_effect: float = Field(default=0.05, ge=0, le=1,
                              description="Audit: probability drop beyond random that confirms.")
    family: str | None = Field(default=None, description=(
        "Audit: model family whose recorded review decisions carry, so only new or regressed "
        "patterns are flagged (default: the model's name)."))

    def step(self, kind: type[BaseModel]) -> Any:
        """The parameters of one step, as ``kind``."""
        return kind(**self.model_dump(include=set(kind.model_fields)))


@flow(task_runner=PerRunTaskRunner(), **flow_options("model_audit"))
def model_audit(params: ModelAuditParams, runner: RunnerParams | None = None
               ) -> dict[str, Any]:
    """Audit a model on a data set: keypoints, the interrelation analysis and, when the data
    carry labels (a benchmark folder or one sub-folder per class), the shortcut audit."""
    settings = Settings()
    with tracked(settings, "model_audit", params) as run, shared_cluster(runner) as steps:
        params, registered = with_registered_weights(settings, params)
        sift = sift_extraction(params.step(DataParams), steps)
        inputs = resolve_inputs(params.data, params.split)
        run_lineage = lineage(settings, "model audit", params, inputs,
                              (sift["dataset_digest"], sift["images"]), registered)
        parent = ParentRun(tracking.start_parent_run(settings, "model_audit", run_lineage,
                                                     params.model_dump()), registered)
        run.mlflow_run_id = parent.run_id
        try:
            with parent_run(parent):
                analysis = attention_analysis(params.step(AnalysisParams), steps)
                audit = (spurious_audit(params.step(AuditParams), steps) if inputs.labelled
                         else None)
        except BaseException:
            tracking.finish_parent_run(settings, parent.run_id, [], status="FAILED")
            raise
        tracking.finish_parent_run(settings, parent.run_id, [
            analysis["mlflow_run_id"], *([audit["mlflow_run_id"]] if audit else [])])
        run.summary = {"images": analysis["images"], "rejected": sift["rejected"],
                       "shortcuts": audit["shortcuts"] if audit else None,
                       "flagged": audit["flagged"] if audit else None,
                       "audit_digest": audit["audit_digest"] if audit else None,
                       "mlflow_run_id": parent.run_id}
        publish(artifact_key("model-audit-summary", run_lineage.model_label),
                model_audit_markdown(params.model_dump(), sift, analysis, audit))
    return {"sift_extraction": sift, "attention_analysis": analysis, "spurious_audit": audit}
