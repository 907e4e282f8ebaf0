"""Spurious-correlation audit flow: keypoints per shard, the audit, the report in the artifact
store, findings in SQL, metrics and figures in MLflow."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact
from pydantic import Field

from flows.common import (
    RETRYING_TASK,
    DataParams,
    announce,
    artifact_key,
    content_of,
    device_slot,
    flow_options,
    lineage,
    on_this_machine,
    publish,
    register_inputs,
    rejected_files,
    task_namer,
    totals,
    tracked,
    with_registered_weights,
)
from flows.runners import PerRunTaskRunner, RunnerParams
from flows.sift_extraction import run_sift
from vitsem.audit.pipeline import AuditConfig, MapResult
from vitsem.data.inputs import InputImage
from vitsem.method.concentration import SemanticConfig, Weighting
from vitsem.method.models import resolve_device
from vitsem.platform import tracking
from vitsem.platform.lineage import Lineage
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
    maps: list[str] | None = Field(default=None, description=(
        "Attribution maps to audit with (default: every map but occlusion)."))
    family: str | None = Field(default=None, description=(
        "Model family: its recorded review decisions are carried, and a repaired model is "
        "registered as a new version of it (default: the model's name)."))
    repair_holdout: float = Field(default=0.0, ge=0, lt=1, description=(
        "Share of each group's labelled images held out (not audited) to repair the last "
        "layer from the findings; 0: no repair. The images must not have been trained on."))
    max_worst_group_drop: float = Field(
        default=0.05, ge=0, le=1, description="Worst-group accuracy fall since the previous "
        "audit of the model that emits a vitsem.audit.worst-group-dropped event.")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda:N.")

    def config(self) -> AuditConfig:
        """The audit settings; ``auto`` resolves where this runs (the task's worker). An
        unknown device raises :class:`ConfigError`."""
        cfg = AuditConfig(semantic=SemanticConfig(weighting=self.weighting),
                          top_fraction=self.top_fraction,
                          alpha=self.alpha, min_effect=self.min_effect,
                          batch_size=self.batch_size, device=resolve_device(self.device))
        return replace(cfg, maps=tuple(self.maps)) if self.maps else cfg


@task(task_run_name=task_namer("audit plan"), **RETRYING_TASK)
def plan_audit(settings: Settings, dataset_id: int, images: list[InputImage],
               params: AuditParams) -> audit.AuditJob:
    audited, heldout = audit.split_heldout(images, params.repair_holdout)
    return audit.plan_audit(settings, dataset_id, audited, params.model, params.checkpoint,
                            params.config(), {"data": params.data, "split": params.split},
                            heldout=heldout, family=params.family)


@task(task_run_name=task_namer("audit"), **RETRYING_TASK)
def audit_map(settings: Settings, job: audit.AuditJob, map_name: str, params: AuditParams
              ) -> MapResult:
    device = params.config().device  # auto: where this task runs
    with device_slot(device):
        return audit.run_map(settings, job, map_name, device)


@task(task_run_name=task_namer("audit report"), **RETRYING_TASK)
def finish_audit(settings: Settings, job: audit.AuditJob, maps: list[MapResult],
                 params: AuditParams) -> AuditReport:
    device = params.config().device
    with device_slot("cpu" if job.cached else device):  # a stored report is only read back
        return audit.finish_audit(settings, job, maps, device)


def run_audit(settings: Settings, dataset_id: int, images: list[InputImage],
              params: AuditParams) -> AuditReport:
    """The audit on the run's task runner (Dask workers when it is Dask): the plan (digest,
    stored report), one task per attribution map (none when the report is stored), then
    the report assembled from their results."""
    job = plan_audit.submit(settings, dataset_id, images, params).result()
    futures = [audit_map.submit(settings, job, m, params) for m in job.maps]
    maps = [f.result() for f in futures]
    return here(settings, finish_audit.submit(settings, job, maps, params).result())


def here(settings: Settings, report: AuditReport) -> AuditReport:
    """``report`` with its files on this machine (read back from the store when the audit
    ran on another)."""
    files = on_this_machine(settings, report.files, report.report_prefix)
    repaired = (on_this_machine(settings, [report.repaired], report.report_prefix)[0]
                if report.repaired is not None else None)
    return replace(report, files=files, repaired=repaired)


@task(**RETRYING_TASK)
def track_audit(settings: Settings, params: AuditParams, report: AuditReport,
                run_lineage: Lineage) -> str:
    run_id = tracking.log_audit(settings, params.model_dump(), report.summary, report.files,
                                lineage=run_lineage)
    tracking.log_audit_scores(settings, run_id, report.summary)
    return run_id


@task(**RETRYING_TASK)
def register_repair(settings: Settings, report: AuditReport, run_id: str) -> str | None:
    """The repaired checkpoint as a new version of the model family, if the audit repaired."""
    if report.repaired is None:
        return None
    o = report.summary["repairs"][audit.REPAIR_METHOD]
    return tracking.register_repair(settings, run_id, report.repaired, report.family,
                                    report.digest, {k: o[k] for k in (
                                        "accuracy", "worst_group_accuracy")})


@flow(task_runner=PerRunTaskRunner(), **flow_options("spurious_audit"))
def spurious_audit(params: AuditParams, runner: RunnerParams | None = None
                  ) -> dict[str, Any]:
    """Find the shortcuts a classifier relies on, confirm them by token removal, and
    measure what removing them at inference does to accuracy and worst-group accuracy."""
    settings = Settings()
    params.config().validate()  # a bad device or map fails the run before any work
    with tracked(settings, "spurious_audit", params) as run:
        params, registered = with_registered_weights(settings, params)
        dataset_id, inputs = register_inputs(settings, params)
        images = inputs.require_labels()
        reports = run_sift(settings, dataset_id, inputs.paths, params)
        report = run_audit(settings, dataset_id, images, params)
        run_lineage = lineage(settings, "audit", params, inputs, content_of(reports),
                              registered, cached=report.cached)
        run.mlflow_run_id = track_audit(settings, params, report, run_lineage)
        events = tracking.audit_changes(settings, run.mlflow_run_id, run_lineage,
                                        params.max_worst_group_drop)
        announce(run_lineage, events)
        repaired_version = register_repair(settings, report, run.mlflow_run_id)
        s = report.summary
        semantic = s["findings"].get("semantic", [])
        run.summary = totals(reports, inputs) | {
            "images": s["images"], "status": s["status"], "audit_digest": report.digest,
            "cached_audit": report.cached, "family": report.family,
            "shortcuts": sum(f["shortcut"] for f in semantic),
            "flagged": sum(bool(f.get("flag")) for f in semantic),
            "repaired_version": repaired_version,
            "mlflow_run_id": run.mlflow_run_id, "report_uri": report.report_uri,
            "events": [e.name for e in events]}
        url = tracking.run_url(settings, run.mlflow_run_id)
        if url:
            create_link_artifact(key=artifact_key("mlflow-audit-run", run_lineage.model_label),
                                 link=url, link_text="MLflow run")
        publish(artifact_key("spurious-audit-summary", run_lineage.model_label), summary_markdown(
            "Spurious-correlation audit", run.summary,
            rejected_files(reports, inputs),
            findings_markdown(s, report.report_uri, [f"MLflow run: {url or run.mlflow_run_id}"])))
    return run.summary | {"findings": s["findings"], "prompts": s["prompts"],
                          "notes": s["notes"], "repairs": s.get("repairs", {}),
                          "faithfulness": s.get("faithfulness", {}),
                          "reaudit": s.get("reaudit", {}),
                          "rejected_files": rejected_files(reports, inputs)}
