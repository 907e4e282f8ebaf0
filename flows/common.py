"""Shared flow plumbing: parameter models, the task runner, retries, run records, inputs."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field

from vitsem.data.inputs import InputSet, resolve_inputs
from vitsem.errors import TransientServiceError, VitsemError
from vitsem.paths import path_text
from vitsem.platform import tracking
from vitsem.platform.history import AuditEvent
from vitsem.platform.lineage import Lineage, RegistryVersion, dataset_digest
from vitsem.platform.runs import TrackedRun, closed_by_signal, mark_prefect_run, tracked_run
from vitsem.platform.services.context import (
    ShardReport,
    context,
    load_model_cached,
    register_model,
)
from vitsem.platform.settings import Settings


class FlowParams(BaseModel):
    """Base of every flow's parameters: unknown keys are refused (a typo in a deployment's
    parameters fails the run instead of being dropped)."""

    model_config = ConfigDict(extra="forbid")


class DataParams(FlowParams):
    """What to analyse and with which model."""

    data: str = Field(description="Image folder, or a benchmark folder from `vitsem data make`.")
    split: str = Field(default="test", description="Split of a benchmark folder.")
    model: str | None = Field(default=None, description="timm model name.")
    checkpoint: str | None = Field(
        default=None, description="Weights: models:/<name>@<alias> (a registered version) or "
        "a file (safetensors/pt).")
    shard_size: int | None = Field(default=None, ge=1, description="Images per task.")


def make_task_runner(settings: Settings | None = None) -> Any:
    """A fixed task runner from the settings (``flow.with_options(task_runner=...)``); the
    flows themselves choose theirs per run (:mod:`flows.runners`)."""
    from flows.runners import task_runner

    return task_runner(None, settings)


UNKNOWN_FAULT_ATTEMPTS = 3
"""Runs of a task that failed on an exception vitsem did not classify (a bug, a library's
own error): retried a little, as before, but not for the whole transient budget."""


def retry_transient(_task: Any, task_run: Any, state: Any) -> bool:
    """Retry a task that failed on a transient service fault (:class:`TransientServiceError`:
    an S3 endpoint still down after botocore's own retries, ...) for every retry the task
    has; never one that failed on bad input or a permanent fault (the other vitsem errors,
    whose messages say what to fix: retrying them only delays it); an unclassified
    exception up to ``UNKNOWN_FAULT_ATTEMPTS`` runs."""
    try:
        state.result()
    except TransientServiceError:
        return True
    except (VitsemError, FileNotFoundError, ValueError):
        return False
    except Exception:
        return int(getattr(task_run, "run_count", 0) or 0) < UNKNOWN_FAULT_ATTEMPTS
    return True


TRANSIENT_RETRIES = 6
"""Retries of an I/O task: with the backoff below (2, 4, ... 64 s, jittered by +-50%) a
service may be down for about two minutes before the task fails; the flow's rerun then
finds the finished shards in the store."""

RETRYING_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,  # the artifact store is the cache, content-addressed
    "retries": TRANSIENT_RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}
"""Options of every I/O task: exponential backoff on transient faults only."""


def _close_crashed(_flow: Any, flow_run: Any, _state: Any) -> None:
    mark_prefect_run(Settings(), str(flow_run.id), "crashed")


def _close_cancelled(_flow: Any, flow_run: Any, _state: Any) -> None:
    mark_prefect_run(Settings(), str(flow_run.id), "cancelled")


RUN_HOOKS: dict[str, Any] = {"on_crashed": [_close_crashed],
                             "on_cancellation": [_close_cancelled]}
"""Flow options that close the project's run record when Prefect sees a crash or a cancel."""

FLOW_TIMEOUT_HOURS: dict[str, float] = {
    "sift_extraction": 4, "attention_analysis": 8, "spurious_audit": 8, "model_audit": 12,
    "guided_pretrain": 48,
}
"""Wall-clock limit of each flow: a run past it fails (timed out) instead of holding a
worker slot forever; a deployment may set another with ``flow.with_options``."""


def describe_params(params: Any) -> str:
    """``<model> on <data set>``: what a run works on, for its name in the Prefect UI."""
    p = params.model_dump() if isinstance(params, BaseModel) else dict(params or {})
    model = p.get("model") or (Path(p["checkpoint"]).stem if p.get("checkpoint") else None)
    data = Path(str(p.get("data") or "?")).name
    split = p.get("split")
    where = f"{data}/{split}" if split and split != "test" else data
    return f"{model} on {where}" if model else where


def run_namer(name: str) -> Any:
    """The ``flow_run_name`` of flow ``name``: ``<flow>: <model> on <data set>``."""

    def flow_run_name() -> str:
        from prefect.runtime import flow_run

        try:
            return f"{name}: {describe_params(flow_run.parameters.get('params'))}"
        except Exception:  # a name is never worth failing a run for
            return name

    return flow_run_name


def task_namer(kind: str) -> Any:
    """The ``task_run_name`` of a task: ``<kind>: <model> on <data set> [shard N] [map M]``
    (from its ``shard`` and ``map_name`` parameters, when it has them)."""

    def task_run_name() -> str:
        from prefect.runtime import task_run

        try:
            p = task_run.parameters
            shard = f" shard {p['shard']}" if "shard" in p else ""
            part = f" map {p['map_name']}" if "map_name" in p else ""
            return f"{kind}: {describe_params(p.get('params'))}{shard}{part}"
        except Exception:  # a name is never worth failing a run for
            return kind

    return task_run_name


def flow_options(name: str) -> dict[str, Any]:
    """Options of the flow ``name``: its name, run names, timeout and the run-record hooks."""
    return {"name": name, "flow_run_name": run_namer(name),
            "timeout_seconds": FLOW_TIMEOUT_HOURS[name] * 3600, **RUN_HOOKS}


def reconcile_prefect_states(settings: Settings, current: str | None = None) -> int:
    """Runs the project closed as ``crashed``/``cancelled`` (SIGTERM, a cancel) while
    Prefect's API was unreachable still read Running in Prefect: set them to Crashed or
    Cancelled now. Best effort (an API still down is left for the next run); returns how
    many it set."""
    import uuid

    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Crashed

    closed = {k: v for k, v in closed_by_signal(settings).items() if k != current}
    ids = []
    for key in closed:
        try:
            ids.append(uuid.UUID(key))
        except ValueError:  # not a Prefect run id
            continue
    if not ids:
        return 0
    try:
        with get_client(sync_client=True) as client:
            stuck = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=ids),
                state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.RUNNING, StateType.PENDING]))))
            for run in stuck:
                message = "its process was terminated while the Prefect API was unreachable"
                state: Any = (Crashed(message=message) if closed[str(run.id)] == "crashed"
                              else Cancelled(message=message))
                client.set_flow_run_state(run.id, state, force=True)
    except Exception as e:  # the API may still be away: the next run tries again
        get_run_logger().warning("could not reconcile Prefect states of ended runs: %s",
                                 type(e).__name__)
        return 0
    return len(stuck)


def tracked(settings: Settings, flow_name: str, params: BaseModel
            ) -> AbstractContextManager[TrackedRun]:
    """The project's ``flow_runs`` record of the current Prefect flow run."""
    from prefect.runtime import flow_run

    reconcile_prefect_states(settings, str(flow_run.id) if flow_run.id else None)
    return tracked_run(settings, flow_name, params.model_dump(),
                       str(flow_run.id) if flow_run.id else None)


@task(**RETRYING_TASK)
def register_inputs(settings: Settings, params: DataParams) -> tuple[int, InputSet]:
    """The data set's id in SQL (created on first use) and its images; registers the model."""
    inputs = resolve_inputs(params.data, params.split)
    ctx = context(settings)
    loaded = load_model_cached(params.model, params.checkpoint)
    register_model(ctx, loaded)
    dataset_id = ctx.meta.dataset(inputs.uri, inputs.name)
    ctx.meta.record_rejected(dataset_id, input_report(inputs).rejected)
    get_run_logger().info("%s: %d images, %d other entries, model %s (%s)", inputs.name,
                          len(inputs.items), len(inputs.rejected), loaded.spec.name,
                          loaded.checksum[:12])
    return dataset_id, inputs


def on_this_machine(settings: Settings, files: Sequence[Path], prefix: str) -> list[Path]:
    """Report files a task wrote, here: a task that ran on another machine (a Dask worker)
    left them there, so they are read back from the artifact store, where it also put them
    under ``prefix``."""
    if all(f.is_file() for f in files):
        return list(files)
    out = Path(tempfile.mkdtemp(prefix="vitsem-report-"))
    store = context(settings).store
    for f in files:
        (out / f.name).write_bytes(store.get(f"{prefix}/{f.name}"))
    return [out / f.name for f in files]


def shards(files: Sequence[str], size: int) -> list[list[str]]:
    return [list(files[i:i + size]) for i in range(0, len(files), size)]


def input_report(inputs: InputSet) -> ShardReport:
    """The entries of the input folders that are not image files, as a report (shard -1)
    beside the shards' own."""
    return ShardReport(-1, rejected=[asdict(r) | {"path": path_text(r.path)}
                                     for r in inputs.rejected])


def totals(reports: Sequence[ShardReport], inputs: InputSet | None = None) -> dict[str, Any]:
    """Counts of a run; ``rejected`` covers the shards' files and the inputs' other
    entries."""
    rejected = rejected_files(reports, inputs)
    return {
        "shards": len(reports),
        "computed": sum(r.computed for r in reports),
        "cached": sum(r.cached for r in reports),
        "rejected": len(rejected),
        "rejected_reasons": sorted({r["reason"] for r in rejected}),
    }


def rejected_files(reports: Sequence[ShardReport], inputs: InputSet | None = None
                   ) -> list[dict[str, str]]:
    """Every rejection: the inputs' other entries first, then each shard's files."""
    first = input_report(inputs).rejected if inputs is not None else []
    return first + [r for rep in reports for r in rep.rejected]


GPU_LIMIT = "vitsem-gpu"


@contextmanager
def device_slot(device: str) -> Iterator[None]:
    """Hold one slot of the global concurrency limit ``vitsem-gpu`` while a model works on a
    CUDA device, so no more model passes share the GPUs than the limit allows
    (``prefect gcl create vitsem-gpu --limit 1``: compose and ``scripts/stack.sh`` create
    it). On the CPU, or where no such limit exists, nothing waits."""
    if not device.startswith("cuda"):
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        yield


def artifact_key(kind: str, model_label: str | None = None) -> str:
    """``<kind>-<model>``: Prefect artifact keys per model, so the latest artifact of one
    model is not replaced by another deployment's run (keys allow a-z, 0-9 and dashes)."""
    if not model_label:
        return kind
    slug = re.sub(r"[^a-z0-9]+", "-", model_label.lower()).strip("-")
    return f"{kind}-{slug}"[:120].rstrip("-")


def publish(key: str, markdown: str, description: str | None = None) -> None:
    """A markdown artifact on the current flow run."""
    create_markdown_artifact(key=key, markdown=markdown, description=description)


def announce(run_lineage: Lineage, events: Sequence[AuditEvent]) -> None:
    """Emit the audit's events with the model as their resource, for automations (see
    ``prefect.yaml``: promotions are held when one arrives)."""
    from prefect.events import emit_event

    name = run_lineage.registry.name if run_lineage.registry else run_lineage.model_label
    resource = {"prefect.resource.id": f"vitsem.model.{name}", "prefect.resource.name": name,
                "vitsem.model.checksum": run_lineage.model_checksum}
    if run_lineage.registry is not None:
        resource["vitsem.model.version"] = run_lineage.registry.version
    for event in events:
        get_run_logger().warning("%s on %s: %s", event.name, run_lineage.model_label,
                                 event.payload)
        emit_event(event=event.name, resource=resource, payload=event.payload)


@dataclass(frozen=True)
class ParentRun:
    """The MLflow run of an enclosing flow (``model_audit``) and the registered version it
    audits: its steps log as children and name the same version."""

    run_id: str
    registry: RegistryVersion | None = None


PARENT_RUN: ContextVar[ParentRun | None] = ContextVar("vitsem_parent_mlflow_run", default=None)


@contextmanager
def parent_run(parent: ParentRun) -> Iterator[None]:
    """Steps called inside log their MLflow runs as children of ``parent``."""
    token = PARENT_RUN.set(parent)
    try:
        yield
    finally:
        PARENT_RUN.reset(token)


def with_registered_weights(settings: Settings, params: Any) -> tuple[Any, RegistryVersion | None]:
    """``params`` with a ``models:/<name>@<alias>`` checkpoint replaced by the downloaded
    file, and the registered version it named (None for a plain path)."""
    path, ref = tracking.resolve_model(settings, params.checkpoint)
    if ref is None:
        return params, None
    get_run_logger().info("checkpoint %s is %s", params.checkpoint, ref.uri)
    return params.model_copy(update={"checkpoint": path}), ref


def content_of(reports: Sequence[ShardReport]) -> tuple[str, int]:
    """(digest, number of distinct images) of the images the shards used."""
    images = {sha for r in reports for sha in r.image_sha256}
    return dataset_digest(images), len(images)


def lineage(settings: Settings, kind: str, params: DataParams, inputs: InputSet,
            content: tuple[str, int], registry: RegistryVersion | None = None,
            cached: bool | None = None) -> Lineage:
    """What this run looked at (model, registry version, data set ``content`` from
    :func:`content_of`) and where it ran (the Prefect flow run and deployment, the parent
    MLflow run)."""
    from prefect.runtime import deployment, flow_run

    loaded = load_model_cached(params.model, params.checkpoint)
    parent = PARENT_RUN.get()
    registry = registry or (parent.registry if parent else None)
    return Lineage(
        kind=kind, model_name=loaded.spec.name, model_checksum=loaded.checksum,
        dataset_name=inputs.name, dataset_digest=content[0], dataset_source=inputs.uri,
        num_images=content[1],
        registry=registry or tracking.registry_version(settings, loaded.checksum),
        cached=cached, flow_run_id=flow_run.id, flow_run_url=flow_run.ui_url,
        deployment=deployment.name, parent_run_id=parent.run_id if parent else None)
