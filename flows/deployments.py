"""The deployments of ``prefect.yaml`` (their one source) as runner deployments, for
``vitsem serve``: local development without a work pool, same names, tags, descriptions,
versions, schedules and concurrency limits as ``prefect deploy`` makes from the file."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def load_deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` entries of a prefect.yaml (YAML anchors resolved)."""
    doc = yaml.safe_load(path.read_text())
    return list(doc.get("deployments") or [])


def load_entrypoint(entrypoint: str) -> Any:
    """The flow object of ``flows/x.py:name`` (imported as a module of this checkout)."""
    file, name = entrypoint.split(":")
    return getattr(importlib.import_module(file.removesuffix(".py").replace("/", ".")), name)


def _parameters(spec: dict[str, Any], data: dict[str, Any] | None) -> dict[str, Any]:
    """The deployment's parameters; ``data`` replaces the data set everywhere and the model
    (name or checkpoint) where the deployment names one."""
    params = dict(spec.get("parameters") or {})
    if data and isinstance(params.get("params"), dict):
        inner = dict(params["params"])
        inner["data"] = data["data"]
        if "checkpoint" in inner or "model" in inner:
            inner.pop("checkpoint", None)
            inner.pop("model", None)
            inner.update({k: data[k] for k in ("model", "checkpoint") if data.get(k)})
        params["params"] = inner
    return params


def runner_deployments(data: dict[str, Any] | None = None, cron: str | None = None,
                       path: Path = PREFECT_YAML) -> list[Any]:
    """Every deployment of ``path`` for ``prefect serve``: ``data`` (data/model/checkpoint)
    replaces the file's paths, ``cron`` the scheduled deployments' cron."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    out = []
    for spec in load_deployment_specs(path):
        flow = load_entrypoint(spec["entrypoint"])
        crons = [s["cron"] for s in spec.get("schedules") or [] if "cron" in s]
        limit = spec.get("concurrency_limit")
        out.append(flow.to_deployment(
            name=spec["name"], description=spec.get("description"), tags=spec.get("tags"),
            version=str(spec["version"]) if spec.get("version") else None,
            cron=[cron] * len(crons) if cron and crons else (crons or None),
            concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict)
            else limit,
            parameters=_parameters(spec, data), triggers=_triggers(spec)))
    return out


def _triggers(spec: dict[str, Any]) -> list[Any] | None:
    """The deployment's event triggers (its automations), as ``prefect deploy`` reads them."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    found = [DeploymentEventTrigger.model_validate(t) for t in spec.get("triggers") or []]
    return found or None
