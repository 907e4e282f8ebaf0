"""Attention analysis flow: interrelation statistics per shard, merged, reported, tracked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_link_artifact, create_table_artifact
from pydantic import Field

from flows.common import (
    RETRYING_TASK,
    DataParams,
    artifact_key,
    content_of,
    device_slot,
    flow_options,
    input_report,
    lineage,
    on_this_machine,
    publish,
    register_inputs,
    rejected_files,
    shards,
    task_namer,
    totals,
    tracked,
    with_registered_weights,
)
from flows.runners import PerRunTaskRunner, RunnerParams
from vitsem.data.inputs import InputSet
from vitsem.method.concentration import SemanticConfig, Weighting
from vitsem.method.models import resolve_device
from vitsem.method.pipeline import AnalysisConfig, AnalysisResult
from vitsem.platform import tracking
from vitsem.platform.lineage import Lineage
from vitsem.platform.services import analysis
from vitsem.platform.services.context import ShardReport
from vitsem.platform.settings import Settings
from vitsem.render.markdown import profile_markdown, summary_markdown


class AnalysisParams(DataParams):
    weighting: Weighting = Field(default="count", description="Keypoint concentration.")
    levels: int = Field(default=3, ge=2, le=8, description="Concentration levels K.")
    batch_size: int = Field(default=32, ge=1)
    examples: int = Field(default=4, ge=0, le=32, description="Images drawn as pictures.")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda:N.")

    def semantic(self) -> SemanticConfig:
        return SemanticConfig(weighting=self.weighting, levels=self.levels)

    def config(self) -> AnalysisConfig:
        return AnalysisConfig(semantic=self.semantic(), batch_size=self.batch_size,
                              num_examples=self.examples, workers=1,
                              device=resolve_device(self.device))


@task(task_run_name=task_namer("analysis"), **RETRYING_TASK)
def analyze_shard(settings: Settings, dataset_id: int, shard: int, paths: list[str],
                  params: AnalysisParams) -> ShardReport:
    config = params.config()
    with device_slot(config.device):
        return analysis.analyze_shard(settings, dataset_id, shard, paths, params.model,
                                      params.checkpoint, config)


@task(task_run_name=task_namer("analysis merge"), **RETRYING_TASK)
def merge_and_report(settings: Settings, dataset_id: int, reports: list[ShardReport],
                     params: AnalysisParams, example_paths: list[str]
                     ) -> tuple[AnalysisResult, list[Path]]:
    result = analysis.merge_analysis(settings, dataset_id, reports, params.model,
                                     params.checkpoint, params.config(), example_paths)
    files = analysis.store_analysis_report(settings, reports, result, {
        "flow": "attention_analysis", **params.model_dump()})
    return result, files


@task(**RETRYING_TASK)
def track_analysis(settings: Settings, params: AnalysisParams, result: AnalysisResult,
                   files: list[Path], run_lineage: Lineage) -> str:
    return tracking.log_analysis(settings, "attention_analysis", params.model_dump(), result,
                                 files, lineage=run_lineage)


def run_analysis(settings: Settings, dataset_id: int, inputs: InputSet, params: AnalysisParams
                 ) -> tuple[list[ShardReport], AnalysisResult, list[Path]]:
    parts = shards(inputs.paths, params.shard_size or settings.shard_size)
    futures = analyze_shard.map(unmapped(settings), unmapped(dataset_id),
                                list(range(len(parts))), parts, unmapped(params))
    reports = [f.result() for f in futures]
    every = [input_report(inputs), *reports]
    result, files = merge_and_report.submit(  # on the runner: a Dask worker merges
        settings, dataset_id, every, params, inputs.paths[: params.examples]).result()
    return reports, result, on_this_machine(settings, files,
                                            analysis.analysis_report_prefix(every))


def profile_table(result: AnalysisResult) -> list[dict[str, Any]]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            for row in result.layer_profile()]


@flow(task_runner=PerRunTaskRunner(), **flow_options("attention_analysis"))
def attention_analysis(params: AnalysisParams, runner: RunnerParams | None = None
                      ) -> dict[str, Any]:
    """Weighted patch interrelation analysis of every layer and head over a data set."""
    settings = Settings()
    with tracked(settings, "attention_analysis", params) as run:
        params, registered = with_registered_weights(settings, params)
        dataset_id, inputs = register_inputs(settings, params)
        reports, result, files = run_analysis(settings, dataset_id, inputs, params)
        run_lineage = lineage(settings, "analysis", params, inputs, content_of(reports),
                              registered, cached=not any(r.computed for r in reports))
        run.mlflow_run_id = track_analysis(settings, params, result, files, run_lineage)
        model = run_lineage.model_label
        run.summary = totals(reports, inputs) | {"images": result.num_images,
                                         "mlflow_run_id": run.mlflow_run_id}
        table = profile_table(result)
        create_table_artifact(key=artifact_key("semantic-layer-profile", model), table=table,
                              description="Semantic lift and CLS focus per layer (1 = uniform)")
        url = tracking.run_url(settings, run.mlflow_run_id)
        if url:
            create_link_artifact(key=artifact_key("mlflow-run", model), link=url,
                                 link_text="MLflow run")
        publish(artifact_key("attention-analysis-summary", model), summary_markdown(
            "Attention analysis", run.summary, rejected_files(reports, inputs),
            profile_markdown(table) + f"\n\nMLflow run: {url or run.mlflow_run_id}"))
    return run.summary | {"layer_profile": table}
