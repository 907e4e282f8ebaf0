"""The Prefect flows against a real Prefect API, with SQLite or PostgreSQL, a local folder or
a real S3 protocol server, threads or a Dask cluster."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from flows.attention_analysis import AnalysisParams, attention_analysis
from flows.common import DataParams, make_task_runner
from flows.sift_extraction import sift_extraction
from tests.conftest import copy_test_images
from tests.services import MotoServer, TcpProxy
from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset
from vitsem.errors import DatasetError
from vitsem.platform.settings import Settings

pytestmark = pytest.mark.usefixtures("prefect_api")


def _counts(url: str) -> dict[str, int]:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        out = {t: int(c.scalar(sa.text(f"SELECT count(*) FROM {t}")))
               for t in ("images", "keypoint_sets", "flow_runs", "analysis_shards")}
        out["rejected"] = int(c.scalar(sa.text(
            "SELECT count(*) FROM images WHERE status = 'rejected'")))
    eng.dispose()
    return out


@pytest.fixture
def folder(small_dataset: Path, tmp_path: Path) -> Path:
    d = copy_test_images(small_dataset, tmp_path / "imgs", 12)
    (d / "zero.png").write_bytes(b"")
    (d / "notes.jpg").write_bytes(b"not an image")
    return d


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("VITSEM_HOME", str(h))
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return h


def test_sift_flow_is_idempotent_and_records_bad_images(folder: Path, home: Path,
                                                        small_checkpoint: Path) -> None:
    params = DataParams(data=str(folder), checkpoint=str(small_checkpoint), shard_size=4)
    first = sift_extraction(params)
    assert first["computed"] == 12 and first["cached"] == 0 and first["rejected"] == 2
    assert first["rejected_reasons"] == ["empty_file", "not_an_image"]
    url = Settings().resolved_database_url()
    after_first = _counts(url)
    second = sift_extraction(params)
    assert second["computed"] == 0 and second["cached"] == 12 and second["rejected"] == 2
    after_second = _counts(url)
    assert after_first["images"] == after_second["images"] == 14
    assert after_first["rejected"] == after_second["rejected"] == 2
    assert after_first["keypoint_sets"] == after_second["keypoint_sets"] == 12
    assert after_second["flow_runs"] == 2
    eng = sa.create_engine(url)
    with eng.connect() as c:
        rows = dict(c.execute(sa.text(
            "SELECT path, rejection_reason FROM images WHERE status = 'rejected'")).all())
    assert {Path(p).name: r for p, r in rows.items()} == {"zero.png": "empty_file",
                                                          "notes.jpg": "not_an_image"}


def test_library_logs_reach_the_flow_runs_logs(folder: Path, home: Path,
                                               small_checkpoint: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    state = sift_extraction(DataParams(data=str(folder), checkpoint=str(small_checkpoint),
                                       shard_size=8), return_state=True)
    assert state.is_completed()
    APILogWorker.drain_all()  # logs travel to the API in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    text = "\n".join(log.message for log in logs)
    # What a person watching the run in the UI needs: inputs, progress, each rejection.
    assert "imgs: 14 images" in text
    assert "shard 0: 8 computed, 0 from the store, 0 rejected" in text
    assert "shard 1: 4 computed, 0 from the store, 2 rejected" in text
    assert "rejected zero.png: empty_file" in text
    assert "rejected notes.jpg: not_an_image" in text


def test_analysis_on_postgres_and_s3_dask_equals_threads(
        folder: Path, small_checkpoint: Path, pg_url: str, s3_bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_DATABASE_URL", pg_url)
    monkeypatch.setenv("VITSEM_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = AnalysisParams(data=str(folder), checkpoint=str(small_checkpoint), shard_size=4,
                            examples=1)
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/threads")
    threads = attention_analysis(params)
    assert threads["images"] == 12 and threads["rejected"] == 2 and threads["computed"] == 12
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/dask")
    dask_flow = attention_analysis.with_options(
        task_runner=make_task_runner(Settings(task_runner="dask", dask_workers=2)))
    on_dask = dask_flow(params)
    assert on_dask["computed"] == 12  # a fresh store: really computed on the cluster
    assert on_dask["layer_profile"] == threads["layer_profile"]


CRASH_CHILD = """
import sys
from flows.common import DataParams
from flows.sift_extraction import sift_extraction
sift_extraction(DataParams(data=sys.argv[1], split="train", checkpoint=sys.argv[2],
                           shard_size=2))
"""


def test_sigkill_midway_then_rerun_accounts_for_every_image_once(
        small_checkpoint: Path, home: Path, tmp_path: Path) -> None:
    data = make_shortcut_dataset(tmp_path / "crash", ShortcutSpec(n_train=300, n_test=0))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(data), str(small_checkpoint)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    store = home / "artifacts" / "keypoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if store.exists() and sum(1 for _ in store.rglob("*.npz")) >= 40:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the flow finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sum(1 for _ in store.rglob("*.npz"))
    assert 40 <= done_before < 300
    result = sift_extraction(DataParams(data=str(data), split="train",
                                        checkpoint=str(small_checkpoint), shard_size=2))
    assert result["cached"] >= done_before - 2  # a shard killed mid-way redoes its rest
    assert result["computed"] + result["cached"] == 300 and result["rejected"] == 0
    counts = _counts(Settings().resolved_database_url())
    assert counts["images"] == 300 and counts["keypoint_sets"] == 300
    files = list(store.rglob("*.npz"))
    assert len(files) == 300
    for f in files:  # no corrupt artifact: every stored file loads
        with np.load(f, allow_pickle=False) as z:
            assert z["xy"].shape[1] == 2


def test_bad_parameters_are_rejected(home: Path) -> None:
    with pytest.raises(ValidationError, match="shard_size"):
        DataParams(data="x", shard_size=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DataParams(data="x", chekpoint="typo.safetensors")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="weighting"):
        AnalysisParams(data="x", weighting="votes")  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="no such file"):
        sift_extraction(DataParams(data=str(home / "missing")))


def test_reports_in_store_and_summary(folder: Path, home: Path, small_checkpoint: Path) -> None:
    out = attention_analysis(AnalysisParams(data=str(folder), checkpoint=str(small_checkpoint),
                                            examples=1))
    reports = list((home / "artifacts" / "reports").rglob("stats.json"))
    assert len(reports) == 1
    doc = json.loads(reports[0].read_text())
    assert doc["num_images"] == 12 and doc["num_rejected"] == 2
    assert len(out["layer_profile"]) == 2


def test_s3_outage_longer_than_any_retry_window_ends_with_the_flow_completed(
        folder: Path, small_checkpoint: Path, moto: MotoServer, s3_bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    proxy = TcpProxy(moto.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/outage")
    # The endpoint is down from before the flow starts until OUTAGE s after botocore first
    # gave up (Prefect's start-up time varies, so a fixed timer may end the outage before
    # any request is made); 90 s at most, so a test that never reaches S3 ends. OUTAGE is
    # longer than botocore's whole window (4 attempts, < 0.4 s of backoff on connection
    # errors) and than Prefect's first retry delay (2 s +- 50%).
    outage = 6.0
    gave_up: list[float] = []

    def on_store_warning(record: logging.LogRecord) -> None:
        if not gave_up:
            gave_up.append(time.monotonic())
            threading.Timer(outage, proxy.up).start()

    recorder = logging.Handler(logging.WARNING)
    recorder.emit = on_store_warning  # type: ignore[method-assign]
    store_log = logging.getLogger("vitsem.platform.storage")
    store_log.addHandler(recorder)
    proxy.down()
    fallback = threading.Timer(90.0, proxy.up)
    fallback.start()
    try:
        state = sift_extraction(DataParams(data=str(folder), checkpoint=str(small_checkpoint),
                                           shard_size=4), return_state=True)
    finally:
        store_log.removeHandler(recorder)
        fallback.cancel()
    assert gave_up, "no S3 call failed: the outage was never hit"
    assert time.monotonic() - gave_up[0] >= outage
    assert state.is_completed()
    out = state.result()
    assert out["computed"] == 12 and out["rejected"] == 2
    # Prefect retried the tasks that met the outage (run_count > 1), with backoff.
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        flow_run_name = client.read_flow_run(state.state_details.flow_run_id).name
    assert max(r.run_count for r in runs) >= 2
    assert all(r.state is not None and r.state.is_completed() for r in runs)
    # Run names say what runs: flow, model, data set, shard.
    assert flow_run_name == "sift_extraction: tiny on imgs"
    assert {f"sift: tiny on imgs shard {i}" for i in range(3)} <= {r.name for r in runs}
    # Every image accounted for once.
    counts = _counts(Settings().resolved_database_url())
    assert counts["images"] == 14 and counts["keypoint_sets"] == 12 and counts["rejected"] == 2


def test_permanent_store_fault_fails_clearly_and_loses_nothing(
        folder: Path, small_checkpoint: Path, s3_bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/kept")
    params = DataParams(data=str(folder), checkpoint=str(small_checkpoint), shard_size=4)
    assert sift_extraction(params)["computed"] == 12
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", "s3://no-such-bucket-anywhere/x")
    t = time.monotonic()
    with pytest.raises(Exception, match=r"failed permanently.*check the bucket name"):
        sift_extraction(params)
    assert time.monotonic() - t < 30  # a permanent fault is not retried for minutes
    counts = _counts(Settings().resolved_database_url())
    assert counts["images"] == 14 and counts["keypoint_sets"] == 12
    eng = sa.create_engine(Settings().resolved_database_url())
    with eng.connect() as c:
        statuses = c.scalars(sa.text("SELECT status FROM flow_runs ORDER BY id")).all()
    eng.dispose()
    assert statuses == ["completed", "failed"]
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/kept")
    again = sift_extraction(params)
    assert again["cached"] == 12 and again["computed"] == 0
