"""The project's record of each flow run (the ``flow_runs`` table): opened ``running`` and
always closed — ``completed``, ``failed``, ``cancelled`` or ``crashed`` — whatever ends it.

A process killed outright (SIGKILL, out of memory) cannot close its own row, so a running row
carries its host, process id and a heartbeat (every :data:`HEARTBEAT_SECONDS`), and
:func:`reap_crashed_runs` — called when the next run starts and by ``vitsem db
housekeeping`` — closes as ``crashed`` each row whose process is gone from this host or whose
heartbeat stopped more than :data:`STALE_AFTER_SECONDS` ago."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update

from vitsem.platform.services.context import context
from vitsem.platform.settings import Settings
from vitsem.platform.shutdown import exit_within
from vitsem.platform.storage.db import FlowRun

log = logging.getLogger("vitsem.platform.runs")

RUN_STATUSES = ("running", "completed", "failed", "cancelled", "crashed")

HEARTBEAT_SECONDS = 30.0
"""How often a running run's row shows life."""

STALE_AFTER_SECONDS = 600.0
"""A running row whose heartbeat is older than this is taken for crashed (its machine may be
gone: the process check only works on the same host)."""


def _host() -> str:
    return socket.gethostname()[:255]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def reap_crashed_runs(settings: Settings, stale_after: float = STALE_AFTER_SECONDS,
                      now: dt.datetime | None = None) -> list[int]:
    """Close as ``crashed`` every ``running`` row whose process died without closing it: on
    this host, its process no longer exists; anywhere, its last heartbeat (or its start,
    for rows without one) is older than ``stale_after`` seconds. Returns their ids."""
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - dt.timedelta(seconds=stale_after)
    host = _host()
    with context(settings).meta.session() as s:
        rows = s.execute(select(FlowRun.id, FlowRun.host, FlowRun.pid, FlowRun.heartbeat_at,
                                FlowRun.started_at).where(FlowRun.status == "running")).all()
        dead = []
        for run_id, run_host, pid, beat, started in rows:
            last = beat or started
            if last is not None and last.tzinfo is None:  # SQLite drops the zone
                last = last.replace(tzinfo=dt.UTC)
            gone = run_host == host and pid is not None and not _alive(pid)
            if gone or (last is not None and last < cutoff):
                dead.append(run_id)
        if dead:
            s.execute(update(FlowRun).where(FlowRun.id.in_(dead), FlowRun.status == "running")
                      .values(status="crashed", finished_at=now))
    for run_id in dead:
        log.warning("flow run %d was left running by a process that died; marked crashed",
                    run_id)
    return dead


class _Heartbeat:
    """Refreshes a running row's ``heartbeat_at`` from a daemon thread until stopped."""

    def __init__(self, settings: Settings, run_id: int, every: float = HEARTBEAT_SECONDS) -> None:
        self.settings, self.run_id, self.every = settings, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"vitsem-heartbeat-{run_id}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with context(self.settings).meta.session() as s:
                    s.execute(update(FlowRun).where(FlowRun.id == self.run_id,
                                                    FlowRun.status == "running")
                              .values(heartbeat_at=dt.datetime.now(dt.UTC)))
            except Exception as e:  # a missed beat is not worth failing the run for
                log.warning("heartbeat of flow run %d failed: %s", self.run_id, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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
    ``on_crashed`` hook (:func:`mark_prefect_run`) closes it when Prefect sees the crash, and
    otherwise the next run's :func:`reap_crashed_runs` does (which also sweeps the temporary
    files such a process leaves)."""
    if reap_crashed_runs(settings):
        from vitsem.platform.housekeeping import sweep_temporary_files

        sweep_temporary_files(settings)
    now = dt.datetime.now(dt.UTC)
    with context(settings).meta.session() as s:
        row = FlowRun(flow_name=flow_name, prefect_flow_run_id=prefect_flow_run_id or "",
                      parameters=parameters, host=_host(), pid=os.getpid(), heartbeat_at=now,
                      started_at=now)
        s.add(row)
        s.flush()
        run = TrackedRun(row.id, flow_name)
    heartbeat = _Heartbeat(settings, run.id)
    try:
        yield run
    except BaseException as e:
        if type(e).__name__ == "TerminationSignal":  # SIGTERM: record the end, then go
            exit_within()
        heartbeat.stop()
        status = _status_of(e)
        log.warning("%s run %d %s: %s", flow_name, run.id, status, type(e).__name__)
        close_run(settings, run.id, status, run.summary, run.mlflow_run_id)
        raise
    heartbeat.stop()
    close_run(settings, run.id, "completed", run.summary, run.mlflow_run_id)


def closed_by_signal(settings: Settings, within_hours: float = 24.0, limit: int = 100
                     ) -> dict[str, str]:
    """Prefect flow run id -> status of recent runs closed ``crashed`` or ``cancelled``:
    the ones whose Prefect state may still read Running if its API was down at the time."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=within_hours)
    with context(settings).meta.session() as s:
        rows = s.execute(select(FlowRun.prefect_flow_run_id, FlowRun.status).where(
            FlowRun.status.in_(("crashed", "cancelled")), FlowRun.prefect_flow_run_id != "",
            FlowRun.finished_at >= since).order_by(FlowRun.id.desc()).limit(limit)).all()
    return {str(pid): str(status) for pid, status in rows}


def mark_prefect_run(settings: Settings, prefect_flow_run_id: str, status: str) -> int:
    """Close every still ``running`` row of a Prefect flow run as ``status``; returns how
    many rows it closed (for Prefect's ``on_crashed`` / ``on_cancellation`` hooks)."""
    with context(settings).meta.session() as s:
        done = s.execute(update(FlowRun).where(
            FlowRun.prefect_flow_run_id == prefect_flow_run_id, FlowRun.status == "running"
        ).values(status=status, finished_at=dt.datetime.now(dt.UTC)))
        return int(getattr(done, "rowcount", 0) or 0)
