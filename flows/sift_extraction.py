"""SIFT extraction flow: each image as the model sees it and its keypoints, stored once."""

from __future__ import annotations

from typing import Any

from prefect import flow, task, unmapped

from flows.common import (
    RETRYING_TASK,
    DataParams,
    content_of,
    flow_options,
    publish,
    register_inputs,
    rejected_files,
    shards,
    task_namer,
    totals,
    tracked,
)
from flows.runners import PerRunTaskRunner, RunnerParams
from vitsem.platform.services import keypoints
from vitsem.platform.services.context import ShardReport
from vitsem.platform.settings import Settings
from vitsem.render.markdown import summary_markdown


@task(task_run_name=task_namer("sift"), **RETRYING_TASK)
def sift_shard(settings: Settings, dataset_id: int, shard: int, paths: list[str],
               params: DataParams) -> ShardReport:
    return keypoints.sift_shard(settings, dataset_id, shard, paths, params.model,
                                params.checkpoint)


def run_sift(settings: Settings, dataset_id: int, paths: list[str], params: DataParams
             ) -> list[ShardReport]:
    parts = shards(paths, params.shard_size or settings.shard_size)
    futures = sift_shard.map(unmapped(settings), unmapped(dataset_id), list(range(len(parts))),
                             parts, unmapped(params))
    return [f.result() for f in futures]


@flow(task_runner=PerRunTaskRunner(), **flow_options("sift_extraction"))
def sift_extraction(params: DataParams, runner: RunnerParams | None = None
                   ) -> dict[str, Any]:
    """Extract and store SIFT keypoints for every image; already stored ones are skipped."""
    settings = Settings()
    with tracked(settings, "sift_extraction", params) as run:
        dataset_id, inputs = register_inputs(settings, params)
        reports = run_sift(settings, dataset_id, inputs.paths, params)
        digest, images = content_of(reports)
        run.summary = totals(reports, inputs) | {"images": images, "dataset_digest": digest}
        publish("sift-extraction-summary", summary_markdown(
            "SIFT extraction", run.summary, rejected_files(reports, inputs)),
            "Images processed, found in the store, rejected")
    return run.summary
