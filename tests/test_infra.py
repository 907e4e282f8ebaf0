"""Deployment files, checked by reading: no Docker engine runs on the project machines."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

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


def test_prefect_yaml_entrypoints_exist() -> None:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = set()
    for dep in doc["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        names.add((flow.name, dep["name"]))
        assert set(dep["parameters"]) <= set(flow.parameters.properties)
    assert ("model_audit", "scheduled-audit") in names
    audit = next(d for d in doc["deployments"] if d["name"] == "scheduled-audit")
    assert audit["schedules"][0]["cron"] == "0 3 * * *"


def test_dockerfile_pins_torch_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
    assert "USER vitsem" in text and 'ENTRYPOINT ["vitsem"]' in text
