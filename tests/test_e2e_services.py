"""End to end against real servers: an MLflow tracking server (PostgreSQL backend, S3
artifacts on a moto server) and a Prefect server with the deployments served and triggered
the way a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import copy_test_images
from tests.services import MotoServer, free_port, postgres_database, stop, wait_for_port

SECRET = "s3cr3t-Password-never-logged"


@pytest.fixture
def images(small_dataset: Path, tmp_path: Path) -> Path:
    return copy_test_images(small_dataset, tmp_path / "imgs", 8)


@pytest.fixture
def mlflow_server(moto: MotoServer, tmp_path: Path) -> Iterator[tuple[str, str]]:
    bucket = "mlflow-artifacts"
    moto.create_bucket(bucket)
    with postgres_database() as backend:
        port = free_port()
        env = {**os.environ, **moto.env()}
        log = (tmp_path / "mlflow.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(port), "--backend-store-uri", backend,
             "--artifacts-destination", f"s3://{bucket}/mlflow", "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, 180, proc)
            yield f"http://127.0.0.1:{port}", bucket
        finally:
            stop(proc)


@pytest.mark.usefixtures("prefect_api")
def test_analysis_tracked_on_an_mlflow_server(
        mlflow_server: tuple[str, str], images: Path, small_checkpoint: Path, pg_url: str,
        moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from mlflow import MlflowClient

    from flows.attention_analysis import AnalysisParams, attention_analysis

    uri, _bucket = mlflow_server
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    moto.create_bucket("vitsem-e2e")
    # Trust auth accepts any password: a real secret in the URL that must never leak.
    monkeypatch.setenv("VITSEM_DATABASE_URL", pg_url.replace("postgres@", f"postgres:{SECRET}@"))
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", "s3://vitsem-e2e/a")
    monkeypatch.setenv("VITSEM_MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    out = attention_analysis(AnalysisParams(data=str(images), checkpoint=str(small_checkpoint),
                                            examples=1))
    client = MlflowClient(uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "semantic_lift")
    assert sorted(m.step for m in history) == [0, 1]  # layer as step
    assert run.data.metrics["images"] == 8
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"stats.json", "layer_profile.png", "level_matrix.png"} <= names
    local = client.download_artifacts(run.info.run_id, "stats.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["num_images"] == 8
    everything = json.dumps([run.data.params, run.data.tags]) + caplog.text
    assert SECRET not in everything
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "vitsem/attention_analysis"
    assert exp.artifact_location.startswith("s3://vitsem-e2e/a/mlflow")
    # the run id is recorded in SQL
    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        ids = c.scalars(sa.text("SELECT mlflow_run_id FROM flow_runs")).all()
    eng.dispose()
    assert out["mlflow_run_id"] in ids
    # Prefect artifacts carry no secret either
    from prefect.client.orchestration import get_client

    async def artifacts() -> str:
        async with get_client() as pc:
            return json.dumps([a.data for a in await pc.read_artifacts()], default=str)

    import asyncio

    assert SECRET not in asyncio.run(artifacts())


def test_scheduled_audit_deployment_triggered_from_the_cli(
        images: Path, small_checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "VITSEM_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "COLUMNS": "300"}  # wide enough that the CLI tables do not truncate states
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env,
                              stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT)
    serve = None
    try:
        wait_for_port(port, 180, server)
        serve = subprocess.Popen([str(bin_dir / "vitsem"), "serve", "--data", str(images),
                                  "--checkpoint", str(small_checkpoint)], env=env,
                                 stdout=(tmp_path / "serve.log").open("w"),
                                 stderr=subprocess.STDOUT)

        def prefect(*args: str) -> str:
            return subprocess.run([str(bin_dir / "prefect"), *args], env=env, check=True,
                                  capture_output=True, text=True, timeout=120).stdout

        deadline = time.monotonic() + 180
        while "scheduled-audit" not in prefect("deployment", "ls"):
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "deployment never appeared"
            time.sleep(2)
        inspect = prefect("deployment", "inspect", "model_audit/scheduled-audit")
        assert "0 3 * * *" in inspect  # the cron schedule
        prefect("deployment", "run", "model_audit/scheduled-audit")
        deadline = time.monotonic() + 400
        while True:
            runs = json.loads(prefect("flow-run", "ls", "--flow-name", "model_audit", "-o",
                                      "json"))
            states = [r.get("state_type") or r.get("state", {}).get("type") for r in runs]
            if "COMPLETED" in states:
                break
            assert "FAILED" not in states and "CRASHED" not in states, (
                str(runs) + (tmp_path / "serve.log").read_text()[-4000:])
            assert time.monotonic() < deadline, states
            time.sleep(3)
        db = tmp_path / "home" / "vitsem.db"
        eng = sa.create_engine(f"sqlite:///{db}")
        with eng.connect() as c:
            flows = c.execute(sa.text("SELECT flow_name, status FROM flow_runs")).all()
        eng.dispose()
        assert ("sift_extraction", "completed") in flows
        assert ("attention_analysis", "completed") in flows
    finally:
        if serve is not None:
            stop(serve)
        stop(server)
