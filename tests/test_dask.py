"""Dask as the distributed engine: the runner chosen per run (a flow parameter), one cluster
per parent run, images addressed as s3:// URIs read by the workers themselves, and results
identical to the thread runner."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
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
from vitsem.platform.services.audit import AuditReport, audit_images
from vitsem.platform.services.context import context
from vitsem.platform.settings import Settings

PER_CLASS = 3
IMAGES = 3 * PER_CLASS  # the small benchmark has three classes


def _worker_model_loads() -> int:
    """Models loaded in this (worker) process: > 0 when it ran a shard or the audit."""
    mod = sys.modules.get("vitsem.platform.services.context")
    return 0 if mod is None else int(mod._load.cache_info().misses)


AUDITED_MAPS: list[str] = []
"""In a worker process: the attribution maps its tasks audited."""


def _record_audited_maps() -> None:
    """In a worker process: note each map the audit's map tasks run here."""
    from vitsem.platform.services import audit

    run = audit.run_map

    def recorded(settings: Any, job: Any, name: str, device: str | None = None) -> Any:
        AUDITED_MAPS.append(name)
        return run(settings, job, name, device)

    audit.run_map = recorded  # type: ignore[assignment]


def _worker_audited_maps() -> list[str]:
    return list(AUDITED_MAPS)


class CountingCluster(LocalCluster):
    """A LocalCluster that counts its instances and, before it closes, asks each worker
    process how many models it loaded and which audit maps it ran (i.e. whether tasks
    really ran there)."""

    started: ClassVar[list[str]] = []
    loads: ClassVar[dict[str, int]] = {}
    maps: ClassVar[dict[str, list[str]]] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        CountingCluster.started.append(self.scheduler_address)
        with Client(self) as client:
            client.run(_record_audited_maps)

    def close(self, *args: Any, **kwargs: Any) -> Any:
        if self.status.name == "running":
            with Client(self) as client:
                CountingCluster.loads.update(client.run(_worker_model_loads))
                CountingCluster.maps.update(client.run(_worker_audited_maps))
        return super().close(*args, **kwargs)


def _audit_task_runs(since: datetime) -> list[tuple[str, bool]]:
    """(name, completed) of the audit's task runs started since ``since``."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterStartTime,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="audit"), start_time=TaskRunFilterStartTime(
                after_=since)))
    return sorted((r.name, r.state is not None and r.state.is_completed()) for r in runs
                  if r.name.startswith("audit"))


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


def _audit_in_one_process(data: str, params: AuditParams) -> AuditReport:
    """The audit of the labelled images under ``data`` by ``audit_images``, here."""
    settings = Settings()
    inputs = resolve_inputs(data)
    dataset_id = context(settings).meta.dataset(inputs.uri, inputs.name)
    return audit_images(settings, dataset_id, inputs.require_labels(), params.model,
                        params.checkpoint, params.config(),
                        {"data": params.data, "split": params.split})


@pytest.mark.usefixtures("prefect_api")
def test_model_audit_on_s3_one_dask_cluster_equals_threads(
        s3_images: str, small_checkpoint: Path, home: Path, moto: MotoServer, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    params = ModelAuditParams(data=s3_images, checkpoint=str(small_checkpoint), shard_size=3,
                              examples=1, device="cpu")
    since = datetime.now(UTC)
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/threads")
    threads = model_audit(params, RunnerParams(kind="thread"))
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/dask")
    CountingCluster.started.clear()
    CountingCluster.loads.clear()
    CountingCluster.maps.clear()
    on_dask = model_audit(params, RunnerParams(
        kind="dask", cluster_class=f"{__name__}.CountingCluster",
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True}))
    # One cluster for the parent run, its two worker processes loaded the model (they ran
    # the shards, the merge and the audit, reading the images from S3 themselves).
    assert len(CountingCluster.started) == 1
    assert len(CountingCluster.loads) == 2 and sum(CountingCluster.loads.values()) >= 2
    # The audit ran one task per map, spread over both workers, each map once.
    maps = AuditParams(data="x").config().maps
    assert sorted(m for ran in CountingCluster.maps.values() for m in ran) == sorted(maps)
    assert all(CountingCluster.maps.values()), CountingCluster.maps
    # In Prefect: per run a plan, one task per map (named by it) and the report, completed.
    runs = _audit_task_runs(since)
    names = ["audit plan: tiny on data", "audit report: tiny on data",
             *(f"audit: tiny on data map {m}" for m in maps)]
    assert runs == sorted((n, True) for n in names * 2)
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
    stored = _reports(moto, s3_bucket, "threads", "spurious_audit")[audit_json]
    assert _reports(moto, s3_bucket, "dask", "spurious_audit")[audit_json] == stored
    # The one-process path (the same steps, map after map) stores the same report.
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/single")
    single = _audit_in_one_process(s3_images, params.step(AuditParams))
    assert single.digest == a["audit_digest"] and not single.cached
    assert _reports(moto, s3_bucket, "single", "spurious_audit")[audit_json] == stored
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
