"""End to end against real servers: an MLflow tracking server (PostgreSQL backend, S3
artifacts on a moto server) and a Prefect server, the deployments of prefect.yaml deployed
and run through a worker the way production does."""

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


def test_scheduled_audit_deployed_from_prefect_yaml_runs_through_a_worker(
        images: Path, small_checkpoint: Path, moto: MotoServer, tmp_path: Path) -> None:
    """`scripts/stack.sh up`: a Prefect server, an MLflow server (PostgreSQL, artifacts on
    the S3 endpoint), `prefect deploy --all` from prefect.yaml and a worker on the `vitsem`
    process pool; the scheduled audit, triggered from the CLI, runs through the worker."""
    import boto3

    bucket = "vitsem-stack"
    moto.create_bucket(bucket)
    bin_dir = Path(sys.executable).parent
    root = Path(__file__).resolve().parents[1]
    with postgres_database() as vitsem_db, postgres_database() as mlflow_db:
        env = {**os.environ, **moto.env(), "PREFECT_HOME": str(tmp_path / "prefect"),
               "VITSEM_HOME": str(tmp_path / "home"), "VITSEM_DATABASE_URL": vitsem_db,
               "VITSEM_ARTIFACT_URI": f"s3://{bucket}/artifacts",
               "MLFLOW_BACKEND_STORE_URI": mlflow_db,
               "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/mlflow",
               "VITSEM_STACK_DIR": str(tmp_path / "stack"), "VITSEM_BIN": str(bin_dir),
               "VITSEM_PREFECT_PORT": str(free_port()), "VITSEM_MLFLOW_PORT": str(free_port()),
               "VITSEM_STACK_DEPLOY": "scheduled-audit",  # each deploy imports its flow
               "COLUMNS": "300"}  # wide enough that the CLI tables do not truncate states
        env.pop("VITSEM_MLFLOW_TRACKING_URI", None)
        stack = [str(root / "scripts" / "stack.sh")]

        def logs() -> str:
            return "\n".join(f"--- {f.name}\n{f.read_text()[-2500:]}"
                             for f in sorted((tmp_path / "stack").glob("*.log")))

        try:
            t = time.monotonic()
            up = subprocess.run([*stack, "up"], env=env, capture_output=True, text=True,
                                timeout=400)
            assert up.returncode == 0, up.stderr + logs()
            print(f"stack.sh up: {time.monotonic() - t:.0f} s")
            exports = dict(line.removeprefix("export ").split("=", 1)
                           for line in up.stdout.splitlines() if line.startswith("export "))
            env.update(exports)

            def prefect(*args: str) -> str:
                return subprocess.run([str(bin_dir / "prefect"), *args], env=env, check=True,
                                      capture_output=True, text=True, timeout=120).stdout

            inspect = prefect("deployment", "inspect", "model_audit/scheduled-audit")
            assert "0 3 * * *" in inspect and "'vitsem'" in inspect  # schedule, pool
            prefect("deployment", "run", "model_audit/scheduled-audit", "--params", json.dumps(
                {"params": {"data": str(images), "checkpoint": str(small_checkpoint)}}))
            deadline = time.monotonic() + 400
            while True:
                runs = json.loads(prefect("flow-run", "ls", "--flow-name", "model_audit",
                                          "-o", "json"))
                states = [r.get("state_type") or r.get("state", {}).get("type") for r in runs]
                if "COMPLETED" in states:
                    break
                assert "FAILED" not in states and "CRASHED" not in states, str(runs) + logs()
                assert time.monotonic() < deadline, str(states) + logs()
                time.sleep(3)
            (done,) = [r for r in runs if (r.get("state_type") or r["state"]["type"])
                       == "COMPLETED"]
            assert done["work_pool_name"] == "vitsem"  # picked from the pool by the worker
            assert done["name"] == f"model_audit: tiny on {images.name}"
            assert "Worker" in (tmp_path / "stack" / "worker.log").read_text()
        finally:
            subprocess.run([*stack, "down"], env=env, capture_output=True, timeout=120)
        eng = sa.create_engine(vitsem_db)
        with eng.connect() as c:
            flows = set(c.execute(sa.text("SELECT flow_name, status FROM flow_runs")).all())
        eng.dispose()
        assert {("model_audit", "completed"), ("sift_extraction", "completed"),
                ("attention_analysis", "completed")} <= flows
        creds = moto.env()
        s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                          aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.startswith("artifacts/keypoints/") for k in keys)
        # The runs' MLflow artifacts, beside the project's (vitsem.platform.tracking).
        assert any(k.startswith("artifacts/mlflow/") for k in keys), keys[:20]
    for name in ("worker", "mlflow", "prefect-server"):  # `down` stopped everything
        assert not (tmp_path / "stack" / f"{name}.pid").exists()
