"""Attention analysis flow: interrelation statistics per shard, merged, reported, tracked."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
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
from vitsem.method.pipeline import AnalysisConfig, AnalysisResult
from vitsem.platform import jobs, tracking
from vitsem.platform.jobs import ShardReport
from vitsem.platform.settings import Settings
from vitsem.render.files import stats_document, write_pictures, write_rejected


class AnalysisParams(DataParams):
    weighting: str = Field(default="count", description="count, response or scale.")
    levels: int = Field(default=3, ge=2, le=8, description="Concentration levels K.")
    batch_size: int = Field(default=32, ge=1)
    examples: int = Field(default=4, ge=0, le=32, description="Images drawn as pictures.")

    def config(self) -> AnalysisConfig:
        return AnalysisConfig(weighting=self.weighting, num_levels=self.levels,
                              batch_size=self.batch_size, num_examples=self.examples,
                              workers=1)


@task(**RETRYING_TASK)
def analyze_shard(settings: Settings, dataset_id: int, shard: int, paths: list[str],
                  params: AnalysisParams) -> ShardReport:
    return jobs.analyze_shard(settings, dataset_id, shard, paths, params.model,
                              params.checkpoint, params.config())


@task(**RETRYING_TASK)
def merge_and_report(settings: Settings, reports: list[ShardReport], params: AnalysisParams,
                     example_paths: list[str]) -> tuple[AnalysisResult, list[Path]]:
    result = jobs.merge_analysis(settings, reports, params.model, params.checkpoint,
                                 params.config(), example_paths)
    out = Path(tempfile.mkdtemp(prefix="vitsem-analysis-"))
    doc = stats_document(result, {"flow": "attention_analysis", **params.model_dump()})
    (out / "stats.json").write_text(json.dumps(doc, indent=1))
    write_rejected(out / "rejected.jsonl", result.rejected)
    files = [out / "stats.json", out / "rejected.jsonl"]
    if result.num_images:
        files += write_pictures(result, out, None)
    store_report(settings, reports, files)
    return result, files


def store_report(settings: Settings, reports: list[ShardReport], files: list[Path]) -> None:
    """Reports go to the artifact store too, keyed by the shards they summarise."""
    ctx = jobs.context(settings)
    digest = hashlib.sha256("\n".join(sorted(r.artifact_key or "" for r in reports)).encode())
    for f in files:
        ctx.store.put(f"reports/attention_analysis/{digest.hexdigest()[:24]}/{f.name}",
                      f.read_bytes())


def run_analysis(settings: Settings, params: AnalysisParams) -> tuple[list[ShardReport],
                                                                      AnalysisResult, list[Path]]:
    dataset_id, files = register_inputs(settings, params)
    parts = shards(files, params.shard_size or settings.shard_size)
    futures = analyze_shard.map(unmapped(settings), unmapped(dataset_id),
                                list(range(len(parts))), parts, unmapped(params))
    reports = [f.result() for f in futures]
    result, paths = merge_and_report(settings, reports, params, files[: params.examples])
    return reports, result, paths


def profile_table(result: AnalysisResult) -> list[dict[str, Any]]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            for row in result.layer_profile()]


@flow(name="attention_analysis", task_runner=make_task_runner())
def attention_analysis(params: AnalysisParams) -> dict[str, Any]:
    """Weighted patch interrelation analysis of every layer and head over a data set."""
    settings = Settings()
    run_id = start_run(settings, "attention_analysis", params.model_dump())
    try:
        reports, result, files = run_analysis(settings, params)
        mlflow_run = tracking.log_analysis(settings, "attention_analysis", params.model_dump(),
                                           result, files)
    except BaseException:
        finish_run(settings, run_id, {}, status="failed")
        raise
    counts = totals(reports) | {"images": result.num_images, "mlflow_run_id": mlflow_run}
    table = profile_table(result)
    create_table_artifact(key="semantic-layer-profile", table=table,
                          description="Semantic lift and CLS focus per layer (1 = uniform)")
    url = tracking.run_url(settings, mlflow_run)
    if url:
        create_link_artifact(key="mlflow-run", link=url, link_text="MLflow run")
    lines = ["## Semantic layer profile", "", "| layer | lift | 95% CI | CLS focus |",
             "|---|---|---|---|"]
    lines += [f"| {int(r['layer'])} | {r['semantic_lift']:.3f} | {r['semantic_lift_ci_low']:.3f}"
              f"-{r['semantic_lift_ci_high']:.3f} | {r['cls_focus']:.3f} |" for r in table]
    tracking_uri = settings.public_dict()["mlflow_tracking_uri"]
    lines += ["", f"MLflow run: {url or mlflow_run} ({tracking_uri})"]
    rejected = [r for rep in reports for r in rep.rejected]
    create_markdown_artifact(key="attention-analysis-summary", markdown=summary_markdown(
        "Attention analysis", counts, rejected, "\n".join(lines)))
    finish_run(settings, run_id, counts, mlflow_run)
    return counts | {"layer_profile": table}
