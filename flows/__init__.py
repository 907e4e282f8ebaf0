"""Prefect flows composing the vitsem library: each flow body reads as its pipeline, each task
is a thin wrapper over a service in :mod:`vitsem.platform.services`.

The library logs to the ``vitsem`` logger; here it is routed to Prefect's run logs, so a person
watching a run in the UI sees shard progress, rejected files, store retries and cache hits.
"""

from __future__ import annotations

import logging
import os

# Prefect's ephemeral server writes telemetry to its SQLite file while flows start, which
# races with the flow's own writes ("database is locked"); runs need none of it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral API starts a server process; on a busy 2-core machine it can need more than
# Prefect's default 20 s to answer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _route_library_logs_to_prefect() -> None:
    from prefect import flow  # noqa: F401  (importing the engine sets Prefect's logging up)

    target = logging.getLogger("vitsem")
    target.setLevel(logging.INFO)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in target.handlers:
            target.addHandler(handler)


_route_library_logs_to_prefect()
