"""Spurious-correlation audit flow: keypoints with descriptors per shard, the audit, the
report in the artifact store, findings in SQL, metrics and figures in MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from pydantic import Field

from flows.common import (
    RETRYING_TASK,
    DataParams,
    finish_run,
    make_task_runner,
    register_inputs,
    shards,
    start_run,
    summary_markdown,
    totals,
)
from vitsem.audit.benchmark import AUDIT_SIFT
from vitsem.audit.pipeline import AuditConfig
from vitsem.data.inputs import LabelledImage, labelled_images
from vitsem.platform import jobs, tracking
from vitsem.platform.jobs import AuditReport, ShardReport
from vitsem.platform.settings import Settings


class AuditParams(DataParams):
    top_fraction: float = Field(default=0.1, gt=0, le=1,
                                description="Share of patches counted as most attended.")
    alpha: float = Field(default=0.01, gt=0, lt=1, description="Causal test significance.")
    min_effect: float = Field(default=0.05, ge=0, le=1,
                              description="Probability drop beyond random that confirms.")
    batch_size: int = Field(default=64, ge=1)

    def config(self) -> AuditConfig:
        return AuditConfig(top_fraction=self.top_fraction, alpha=self.alpha,
                           min_effect=self.min_effect, batch_size=self.batch_size)


@task(**RETRYING_TASK)
def keypoint_shard(settings: Settings, dataset_id: int, shard: int, paths: list[str],
                   params: AuditParams) -> ShardReport:
    return jobs.sift_shard(settings, dataset_id, shard, paths, params.model, params.checkpoint,
                           AUDIT_SIFT)


@task(**RETRYING_TASK)
def labelled(params: AuditParams) -> list[LabelledImage]:
    return labelled_images(params.data, params.split)


@task(**RETRYING_TASK)
def run_audit(settings: Settings, dataset_id: int, images: list[LabelledImage],
              params: AuditParams) -> AuditReport:
    return jobs.audit_images(settings, dataset_id, images, params.model, params.checkpoint,
                             params.config(), {"data": params.data, "split": params.split})


def findings_markdown(report: AuditReport, mlflow_line: str) -> str:
    s = report.summary
    lines = ["## Candidate shortcuts (semantic map)", ""]
    found = s["findings"].get("semantic", [])
    if found:
        lines += ["| rank | class | recurrence | other classes | removal effect | random "
                  "| p | verdict |", "|---|---|---|---|---|---|---|---|"]
        for f in found:
            verdict = "**shortcut**" if f["shortcut"] else (
                "on the object" if f["confirmed"] else "not confirmed")
            lines.append(f"| {f['rank']} | {f['class_name']} | {f['recurrence']:.2f} | "
                         f"{f['other_rate']:.2f} | {f['effect']:.3f} | "
                         f"{f['random_effect']:.3f} | {f['p_value']:.2g} | {verdict} |")
    else:
        lines.append("No candidate found.")
    lines += ["", "## Prompting", "", "| prompt | accuracy | worst group | worst-group accuracy "
              "|", "|---|---|---|---|"]
    lines += [f"| {k} | {v['accuracy']:.3f} | {v['worst_group']} | "
              f"{v['worst_group_accuracy']:.3f} |" for k, v in s["prompts"].items()]
    lines += [""] + [f"- {n}" for n in s["notes"]]
    lines += [f"- report: `{report.report_uri}`", f"- {mlflow_line}"]
    return "\n".join(lines)


@flow(name="spurious_audit", task_runner=make_task_runner())
def spurious_audit(params: AuditParams) -> dict[str, Any]:
    """Find the shortcuts a classifier relies on, confirm them by token removal, and
    measure what removing them at inference does to accuracy and worst-group accuracy."""
    settings = Settings()
    run_id = start_run(settings, "spurious_audit", params.model_dump())
    try:
        dataset_id, files = register_inputs(settings, params)
        images = labelled(params)
        parts = shards(files, params.shard_size or settings.shard_size)
        futures = keypoint_shard.map(unmapped(settings), unmapped(dataset_id),
                                     list(range(len(parts))), parts, unmapped(params))
        reports = [f.result() for f in futures]
        report = run_audit(settings, dataset_id, images, params)
        mlflow_run = tracking.log_audit(settings, params.model_dump(), report.summary,
                                        report.files)
    except BaseException:
        finish_run(settings, run_id, {}, status="failed")
        raise
    s = report.summary
    shortcuts = [f for f in s["findings"].get("semantic", []) if f["shortcut"]]
    counts = totals(reports) | {
        "images": s["images"], "status": s["status"], "audit_digest": report.digest,
        "cached_audit": report.cached, "shortcuts": len(shortcuts),
        "mlflow_run_id": mlflow_run, "report_uri": report.report_uri}
    url = tracking.run_url(settings, mlflow_run)
    if url:
        create_link_artifact(key="mlflow-audit-run", link=url, link_text="MLflow run")
    mlflow_line = f"MLflow run: {url or mlflow_run}"
    create_markdown_artifact(key="spurious-audit-summary", markdown=summary_markdown(
        "Spurious-correlation audit", counts, report.rejected,
        findings_markdown(report, mlflow_line)))
    finish_run(settings, run_id, counts, mlflow_run)
    return counts | {"findings": s["findings"], "prompts": s["prompts"], "notes": s["notes"]}
