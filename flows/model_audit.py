"""The scheduled model audit: SIFT extraction and attention analysis of a model on a data set
(the spurious-correlation audit joins here when it lands)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.attention_analysis import AnalysisParams, attention_analysis
from flows.common import make_task_runner
from flows.sift_extraction import sift_extraction


@flow(name="model_audit", task_runner=make_task_runner())
def model_audit(params: AnalysisParams) -> dict[str, Any]:
    """Audit a model on a data set: keypoints, then the interrelation analysis."""
    sift = sift_extraction(params)
    analysis = attention_analysis(params)
    return {"sift_extraction": sift, "attention_analysis": analysis}
