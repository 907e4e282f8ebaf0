"""The project's record of each flow run (the ``flow_runs`` table): opened ``running`` and
always closed — ``completed``, ``failed``, ``cancelled`` or ``crashed`` — whatever ends it."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import update

from vitsem.platform.services.context import context
from vitsem.platform.settings import Settings
from vitsem.platform.storage.db import FlowRun

log = logging.getLogger("vitsem.platform.runs")

RUN_STATUSES = ("running", "completed", "failed", "cancelled", "crashed")


@dataclass
class TrackedRun:
    """An open ``flow_runs`` row; set ``summary`` and ``mlflow_run_id`` before it closes."""

    id: int
    flow_name: str
    summary: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None


def _status_of(error: BaseException) -> str:
    """``cancelled`` for an interrupt or a cancellation, ``crashed`` for a termination signal
    (Prefect raises ``TerminationSignal`` on SIGTERM), ``failed`` for any other error."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"KeyboardInterrupt", "CancelledError", "Abort", "FlowRunCancelled"}:
        return "cancelled"
    if names & {"TerminationSignal", "SystemExit"}:
        return "crashed"
    return "failed"


def close_run(settings: Settings, run_id: int, status: str, summary: dict[str, Any] | None = None,
              mlflow_run_id: str | None = None) -> None:
    with context(settings).meta.session() as s:
        s.execute(update(FlowRun).where(FlowRun.id == run_id).values(
            status=status, summary=summary or {}, mlflow_run_id=mlflow_run_id,
            finished_at=dt.datetime.now(dt.UTC)))


@contextmanager
def tracked_run(settings: Settings, flow_name: str, parameters: dict[str, Any],
                prefect_flow_run_id: str | None = None) -> Iterator[TrackedRun]:
    """Record a run of ``flow_name``: a ``running`` row on entry, closed on exit as
    ``completed``, or by what ended it (an error, a cancellation, SIGTERM) before the error
    goes on. A process killed outright (SIGKILL, out of memory) cannot close its row; Prefect's
    ``on_crashed`` hook (:func:`mark_prefect_run`) closes it when Prefect sees the crash."""
    with context(settings).meta.session() as s:
        row = FlowRun(flow_name=flow_name, prefect_flow_run_id=prefect_flow_run_id or "",
                      parameters=parameters)
        s.add(row)
        s.flush()
        run = TrackedRun(row.id, flow_name)
    try:
        yield run
    except BaseException as e:
        status = _status_of(e)
        log.warning("%s run %d %s: %s", flow_name, run.id, status, type(e).__name__)
        close_run(settings, run.id, status, run.summary, run.mlflow_run_id)
        raise
    close_run(settings, run.id, "completed", run.summary, run.mlflow_run_id)


def mark_prefect_run(settings: Settings, prefect_flow_run_id: str, status: str) -> int:
    """Close every still ``running`` row of a Prefect flow run as ``status``; returns how
    many rows it closed (for Prefect's ``on_crashed`` / ``on_cancellation`` hooks)."""
    with context(settings).meta.session() as s:
        done = s.execute(update(FlowRun).where(
            FlowRun.prefect_flow_run_id == prefect_flow_run_id, FlowRun.status == "running"
        ).values(status=status, finished_at=dt.datetime.now(dt.UTC)))
        return int(getattr(done, "rowcount", 0) or 0)
