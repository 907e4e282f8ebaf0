"""Runs that race or die: two identical flows started at the same moment on fresh stores
(SQLite and PostgreSQL), a run killed outright and reaped as crashed, stale temporary files
swept, the S3 client pool sized to the task concurrency, and the schema's migrations."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from tests.conftest import copy_test_images
from tests.services import postgres_database
from vitsem.cli import app
from vitsem.platform.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

RACE_CHILD = """
import json, sys, time
from pathlib import Path
from flows.attention_analysis import AnalysisParams, attention_analysis
ready, go = Path(sys.argv[3]), Path(sys.argv[4])
ready.write_text("ready")
while not go.exists():
    time.sleep(0.002)
out = attention_analysis(AnalysisParams(data=sys.argv[1], checkpoint=sys.argv[2],
                                        shard_size=2, examples=1))
print("RESULT " + json.dumps({k: out[k] for k in ("images", "computed", "cached", "rejected",
                                                   "mlflow_run_id")}))
"""

TABLES = ("datasets", "models", "images", "keypoint_sets", "analysis_shards", "flow_runs")


def _counts(url: str) -> dict[str, int]:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        out = {t: int(c.scalar(sa.text(f"SELECT count(*) FROM {t}"))) for t in TABLES}
        out["completed"] = int(c.scalar(sa.text(
            "SELECT count(*) FROM flow_runs WHERE status = 'completed'")))
    eng.dispose()
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Never-used metadata and MLflow stores: both runs must create their schemas."""
    if request.param == "sqlite":
        yield {"VITSEM_DATABASE_URL": f"sqlite:///{tmp_path / 'meta.db'}",
               "VITSEM_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        return
    with postgres_database() as meta, postgres_database() as mlflow_db:
        yield {"VITSEM_DATABASE_URL": meta, "VITSEM_MLFLOW_TRACKING_URI": mlflow_db}


@pytest.mark.usefixtures("prefect_api")
def test_two_identical_flows_started_together_both_complete(
        fresh_stores: dict[str, str], small_dataset: Path, small_checkpoint: Path,
        tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    folder = copy_test_images(small_dataset, tmp_path / "imgs", 5)
    (folder / "bad.png").write_bytes(b"not a png")
    env = {**os.environ, **fresh_stores, "PYTHONPATH": str(ROOT),
           "VITSEM_HOME": str(tmp_path / "home"), "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "VITSEM_ARTIFACT_URI": (tmp_path / "artifacts").as_uri()}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE_CHILD, str(folder),
                               str(small_checkpoint), str(tmp_path / f"ready{i}"), str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    deadline = time.monotonic() + 180
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.communicate()[0][-3000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.write_text("go")  # both imported everything: start them at the same moment
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    results = []
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
        assert "already exists" not in out and "IntegrityError" not in out, out[-4000:]
        results.append(json.loads(out.rsplit("RESULT ", 1)[1].splitlines()[0]))
    print(results)
    for r in results:
        assert r["images"] == 5 and r["rejected"] == 1
        assert r["computed"] + r["cached"] == 5
    # One run's rows, however the two interleaved: 6 files (5 keypoint sets), 3 shards of
    # 2, one data set and model; two completed run records.
    counts = _counts(fresh_stores["VITSEM_DATABASE_URL"])
    print(counts)
    assert counts == {"datasets": 1, "models": 1, "images": 6, "keypoint_sets": 5,
                      "analysis_shards": 3, "flow_runs": 2, "completed": 2}
    client = MlflowClient(fresh_stores["VITSEM_MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("vitsem/attention_analysis")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(r["mlflow_run_id"] for r in results)
    assert all(r.info.status == "FINISHED" for r in runs)


CRASH_CHILD = """
import sys
from flows.common import DataParams
from flows.sift_extraction import sift_extraction
sift_extraction(DataParams(data=sys.argv[1], split="train", checkpoint=sys.argv[2],
                           shard_size=2))
"""


def _statuses(url: str) -> list[str]:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        out = list(c.scalars(sa.text("SELECT status FROM flow_runs ORDER BY id")))
    eng.dispose()
    return out


@pytest.mark.usefixtures("prefect_api")
def test_a_killed_run_is_marked_crashed_and_its_temp_files_swept(
        small_dataset: Path, small_checkpoint: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("VITSEM_HOME", str(home))
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    # Report scratch folders are swept from the system's temporary folder: this test's own.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    old_scratch = scratch / "vitsem-analysis-old"
    old_scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(small_dataset),
                             str(small_checkpoint)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = Settings().resolved_database_url()
    store = home / "artifacts" / "keypoints"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if store.exists() and any(store.rglob("*.npz")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the flow ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: the row stays 'running'
    proc.wait()
    assert _statuses(url) == ["running"]
    # What a killed write leaves: a temporary file of the artifact store, an hour old.
    stale = store / ".tmp-killed"
    stale.write_bytes(b"half")
    fresh = store / ".tmp-live"
    fresh.write_bytes(b"being written")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(old_scratch, (old, old))
    result = CliRunner().invoke(app, ["db", "housekeeping"])
    print(result.output)
    assert result.exit_code == 0, result.output
    assert "1 run(s) marked crashed (1); 2 stale temporary file(s) removed" in " ".join(
        result.output.split())
    assert _statuses(url) == ["crashed"]
    assert not stale.exists() and not old_scratch.exists()
    assert fresh.exists()  # a live write's file is left alone


def test_next_run_reaps_dead_and_silent_runs_only(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from vitsem.platform.runs import _host, tracked_run
    from vitsem.platform.services.context import context
    from vitsem.platform.storage.db import FlowRun

    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer exists
    now = dt.datetime.now(dt.UTC)
    rows = {"dead here": (_host(), gone.pid, now),
            "silent elsewhere": ("other-host", 1, now - dt.timedelta(hours=1)),
            "alive elsewhere": ("other-host", 1, now),
            "alive here": (_host(), os.getpid(), now)}
    with context(settings).meta.session() as s:
        for name, (host, pid, beat) in rows.items():
            s.add(FlowRun(flow_name=name, host=host, pid=pid, heartbeat_at=beat))
    with tracked_run(settings, "next", {}):
        pass
    with context(settings).meta.session() as s:
        got = dict(s.execute(sa.select(FlowRun.flow_name, FlowRun.status)).all())
    assert got == {"dead here": "crashed", "silent elsewhere": "crashed",
                   "alive elsewhere": "running", "alive here": "running",
                   "next": "completed"}


def test_migrations_match_the_models_and_downgrade(tmp_path: Path) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext

    from vitsem.platform.storage.db import MIGRATIONS, Base, upgrade

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    eng = sa.create_engine(url)
    with eng.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == []
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = url
    command.downgrade(cfg, "0002")
    with eng.connect() as c:
        assert "heartbeat_at" not in {col["name"] for col in sa.inspect(c).get_columns(
            "flow_runs")}
    upgrade(url)
    with eng.connect() as c:
        assert "heartbeat_at" in {col["name"] for col in sa.inspect(c).get_columns(
            "flow_runs")}
    eng.dispose()


def test_s3_pool_holds_the_task_concurrency(s3_bucket: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from vitsem.platform.services.context import context

    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    settings = Settings(artifact_uri=f"s3://{s3_bucket}/pool", max_workers=24)
    store = context(settings).store
    assert store._client.meta.config.max_pool_connections == 26  # type: ignore[attr-defined]
    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")
    with ThreadPoolExecutor(24) as pool:  # as many callers at once as the runner has threads
        list(pool.map(lambda i: store.put(f"k/{i}", os.urandom(256 * 1024)), range(96)))
    full = [r for r in caplog.records if "Connection pool is full" in r.getMessage()]
    assert not full, full[0].getMessage()
