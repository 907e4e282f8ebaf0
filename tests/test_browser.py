"""The path a person takes: the Prefect UI's run form for the audit deployment, the run it
starts, and the audit found by its name on the MLflow runs page (real Prefect and MLflow
servers, headless Chromium). Screenshots go to ``$VITSEM_SCREENSHOTS`` when set (the README's
pictures under ``docs/`` were taken so)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.browser import chromium, render
from tests.services import free_port, stop, wait_for_port

ROOT = Path(__file__).parents[1]
SERVE = """
from prefect import serve
from flows.model_audit import model_audit
serve(model_audit.to_deployment(name="browser-audit", tags=["vitsem", "audit"],
      description="Audit of the champion, started from the UI",
      parameters={"params": {"data": %r, "checkpoint": "models:/tiny@champion"}}))
"""


def _server(args: list[str], port: int, log: Path, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    wait_for_port(port, 240, proc)
    return proc


@pytest.fixture
def servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An MLflow tracking server (SQLite, served artifacts) and a Prefect server."""
    chromium()  # fail or skip before starting anything
    bin_dir = Path(sys.executable).parent
    mlflow_port, prefect_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "VITSEM_HOME": str(tmp_path / "home"),
           "VITSEM_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
           "PYTHONPATH": str(ROOT)}
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI"):
        env.pop(var, None)
        monkeypatch.delenv(var, raising=False)
    for var in ("VITSEM_HOME", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(var, env[var])
    procs = []
    try:
        procs.append(_server([str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1",
                              "--port", str(mlflow_port), "--workers", "1",
                              "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                              "--artifacts-destination", (tmp_path / "mlruns").as_uri()],
                             mlflow_port, tmp_path / "mlflow.log", env))
        procs.append(_server([str(bin_dir / "prefect"), "server", "start", "--host",
                              "127.0.0.1", "--port", str(prefect_port)],
                             prefect_port, tmp_path / "prefect.log", env))
        yield env
    finally:
        for proc in procs:
            stop(proc)


def _shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("VITSEM_SCREENSHOTS", tmp_path / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_audit_started_from_the_prefect_form_is_found_on_the_mlflow_runs_page(
        servers: dict[str, str], few_images: Path, small_checkpoint: Path,
        tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from vitsem.cli import app
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import register_checkpoint

    shots = _shots(tmp_path)
    api, mlflow_url = servers["PREFECT_API_URL"], servers["VITSEM_MLFLOW_TRACKING_URI"]
    _, version = register_checkpoint(Settings(), small_checkpoint, "tiny", "champion", {}, {})
    serve = subprocess.Popen([sys.executable, "-c", SERVE % str(few_images)], env=servers,
                             cwd=ROOT, stdout=(tmp_path / "serve.log").open("w"),
                             stderr=subprocess.STDOUT)
    try:
        http = httpx.Client(base_url=api, timeout=60)
        deadline = time.monotonic() + 240
        while not (found := http.post("/deployments/filter", json={}).json()):
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the deployment never appeared"
            time.sleep(2)
        deployment = found[0]
        # The run form renders the flow's parameters, choices as dropdowns.
        ui = api.removesuffix("/api")
        form = render(f"{ui}/deployments/deployment/{deployment['id']}/run",
                      shots / "prefect-run-form.png")
        assert all(f in form for f in ("Data", "Checkpoint", "Weighting")), form[-2000:]
        assert re.search(r"<select[^>]*>", form), "the weighting choice is not a dropdown"
        # Start the run with the call the form's "Submit" makes.
        run = http.post(f"/deployments/{deployment['id']}/create_flow_run", json={
            "parameters": deployment["parameters"], "state": {"type": "SCHEDULED"}}).json()
        deadline = time.monotonic() + 600
        while (state := http.get(f"/flow_runs/{run['id']}").json()["state"]["type"]) != (
                "COMPLETED"):
            assert state not in ("FAILED", "CRASHED", "CANCELLED"), (
                state, (tmp_path / "serve.log").read_text()[-4000:])
            assert time.monotonic() < deadline, state
            time.sleep(3)
    finally:
        stop(serve)
    # The audit in MLflow: named by the registered version, tagged, its data as an input.
    client = MlflowClient(mlflow_url)
    exp = client.get_experiment_by_name("vitsem/model_audit")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    name = next(n for n in runs if n.startswith(f"audit tiny@v{version} data:test "))
    audit = runs[name]
    parent = runs[next(n for n in runs if n.startswith(f"model audit tiny@v{version} "))]
    assert audit.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert audit.data.tags["vitsem.prefect.flow_run_id"]
    assert audit.data.tags["vitsem.prefect.deployment"] == "browser-audit"
    assert audit.inputs.dataset_inputs[0].dataset.digest == audit.data.tags[
        "vitsem.dataset.digest"]
    # ... and on the runs page a person opens.
    page = render(f"{mlflow_url}/#/experiments/{exp.experiment_id}/runs",
                  shots / "mlflow-runs.png")
    assert parent.info.run_name in page, page[-3000:]
    out = CliRunner().invoke(app, ["compare", "tiny", "--json"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert [r["run_id"] for r in rows] == [audit.info.run_id]
    if "VITSEM_SCREENSHOTS" not in os.environ:
        shutil.rmtree(shots, ignore_errors=True)
