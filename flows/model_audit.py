"""The scheduled model audit: SIFT extraction, attention analysis and, on labelled data, the
spurious-correlation audit of a model on a data set."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.attention_analysis import AnalysisParams, attention_analysis
from flows.common import make_task_runner
from flows.sift_extraction import sift_extraction
from flows.spurious_audit import AuditParams, spurious_audit
from vitsem.data.inputs import labelled_images
from vitsem.errors import AuditInputError


def _labelled(params: AnalysisParams) -> bool:
    try:
        labelled_images(params.data, params.split)
    except AuditInputError:
        return False
    return True


@flow(name="model_audit", task_runner=make_task_runner())
def model_audit(params: AnalysisParams) -> dict[str, Any]:
    """Audit a model on a data set: keypoints, the interrelation analysis and, when the data
    carry labels (a benchmark folder or one sub-folder per class), the shortcut audit."""
    sift = sift_extraction(params)
    analysis = attention_analysis(params)
    lift = [round(r["semantic_lift"], 3) for r in analysis["layer_profile"]]
    audit: dict[str, Any] | None = None
    if _labelled(params):
        audit = spurious_audit(AuditParams(**params.model_dump(
            include=set(AuditParams.model_fields))))
        audit_line = (f"- shortcut audit: {audit['shortcuts']} confirmed shortcut(s), status "
                      f"{audit['status']}; report `{audit['report_uri']}`")
    else:
        audit_line = ("- shortcut audit: skipped, the data carry no labels (use a benchmark "
                      "folder or one sub-folder per class)")
    create_markdown_artifact(key="model-audit-summary", markdown="\n".join([
        "# Model audit",
        f"- model: `{params.checkpoint or params.model}`",
        f"- data: `{params.data}` (split {params.split})",
        f"- SIFT: {sift['computed']} computed, {sift['cached']} from the store, "
        f"{sift['rejected']} rejected",
        f"- analysis: {analysis['images']} images, MLflow run `{analysis['mlflow_run_id']}`",
        f"- semantic lift by layer: {lift}",
        audit_line,
    ]))
    return {"sift_extraction": sift, "attention_analysis": analysis, "spurious_audit": audit}
