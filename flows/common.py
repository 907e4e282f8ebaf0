"""Shared flow plumbing: parameter models, task runners, inputs, summaries."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field
from sqlalchemy import update

from vitsem.data.shortcut import DATASET_INFO, ShortcutDataset
from vitsem.errors import VitsemError
from vitsem.method.images import list_images
from vitsem.platform import jobs
from vitsem.platform.jobs import ShardReport, context
from vitsem.platform.settings import Settings
from vitsem.platform.storage.db import FlowRun


class DataParams(BaseModel):
    """What to analyse and with which model."""

    data: str = Field(description="Image folder, or a benchmark folder from `vitsem data make`.")
    split: str = Field(default="test", description="Split of a benchmark folder.")
    model: str | None = Field(default=None, description="timm model name.")
    checkpoint: str | None = Field(default=None, description="Weights file (safetensors/pt).")
    shard_size: int | None = Field(default=None, ge=1, description="Images per task.")


def make_task_runner(settings: Settings | None = None) -> Any:
    """The task runner chosen by ``VITSEM_TASK_RUNNER``: threads (default) or Dask."""
    settings = settings or Settings()
    if settings.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if settings.dask_address:
            return DaskTaskRunner(address=settings.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": settings.dask_workers,
                                              "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=settings.max_workers)


def input_files(params: DataParams) -> tuple[list[str], str]:
    """Sorted absolute paths to process and a data-set name."""
    root = Path(params.data).resolve()
    if (root / DATASET_INFO).is_file():
        ds = ShortcutDataset.load(root)
        return [str(p.resolve()) for p in ds.paths(params.split)], f"{root.name}:{params.split}"
    if root.is_dir():
        return [str(p) for p in list_images(root)], root.name
    if root.is_file():
        return [str(root)], root.name
    raise FileNotFoundError(f"{params.data}: no such file or folder")


def retry_transient(_task: Any, _run: Any, state: Any) -> bool:
    """Retry a failed task unless it failed on bad input or a permanent fault (both are
    vitsem errors with a message that says what to fix): retrying those only delays it."""
    try:
        state.result()
    except (VitsemError, FileNotFoundError, ValueError):
        return False
    except Exception:
        return True
    return True


RETRYING_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,  # the artifact store is the cache, content-addressed
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}
"""Options of every I/O task: exponential backoff on transient faults only."""


@task(**RETRYING_TASK)
def register_inputs(settings: Settings, params: DataParams) -> tuple[int, list[str]]:
    """The data set's id in SQL (created on first use) and its files; registers the model."""
    files, name = input_files(params)
    ctx = jobs.context(settings)
    jobs.register_model(ctx, params.model, params.checkpoint)
    return ctx.meta.dataset(f"{params.data}#{params.split}", name), files


def shards(files: list[str], size: int) -> list[list[str]]:
    return [files[i:i + size] for i in range(0, len(files), size)]


def start_run(settings: Settings, flow_name: str, params: dict[str, Any]) -> int:
    from prefect.runtime import flow_run

    ctx = context(settings)
    with ctx.meta.session() as s:
        row = FlowRun(flow_name=flow_name, prefect_flow_run_id=str(flow_run.id or ""),
                      parameters=params)
        s.add(row)
        s.flush()
        return row.id


def finish_run(settings: Settings, run_id: int, summary: dict[str, Any],
               mlflow_run_id: str | None = None, status: str = "completed") -> None:
    ctx = context(settings)
    with ctx.meta.session() as s:
        s.execute(update(FlowRun).where(FlowRun.id == run_id).values(
            summary=summary, mlflow_run_id=mlflow_run_id, status=status,
            finished_at=dt.datetime.now(dt.UTC)))


def totals(reports: list[ShardReport]) -> dict[str, Any]:
    rejected = [r for rep in reports for r in rep.rejected]
    return {
        "shards": len(reports),
        "computed": sum(r.computed for r in reports),
        "cached": sum(r.cached for r in reports),
        "rejected": len(rejected),
        "rejected_reasons": sorted({r["reason"] for r in rejected}),
    }


def summary_markdown(title: str, counts: dict[str, Any], rejected: list[dict[str, str]],
                     extra: str = "") -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    if rejected:
        lines += ["", "## Rejected images", "", "| file | reason | detail |", "|---|---|---|"]
        lines += [f"| {Path(r['path']).name} | {r['reason']} | {r['detail'][:120]} |"
                  for r in rejected[:50]]
    return "\n".join(lines) + ("\n\n" + extra if extra else "")
