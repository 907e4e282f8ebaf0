"""The scheduled model audit: SIFT extraction, attention analysis and, on labelled data, the
spurious-correlation audit of a model on a data set — each image decoded and run through SIFT
once, by the extraction; the later steps read the stored views and keypoints."""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from flows.attention_analysis import AnalysisParams, attention_analysis
from flows.common import DataParams, flow_options, make_task_runner, publish, tracked
from flows.sift_extraction import sift_extraction
from flows.spurious_audit import AuditParams, spurious_audit
from vitsem.data.inputs import resolve_inputs
from vitsem.platform.settings import Settings
from vitsem.render.markdown import model_audit_markdown


class ModelAuditParams(AnalysisParams):
    """The model, the data and the semantic settings, chosen once for every step."""

    top_fraction: float = Field(default=0.1, gt=0, le=1,
                                description="Audit: share of patches counted as most attended.")
    alpha: float = Field(default=0.01, gt=0, lt=1, description="Audit: causal significance.")
    min_effect: float = Field(default=0.05, ge=0, le=1,
                              description="Audit: probability drop beyond random that confirms.")

    def step(self, kind: type[BaseModel]) -> Any:
        """The parameters of one step, as ``kind``."""
        return kind(**self.model_dump(include=set(kind.model_fields)))


@flow(task_runner=make_task_runner(), **flow_options("model_audit"))
def model_audit(params: ModelAuditParams) -> dict[str, Any]:
    """Audit a model on a data set: keypoints, the interrelation analysis and, when the data
    carry labels (a benchmark folder or one sub-folder per class), the shortcut audit."""
    settings = Settings()
    with tracked(settings, "model_audit", params) as run:
        sift = sift_extraction(params.step(DataParams))
        analysis = attention_analysis(params.step(AnalysisParams))
        labelled = resolve_inputs(params.data, params.split).labelled
        audit = spurious_audit(params.step(AuditParams)) if labelled else None
        run.mlflow_run_id = analysis["mlflow_run_id"]
        run.summary = {"images": analysis["images"], "rejected": sift["rejected"],
                       "shortcuts": audit["shortcuts"] if audit else None,
                       "audit_digest": audit["audit_digest"] if audit else None}
        publish("model-audit-summary", model_audit_markdown(params.model_dump(), sift,
                                                            analysis, audit))
    return {"sift_extraction": sift, "attention_analysis": analysis, "spurious_audit": audit}
