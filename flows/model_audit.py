"""The scheduled model audit: SIFT extraction and attention analysis of a model on a data set
(the spurious-correlation audit joins here when it lands)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.attention_analysis import AnalysisParams, attention_analysis
from flows.common import make_task_runner
from flows.sift_extraction import sift_extraction


@flow(name="model_audit", task_runner=make_task_runner())
def model_audit(params: AnalysisParams) -> dict[str, Any]:
    """Audit a model on a data set: keypoints, then the interrelation analysis."""
    sift = sift_extraction(params)
    analysis = attention_analysis(params)
    lift = [round(r["semantic_lift"], 3) for r in analysis["layer_profile"]]
    create_markdown_artifact(key="model-audit-summary", markdown="\n".join([
        "# Model audit",
        f"- model: `{params.checkpoint or params.model}`",
        f"- data: `{params.data}` (split {params.split})",
        f"- SIFT: {sift['computed']} computed, {sift['cached']} from the store, "
        f"{sift['rejected']} rejected",
        f"- analysis: {analysis['images']} images, MLflow run `{analysis['mlflow_run_id']}`",
        f"- semantic lift by layer: {lift}",
    ]))
    return {"sift_extraction": sift, "attention_analysis": analysis}
