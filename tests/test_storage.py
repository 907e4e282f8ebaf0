"""Settings, the artifact store (local and a real S3 protocol server) and the SQL store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.services import MotoServer, ResettingServer, TcpProxy, postgres_database
from vitsem.errors import TransientServiceError
from vitsem.platform.settings import Settings, redact
from vitsem.platform.storage.artifacts import (
    DEFAULT_S3_ATTEMPTS,
    ArtifactConflictError,
    ArtifactStoreError,
    ArtifactStoreUnavailableError,
    LocalArtifactStore,
    S3ArtifactStore,
    content_key,
    open_store,
    validate_key,
)
from vitsem.platform.storage.db import Dataset, MetadataStore


def test_defaults_need_no_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path))
    s = Settings()
    assert s.resolved_database_url().startswith("sqlite:///")
    assert s.resolved_artifact_uri().startswith("file://")
    assert s.resolved_mlflow_uri().startswith("sqlite:///")
    monkeypatch.setenv("VITSEM_DATABASE_URL", "postgresql://u:pw@db/x")
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", "s3://b/p")
    s = Settings()
    assert s.resolved_database_url() == "postgresql://u:pw@db/x"
    assert s.resolved_artifact_uri() == "s3://b/p"


def test_secrets_are_redacted() -> None:
    secret = "hunter2-Very-Secret"
    s = Settings(database_url=f"postgresql+psycopg2://vitsem:{secret}@db:5432/v",
                 mlflow_tracking_uri=f"https://user:{secret}@mlflow.example")
    assert secret not in str(s.public_dict())
    assert secret not in repr(s)
    assert secret not in redact(f"aws_secret_access_key={secret} token: {secret}")
    assert redact("postgresql://u:p@h/db") == "postgresql://u:***@h/db"


def test_local_store_atomic_and_content_addressed(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "a"))
    key = content_key("keypoints", "ab" * 32, "p1", "npz")
    assert key == f"keypoints/p1/ab/{'ab' * 32}.npz"
    uri = store.put(key, b"one")
    assert store.put(key, b"one") == uri  # the same bytes again: nothing happens
    with pytest.raises(ArtifactConflictError):
        store.put(key, b"two")
    assert store.get(key) == b"one"
    store.replace("pointers/latest.json", b"1")
    assert store.replace("pointers/latest.json", b"2").endswith("pointers/latest.json")
    assert store.get("pointers/latest.json") == b"2"
    assert not list((tmp_path / "a").rglob(".tmp-*"))
    for bad in ("../x", "/abs", "a//b", "a/../b", "", "a b"):
        with pytest.raises(ArtifactStoreError):
            validate_key(bad)
    assert isinstance(open_store((tmp_path / "b").as_uri()), LocalArtifactStore)
    with pytest.raises(ArtifactStoreError, match="scheme"):
        open_store("ftp://host/x")


def test_s3_store_round_trip(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/pre")
    assert isinstance(store, S3ArtifactStore)
    assert store.put("a/b.bin", b"hello") == f"s3://{s3_bucket}/pre/a/b.bin"
    assert store.exists("a/b.bin") and not store.exists("a/c.bin")
    assert store.get("a/b.bin") == b"hello"
    with pytest.raises(ArtifactConflictError):
        store.put("a/b.bin", b"other")
    store.replace("a/b.bin", b"other")  # mutable keys are replaced on purpose
    assert store.get("a/b.bin") == b"other"
    store.put("a/b.bin", b"other")  # and are then the stored content


def test_s3_transient_faults_are_retried_by_botocore_only_then_surface_as_retryable(
        moto: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every connection is accepted and closed: botocore's standard mode retries it, and
    # the number of connections is the number of attempts of the one retry layer.
    resetting = ResettingServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", resetting.url)
    store = S3ArtifactStore(f"s3://{s3_bucket}/x")
    t = time.monotonic()
    with pytest.raises(ArtifactStoreUnavailableError, match=r"after 4 attempts.*is the endpoint"
                       ) as e:
        store.put("k", b"1")
    resetting.close()
    assert isinstance(e.value, TransientServiceError)  # what the flows' tasks retry
    assert resetting.connections == DEFAULT_S3_ATTEMPTS == 4  # one head, no loop around it
    assert time.monotonic() - t < 10  # the store waits for nothing itself
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert S3ArtifactStore(f"s3://{s3_bucket}/x").retries == {"mode": "adaptive",
                                                             "total_max_attempts": 2}
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    monkeypatch.delenv("AWS_RETRY_MODE")
    # An endpoint that is down for a while, then back: the same store works again.
    proxy = TcpProxy(moto.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    store = S3ArtifactStore(f"s3://{s3_bucket}/x")
    store.put("before", b"1")
    proxy.down()
    with pytest.raises(ArtifactStoreUnavailableError, match=r"ConnectionError|ConnectTimeout"):
        store.put("during", b"2")
    proxy.up()
    store.put("during", b"2")
    assert store.get("during") == b"2" and store.get("before") == b"1"


def test_s3_permanent_faults_fail_at_once_saying_what_to_fix(
        moto: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t = time.monotonic()
    with pytest.raises(ArtifactStoreError, match=r"permanently.*NoSuchBucket.*bucket name") as e:
        S3ArtifactStore("s3://no-such-bucket-here/x").put("k", b"1")
    assert not isinstance(e.value, TransientServiceError)
    assert "testing-secret-key" not in str(e.value)
    with pytest.raises(ArtifactStoreError, match="invalid artifact key"):
        S3ArtifactStore(f"s3://{s3_bucket}/x").put("../k", b"1")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ArtifactStoreError, match="no usable credentials: set AWS_ACCESS_KEY_ID"
                       ) as e:
        S3ArtifactStore(f"s3://{s3_bucket}/x").put("k", b"1")
    assert not isinstance(e.value, TransientServiceError)
    assert time.monotonic() - t < 10


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_and_unique_constraints(backend: str, tmp_path: Path) -> None:
    if backend == "sqlite":
        check_migrations_and_constraints(f"sqlite:///{tmp_path / 'm.db'}")
    else:
        with postgres_database() as url:  # its own database: other tests write to pg_url
            check_migrations_and_constraints(url)


def check_migrations_and_constraints(url: str) -> None:
    store = MetadataStore(url)
    MetadataStore(url)  # migrating twice is a no-op
    a = store.dataset("file:///d", "d")
    assert store.dataset("file:///d", "d") == a
    with store.engine.connect() as c:
        tables = set(sa.inspect(c).get_table_names())
        assert {"datasets", "images", "keypoint_sets", "models", "flow_runs",
                "analysis_shards", "alembic_version"} <= tables
        assert c.scalar(sa.select(sa.func.count()).select_from(Dataset)) == 1
    with pytest.raises(sa.exc.IntegrityError), store.session() as s:
        s.add(Dataset(uri="file:///d", name="again"))
    store.engine.dispose()
