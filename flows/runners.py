"""The task runner of a flow run, chosen per run or per deployment by the flow's ``runner``
parameter (not when the module is imported): threads, or Dask on a cluster the run starts
(``LocalCluster`` or any ``cluster_class``, with adaptive scaling) or one already running
(``address``). A parent run (``model_audit``) starts one cluster and hands its address to
its steps, which run their tasks there instead of each starting its own."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vitsem.errors import ConfigError
from vitsem.platform.settings import Settings

__all__ = ["PerRunTaskRunner", "RunnerParams", "dask_runner", "shared_cluster", "task_runner"]


class RunnerParams(BaseModel):
    """Where a run's tasks run. Unset fields fall back to the ``VITSEM_TASK_RUNNER``,
    ``VITSEM_DASK_ADDRESS`` and ``VITSEM_DASK_WORKERS`` settings, read when the run starts."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["thread", "dask"] | None = Field(
        default=None, description="thread or dask (default: VITSEM_TASK_RUNNER).")
    address: str | None = Field(
        default=None, description="Dask: scheduler of a running cluster, tcp://host:8786.")
    cluster_class: str | None = Field(default=None, description=(
        "Dask: cluster the run starts, as a dotted path (default distributed.LocalCluster; "
        "e.g. dask_kubernetes.operator.KubeCluster, coiled.Cluster)."))
    cluster_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Dask: arguments of the cluster class.")
    adapt_min: int | None = Field(default=None, ge=0, description="Dask: adaptive minimum.")
    adapt_max: int | None = Field(default=None, ge=1, description="Dask: adaptive maximum.")

    @model_validator(mode="after")
    def _consistent(self) -> RunnerParams:
        started = self.cluster_class or self.cluster_kwargs or self.adapt() is not None
        if self.address and started:
            raise ConfigError("runner: give either a Dask scheduler address or a cluster to "
                              "start (cluster_class, cluster_kwargs, adapt_*), not both")
        if (self.adapt_min is not None and self.adapt_max is not None
                and self.adapt_min > self.adapt_max):
            raise ConfigError(f"runner: adapt_min {self.adapt_min} exceeds adapt_max "
                              f"{self.adapt_max}")
        return self

    def adapt(self) -> dict[str, int] | None:
        """``cluster.adapt`` arguments, or None for a fixed-size cluster."""
        if self.adapt_min is None and self.adapt_max is None:
            return None
        return {k: v for k, v in (("minimum", self.adapt_min), ("maximum", self.adapt_max))
                if v is not None}

    def resolved(self, settings: Settings | None = None) -> RunnerParams:
        """These choices with the settings' defaults filled in."""
        settings = settings or Settings()
        kind = self.kind or settings.task_runner
        if kind == "thread":
            return self.model_copy(update={"kind": kind})
        if self.address or self.cluster_class or self.cluster_kwargs or self.adapt():
            return self.model_copy(update={"kind": kind})
        if settings.dask_address:
            return self.model_copy(update={"kind": kind, "address": settings.dask_address})
        return self.model_copy(update={"kind": kind, "cluster_kwargs": {
            "n_workers": settings.dask_workers, "threads_per_worker": 1, "processes": True}})


def dask_runner(spec: RunnerParams) -> Any:
    """A ``DaskTaskRunner`` for a resolved Dask ``spec``."""
    from prefect_dask import DaskTaskRunner

    if spec.address:
        return DaskTaskRunner(address=spec.address)
    try:
        return DaskTaskRunner(cluster_class=spec.cluster_class, cluster_kwargs=spec.cluster_kwargs,
                              adapt_kwargs=spec.adapt())
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"runner: cannot use cluster class {spec.cluster_class!r} ({e}); "
                          "give an importable dotted path and install its package on the "
                          "worker") from None


def task_runner(spec: RunnerParams | None = None, settings: Settings | None = None
                ) -> TaskRunner[Any]:
    """The task runner ``spec`` names (default: the settings' choice)."""
    settings = settings or Settings()
    spec = (spec or RunnerParams()).resolved(settings)
    if spec.kind == "dask":
        return dask_runner(spec)
    return ThreadPoolTaskRunner(max_workers=settings.task_concurrency())


class PerRunTaskRunner(TaskRunner[Any]):
    """The task runner every flow is declared with: on its first task it builds the runner
    the current flow run's ``runner`` parameter names (see :func:`task_runner`) and hands it
    every task; a run that submits none starts nothing."""

    def __init__(self) -> None:
        super().__init__()
        self._stack = ExitStack()
        self._inner: TaskRunner[Any] | None = None

    @property
    def name(self) -> str:
        return "per-run"

    def duplicate(self) -> PerRunTaskRunner:
        return type(self)()

    def inner(self) -> TaskRunner[Any]:
        if self._inner is None:
            ctx = FlowRunContext.get()
            raw = (ctx.parameters or {}).get("runner") if ctx is not None else None
            spec = raw if isinstance(raw, RunnerParams) or raw is None else (
                RunnerParams.model_validate(raw))
            runner = task_runner(spec)
            self.logger.info("tasks run on %s", runner.name)
            self._inner = self._stack.enter_context(runner)
        return self._inner

    def submit(self, task: Any, parameters: dict[str, Any],
               wait_for: Iterable[Any] | None = None,
               dependencies: dict[str, Any] | None = None) -> Any:
        return self.inner().submit(task, parameters, wait_for, dependencies)

    def __exit__(self, *exc: Any) -> None:
        try:
            self._stack.close()
        finally:
            self._inner = None
            super().__exit__(*exc)


@contextmanager
def shared_cluster(spec: RunnerParams | None = None) -> Iterator[RunnerParams]:
    """For a parent run: the runner its steps use. A Dask cluster to start is started here,
    once, and the steps get its scheduler address; threads or an address pass through."""
    spec = (spec or RunnerParams()).resolved()
    if spec.kind != "dask" or spec.address:
        yield spec
        return
    from distributed import LocalCluster
    from prefect.utilities.importtools import from_qualified_name

    try:
        cls = from_qualified_name(spec.cluster_class) if spec.cluster_class else LocalCluster
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"runner: cannot use cluster class {spec.cluster_class!r} ({e}); "
                          "give an importable dotted path and install its package") from None
    adapt = spec.adapt()
    with cls(**spec.cluster_kwargs) as cluster:
        if adapt is not None:
            cluster.adapt(**adapt)
        yield RunnerParams(kind="dask", address=cluster.scheduler_address)
