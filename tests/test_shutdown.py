"""SIGTERM while the Prefect API is unreachable: a flow process and `vitsem serve` exit
within 10 s, the run is closed as crashed in the project's flow_runs, its rerun completes
with every image accounted for once, and Prefect's state of the killed run is set to
Crashed once the API is back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import sqlalchemy as sa

from flows.common import DataParams
from flows.sift_extraction import sift_extraction
from tests.services import TcpProxy
from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset
from vitsem.platform.settings import Settings

pytestmark = pytest.mark.usefixtures("prefect_api")

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys
from flows.common import DataParams
from flows.sift_extraction import sift_extraction
sift_extraction(DataParams(data=sys.argv[1], split="train", checkpoint=sys.argv[2],
                           shard_size=2))
"""


def _api_behind_proxy() -> TcpProxy:
    """A proxy in front of the test session's Prefect API, to take it down at will."""
    from prefect.settings import PREFECT_API_URL

    port = urlparse(str(PREFECT_API_URL.value())).port
    assert port is not None
    return TcpProxy(port)


def _env(tmp_path: Path, proxy: TcpProxy) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": f"{proxy.url}/api",
           "PREFECT_HOME": str(tmp_path / "prefect"), "VITSEM_HOME": str(tmp_path / "home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    return env


def _stop_in(proc: subprocess.Popen, limit: float) -> float:
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(limit + 20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - t


def test_sigterm_with_the_api_down_ends_a_flow_within_10_s_and_its_rerun_completes(
        small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import get_client

    data = make_shortcut_dataset(tmp_path / "data", ShortcutSpec(n_train=120, n_test=0))
    proxy = _api_behind_proxy()
    env = _env(tmp_path, proxy)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(small_checkpoint)],
                            env=env, stdout=(tmp_path / "child.log").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    store = tmp_path / "home" / "artifacts" / "keypoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if store.exists() and sum(1 for _ in store.rglob("*.npz")) >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
    proxy.down()  # Prefect's API is unreachable from here on
    took = _stop_in(proc, 10)
    log = (tmp_path / "child.log").read_text()
    print(f"flow process: exit {proc.returncode} {took:.1f} s after SIGTERM, API down")
    assert took < 10, log[-3000:]
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    url = Settings().resolved_database_url()
    eng = sa.create_engine(url)
    with eng.connect() as c:
        killed = c.execute(sa.text("SELECT status, prefect_flow_run_id FROM flow_runs")).all()
    assert [k[0] for k in killed] == ["crashed"]
    proxy.up()
    done_before = sum(1 for _ in store.rglob("*.npz"))
    result = sift_extraction(DataParams(data=str(data), split="train",
                                        checkpoint=str(small_checkpoint), shard_size=2))
    assert result["computed"] + result["cached"] == 120 and result["rejected"] == 0
    assert result["cached"] >= done_before - 2
    with eng.connect() as c:
        counts = {t: int(c.scalar(sa.text(f"SELECT count(*) FROM {t}")))
                  for t in ("images", "keypoint_sets")}
        statuses = c.scalars(sa.text("SELECT status FROM flow_runs ORDER BY id")).all()
    eng.dispose()
    assert counts == {"images": 120, "keypoint_sets": 120}
    assert statuses == ["crashed", "completed"]
    # The rerun told Prefect what the API could not hear at the time.
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(killed[0][1]).state
    assert state is not None and state.is_crashed(), state


def test_vitsem_serve_exits_within_10_s_of_sigterm_with_the_api_down(
        small_checkpoint: Path, tmp_path: Path) -> None:
    proxy = _api_behind_proxy()
    env = _env(tmp_path, proxy)
    log_path = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-c", "from vitsem.cli import app; app()", "serve", "--data",
         str(tmp_path), "--checkpoint", str(small_checkpoint)],
        env={**env, "COLUMNS": "300"}, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.monotonic() + 120
    while "Serving" not in log_path.read_text():
        assert serve.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "serve never started"
        time.sleep(0.2)
    time.sleep(1.0)  # the runner's loops are running
    proxy.down()
    took = _stop_in(serve, 10)
    print(f"vitsem serve: exit {serve.returncode} {took:.1f} s after SIGTERM, API down")
    assert took < 10, log_path.read_text()[-3000:]
