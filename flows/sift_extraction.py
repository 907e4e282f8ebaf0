"""SIFT extraction flow: keypoints of every image as the model sees it, sharded over tasks."""

from __future__ import annotations

from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact

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
from vitsem.platform import jobs
from vitsem.platform.jobs import ShardReport
from vitsem.platform.settings import Settings


@task(**RETRYING_TASK)
def sift_shard(settings: Settings, dataset_id: int, shard: int, paths: list[str],
               model: str | None, checkpoint: str | None) -> ShardReport:
    return jobs.sift_shard(settings, dataset_id, shard, paths, model, checkpoint)


def run_sift(settings: Settings, params: DataParams) -> tuple[int, list[ShardReport]]:
    dataset_id, files = register_inputs(settings, params)
    size = params.shard_size or settings.shard_size
    parts = shards(files, size)
    futures = sift_shard.map(unmapped(settings), unmapped(dataset_id), list(range(len(parts))),
                             parts, unmapped(params.model), unmapped(params.checkpoint))
    return dataset_id, [f.result() for f in futures]


@flow(name="sift_extraction", task_runner=make_task_runner())
def sift_extraction(params: DataParams) -> dict[str, Any]:
    """Extract and store SIFT keypoints for every image; already stored ones are skipped."""
    settings = Settings()
    run_id = start_run(settings, "sift_extraction", params.model_dump())
    try:
        _, reports = run_sift(settings, params)
    except BaseException:
        finish_run(settings, run_id, {}, status="failed")
        raise
    counts = totals(reports)
    rejected = [r for rep in reports for r in rep.rejected]
    create_markdown_artifact(key="sift-extraction-summary",
                             markdown=summary_markdown("SIFT extraction", counts, rejected),
                             description="Images processed, found in the store, rejected")
    finish_run(settings, run_id, counts)
    return counts
