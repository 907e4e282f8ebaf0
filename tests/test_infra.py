"""Deployment files, checked by reading: no Docker engine runs on the project machines."""

from __future__ import annotations

import copy
import importlib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

ROOT = Path(__file__).resolve().parents[1]


def test_compose_stack_is_consistent() -> None:
    doc = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"postgres", "minio", "mlflow", "prefect", "worker"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    worker = services["worker"]["environment"]
    assert worker["VITSEM_DATABASE_URL"].startswith("postgresql+psycopg2://")
    assert worker["VITSEM_ARTIFACT_URI"].startswith("s3://")
    assert worker["PREFECT_API_URL"].endswith("/api")
    assert worker["AWS_ENDPOINT_URL"] == "http://minio:9000"
    mlflow_cmd = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql" in mlflow_cmd and "s3://" in mlflow_cmd
    for vol in doc["volumes"]:
        assert any(vol in str(s.get("volumes", [])) for s in services.values())
    init = (ROOT / "infra" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow" in init and "CREATE DATABASE prefect" in init


def _check_deployments(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """Every deployment's entrypoint imports, and its parameters validate against the flow's
    parameter models (nested keys included: a typo must fail, not be dropped)."""
    names = set()
    for dep in doc["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        names.add((flow.name, dep["name"]))
        hints = typing.get_type_hints(flow.fn)
        params = dep.get("parameters", {})
        assert set(params) <= set(hints) - {"return"}, dep["name"]
        for name, value in params.items():
            model = hints[name]
            assert isinstance(model, type) and issubclass(model, BaseModel), name
            model.model_validate(value)
    return names


def test_prefect_yaml_deployments_match_their_flows() -> None:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = _check_deployments(doc)
    assert ("model_audit", "scheduled-audit") in names
    audit = next(d for d in doc["deployments"] if d["name"] == "scheduled-audit")
    assert audit["schedules"][0]["cron"] == "0 3 * * *"
    # The check fails on a misspelt nested key and on a bad choice.
    for key, value in (("chekpoint", "/x.safetensors"), ("weighting", "votes")):
        bad = copy.deepcopy(doc)
        bad["deployments"][0]["parameters"]["params"][key] = value
        with pytest.raises(ValidationError):
            _check_deployments(bad)


def test_dockerfile_pins_torch_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
    assert "USER vitsem" in text and 'ENTRYPOINT ["vitsem"]' in text
