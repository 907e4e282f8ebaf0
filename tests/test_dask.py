"""Dask as the distributed engine: the runner chosen per run (a flow parameter), one cluster
per parent run, images addressed as s3:// URIs read by the workers themselves, and results
identical to the thread runner."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, ClassVar

import boto3
import pytest
from distributed import Client, LocalCluster

from flows.attention_analysis import AnalysisParams, attention_analysis
from flows.model_audit import ModelAuditParams, model_audit
from flows.runners import RunnerParams, shared_cluster, task_runner
from flows.spurious_audit import AuditParams, spurious_audit
from tests.services import MotoServer
from vitsem.data.inputs import resolve_inputs
from vitsem.data.shortcut import ShortcutDataset
from vitsem.errors import ConfigError

PER_CLASS = 3
IMAGES = 3 * PER_CLASS  # the small benchmark has three classes


def _worker_model_loads() -> int:
    """Models loaded in this (worker) process: > 0 when it ran a shard or the audit."""
    mod = sys.modules.get("vitsem.platform.services.context")
    return 0 if mod is None else int(mod._load.cache_info().misses)


class CountingCluster(LocalCluster):
    """A LocalCluster that counts its instances and, before it closes, asks each worker
    process how many models it loaded (i.e. whether tasks really ran there)."""

    started: ClassVar[list[str]] = []
    loads: ClassVar[dict[str, int]] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        CountingCluster.started.append(self.scheduler_address)

    def close(self, *args: Any, **kwargs: Any) -> Any:
        if self.status.name == "running":
            with Client(self) as client:
                CountingCluster.loads.update(client.run(_worker_model_loads))
        return super().close(*args, **kwargs)


def _s3(moto: MotoServer) -> Any:
    env = moto.env()
    return boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture
def s3_images(small_dataset: Path, moto: MotoServer, s3_bucket: str) -> str:
    """``PER_CLASS`` test images of each class under s3://<bucket>/data/<class>/, plus a
    note and a hidden file (rejected, as in a local folder)."""
    ds = ShortcutDataset.load(small_dataset)
    s3 = _s3(moto)
    counts: dict[str, int] = {}
    for s in ds.split("test"):
        if counts.get(s.class_name, 0) < PER_CLASS:
            counts[s.class_name] = counts.get(s.class_name, 0) + 1
            s3.put_object(Bucket=s3_bucket, Key=f"data/{s.class_name}/{Path(s.file).name}",
                          Body=(ds.root / s.file).read_bytes())
    assert sum(counts.values()) == IMAGES
    s3.put_object(Bucket=s3_bucket, Key="data/README.txt", Body=b"notes")
    s3.put_object(Bucket=s3_bucket, Key="data/.hidden/x.png", Body=b"")
    return f"s3://{s3_bucket}/data"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    for var in ("VITSEM_DATABASE_URL", "VITSEM_MLFLOW_TRACKING_URI", "VITSEM_TASK_RUNNER",
                "VITSEM_DASK_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def _reports(moto: MotoServer, bucket: str, prefix: str, kind: str) -> dict[str, bytes]:
    """Every file of the stored ``kind`` reports under ``prefix``, by its key below it."""
    s3 = _s3(moto)
    head = f"{prefix}/reports/{kind}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=head).get(
        "Contents", [])]
    return {k[len(head):]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_s3_folders_resolve_like_local_ones(s3_images: str) -> None:
    inputs = resolve_inputs(s3_images)
    assert inputs.labelled and len(inputs.items) == IMAGES
    assert all(it.path.startswith(s3_images + "/") for it in inputs.items)
    assert {it.label for it in inputs.items} == set(inputs.class_names or [])
    assert {(Path(r.path).name, r.reason) for r in inputs.rejected} == {
        ("README.txt", "unsupported_suffix"), ("x.png", "hidden")}


def test_runner_choices_are_checked_and_default_to_the_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSEM_TASK_RUNNER", "dask")
    monkeypatch.setenv("VITSEM_DASK_WORKERS", "3")
    monkeypatch.delenv("VITSEM_DASK_ADDRESS", raising=False)
    local = RunnerParams().resolved()
    assert local.kind == "dask" and local.cluster_kwargs["n_workers"] == 3
    assert RunnerParams(kind="thread").resolved().kind == "thread"
    monkeypatch.setenv("VITSEM_DASK_ADDRESS", "tcp://sched:8786")
    assert RunnerParams().resolved().address == "tcp://sched:8786"
    # cluster_class/adapt pass through to prefect-dask (dask-kubernetes, Coiled: configuration)
    runner = task_runner(RunnerParams(kind="dask", cluster_class="distributed.LocalCluster",
                                      cluster_kwargs={"n_workers": 0}, adapt_min=1,
                                      adapt_max=4))
    assert runner.adapt_kwargs == {"minimum": 1, "maximum": 4}
    assert runner.cluster_kwargs == {"n_workers": 0}
    with pytest.raises(ValueError, match="either a Dask scheduler address or a cluster"):
        RunnerParams(kind="dask", address="tcp://x:8786", adapt_max=2)
    with pytest.raises(ValueError, match="adapt_min 3 exceeds adapt_max 2"):
        RunnerParams(adapt_min=3, adapt_max=2)
    with pytest.raises(ConfigError, match=r"cannot use cluster class 'nowhere\.Cluster'"):
        task_runner(RunnerParams(kind="dask", cluster_class="nowhere.Cluster"))
    with pytest.raises(ConfigError, match="cannot use cluster class"), shared_cluster(
            RunnerParams(kind="dask", cluster_class="nowhere.Cluster")):
        pass


@pytest.mark.usefixtures("prefect_api")
def test_model_audit_on_s3_one_dask_cluster_equals_threads(
        s3_images: str, small_checkpoint: Path, home: Path, moto: MotoServer, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    params = ModelAuditParams(data=s3_images, checkpoint=str(small_checkpoint), shard_size=3,
                              examples=1, device="cpu")
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/threads")
    threads = model_audit(params, RunnerParams(kind="thread"))
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/dask")
    CountingCluster.started.clear()
    CountingCluster.loads.clear()
    on_dask = model_audit(params, RunnerParams(
        kind="dask", cluster_class=f"{__name__}.CountingCluster",
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True}))
    # One cluster for the parent run, its two worker processes loaded the model (they ran
    # the shards, the merge and the audit, reading the images from S3 themselves).
    assert len(CountingCluster.started) == 1
    assert len(CountingCluster.loads) == 2 and sum(CountingCluster.loads.values()) >= 2
    for run in (threads, on_dask):
        sift = run["sift_extraction"]
        assert sift["images"] == IMAGES and sift["rejected"] == 2
    # A fresh store: the Dask run computed everything again ...
    assert on_dask["sift_extraction"]["computed"] == IMAGES
    assert on_dask["attention_analysis"]["computed"] == IMAGES
    assert not on_dask["spurious_audit"]["cached_audit"]
    # ... and found the same numbers, byte for byte.
    stats = _reports(moto, s3_bucket, "threads", "attention_analysis")
    assert any(k.endswith("/stats.json") for k in stats)
    assert _reports(moto, s3_bucket, "dask", "attention_analysis") == stats
    a, b = threads["spurious_audit"], on_dask["spurious_audit"]
    assert a["audit_digest"] == b["audit_digest"]
    for part in ("findings", "prompts", "faithfulness"):  # as JSON: NaN equals NaN
        assert json.dumps(a[part], sort_keys=True) == json.dumps(b[part], sort_keys=True)
    audit_json = f"{a['audit_digest']}/audit.json"
    assert _reports(moto, s3_bucket, "dask", "spurious_audit")[audit_json] == (
        _reports(moto, s3_bucket, "threads", "spurious_audit")[audit_json])
    assert threads["attention_analysis"]["layer_profile"] == (
        on_dask["attention_analysis"]["layer_profile"])


@pytest.mark.usefixtures("prefect_api")
def test_analysis_runs_on_a_running_cluster_by_address(
        s3_images: str, small_checkpoint: Path, home: Path, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/address")
    params = AnalysisParams(data=s3_images, checkpoint=str(small_checkpoint), shard_size=4,
                            examples=0)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False) as cluster:
        out = attention_analysis(params, RunnerParams(kind="dask",
                                                      address=cluster.scheduler_address))
        with Client(cluster) as client:
            processed = client.run_on_scheduler(
                lambda dask_scheduler: sum(1 for ts in dask_scheduler.transition_log
                                           if ts[2] == "memory"))
    assert out["images"] == IMAGES and out["computed"] == IMAGES
    assert processed >= 3  # two shards and the merge ran on that cluster


@pytest.mark.usefixtures("prefect_api")
def test_audit_refuses_an_unknown_device_before_any_work(
        s3_images: str, small_checkpoint: Path, home: Path) -> None:
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        spurious_audit(AuditParams(data=s3_images, checkpoint=str(small_checkpoint),
                                   device="gpu"))
    assert not (home / "vitsem.db").exists()  # refused before the run record, or any work


def test_report_files_of_a_task_on_another_machine_are_read_back_from_the_store(
        tmp_path: Path) -> None:
    from flows.common import on_this_machine
    from vitsem.platform.services.context import context
    from vitsem.platform.settings import Settings

    settings = Settings(home=tmp_path / "home")
    context(settings).store.put("reports/x/stats.json", b'{"a": 1}')
    here = tmp_path / "here.json"
    here.write_text("{}")
    assert on_this_machine(settings, [here], "reports/x") == [here]  # written here: as is
    away = Path("/nonexistent-worker-tmp/stats.json")
    (got,) = on_this_machine(settings, [away], "reports/x")
    assert got != away and got.name == "stats.json" and got.read_bytes() == b'{"a": 1}'


def test_s3_inputs_missing_refused_or_unreachable_say_so(
        s3_images: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.services import free_port
    from vitsem.data.remote import InputUnavailableError, read_bytes
    from vitsem.errors import DatasetError, TransientServiceError

    first = resolve_inputs(s3_images).items[0].path
    assert read_bytes(first)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError):  # the keypoint store rejects it as unreadable
        read_bytes(f"{s3_images}/disc/gone.png")
    with pytest.raises(DatasetError, match="bucket does not exist"):
        resolve_inputs("s3://no-such-bucket-here/data")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(InputUnavailableError, match="retried later") as e:
        read_bytes(first)
    assert isinstance(e.value, TransientServiceError)  # the flows' tasks retry it
