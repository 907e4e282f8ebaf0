"""Spurious-correlation audit flow: keypoints per shard, the audit, the report in the artifact
store, findings in SQL, metrics and figures in MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact
from pydantic import Field

from flows.common import (
    RETRYING_TASK,
    DataParams,
    flow_options,
    make_task_runner,
    publish,
    register_inputs,
    rejected_files,
    task_namer,
    totals,
    tracked,
)
from flows.sift_extraction import run_sift
from vitsem.audit.pipeline import AuditConfig
from vitsem.data.inputs import InputImage
from vitsem.method.concentration import SemanticConfig, Weighting
from vitsem.platform import tracking
from vitsem.platform.services import audit
from vitsem.platform.services.audit import AuditReport
from vitsem.platform.settings import Settings
from vitsem.render.markdown import findings_markdown, summary_markdown


class AuditParams(DataParams):
    weighting: Weighting = Field(default="count", description="Keypoint concentration.")
    top_fraction: float = Field(default=0.1, gt=0, le=1,
                                description="Share of patches counted as most attended.")
    alpha: float = Field(default=0.01, gt=0, lt=1, description="Causal test significance.")
    min_effect: float = Field(default=0.05, ge=0, le=1,
                              description="Probability drop beyond random that confirms.")
    batch_size: int = Field(default=64, ge=1)

    def config(self) -> AuditConfig:
        return AuditConfig(semantic=SemanticConfig(weighting=self.weighting),
                           top_fraction=self.top_fraction,
                           alpha=self.alpha, min_effect=self.min_effect,
                           batch_size=self.batch_size)


@task(task_run_name=task_namer("audit"), **RETRYING_TASK)
def run_audit(settings: Settings, dataset_id: int, images: list[InputImage],
              params: AuditParams) -> AuditReport:
    return audit.audit_images(settings, dataset_id, images, params.model, params.checkpoint,
                              params.config(), {"data": params.data, "split": params.split})


@task(**RETRYING_TASK)
def track_audit(settings: Settings, params: AuditParams, report: AuditReport) -> str:
    return tracking.log_audit(settings, params.model_dump(), report.summary, report.files)


@flow(task_runner=make_task_runner(), **flow_options("spurious_audit"))
def spurious_audit(params: AuditParams) -> dict[str, Any]:
    """Find the shortcuts a classifier relies on, confirm them by token removal, and
    measure what removing them at inference does to accuracy and worst-group accuracy."""
    settings = Settings()
    with tracked(settings, "spurious_audit", params) as run:
        dataset_id, inputs = register_inputs(settings, params)
        images = inputs.require_labels()
        reports = run_sift(settings, dataset_id, inputs.paths, params)
        report = run_audit(settings, dataset_id, images, params)
        run.mlflow_run_id = track_audit(settings, params, report)
        s = report.summary
        run.summary = totals(reports, inputs) | {
            "images": s["images"], "status": s["status"], "audit_digest": report.digest,
            "cached_audit": report.cached,
            "shortcuts": sum(f["shortcut"] for f in s["findings"].get("semantic", [])),
            "mlflow_run_id": run.mlflow_run_id, "report_uri": report.report_uri}
        url = tracking.run_url(settings, run.mlflow_run_id)
        if url:
            create_link_artifact(key="mlflow-audit-run", link=url, link_text="MLflow run")
        publish("spurious-audit-summary", summary_markdown(
            "Spurious-correlation audit", run.summary,
            rejected_files(reports, inputs),
            findings_markdown(s, report.report_uri, [f"MLflow run: {url or run.mlflow_run_id}"])))
    return run.summary | {"findings": s["findings"], "prompts": s["prompts"],
                          "notes": s["notes"],
                          "rejected_files": rejected_files(reports, inputs)}
