"""Metadata store: SQLAlchemy 2 models, sessions and Alembic migrations.

Unique constraints make reruns idempotent: the same image, keypoint set, model or analysis
shard is one row however often a flow runs. Works on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from vitsem.errors import VitsemError
from vitsem.platform.settings import redact

MIGRATIONS = Path(__file__).with_name("migrations")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    uri: Mapped[str] = mapped_column(String(1024), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Image(Base):
    """One input file of a data set; ``status`` is ``ok`` or ``rejected`` (with a reason)."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_id", "path", name="uq_image_dataset_path"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    rejection_reason: Mapped[str | None] = mapped_column(String(64))
    rejection_detail: Mapped[str | None] = mapped_column(Text)


class KeypointSet(Base):
    """SIFT keypoints of one image content under one (view, SIFT) parameter set."""

    __tablename__ = "keypoint_sets"
    __table_args__ = (UniqueConstraint("image_sha256", "params_digest", name="uq_keypoints"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    image_sha256: Mapped[str] = mapped_column(String(64))
    params_digest: Mapped[str] = mapped_column(String(64))
    artifact_uri: Mapped[str] = mapped_column(String(1024))
    num_keypoints: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ModelRecord(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    checksum: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(1024))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)


class FlowRun(Base):
    __tablename__ = "flow_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    flow_name: Mapped[str] = mapped_column(String(128), index=True)
    prefect_flow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(32), default="running", index=True)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    host: Mapped[str | None] = mapped_column(String(255))
    """Machine and process of a ``running`` run, and when it last showed life: a run whose
    process is gone, or whose heartbeat stopped, is closed as ``crashed`` by the next run."""
    pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class AnalysisShard(Base):
    """Streaming statistics of one shard of images under one model and parameter set."""

    __tablename__ = "analysis_shards"
    __table_args__ = (UniqueConstraint("model_checksum", "params_digest", "shard_digest",
                                       name="uq_analysis_shard"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_checksum: Mapped[str] = mapped_column(String(64))
    params_digest: Mapped[str] = mapped_column(String(64))
    shard_digest: Mapped[str] = mapped_column(String(64))
    artifact_uri: Mapped[str] = mapped_column(String(1024))
    num_images: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AuditFinding(Base):
    """One candidate shortcut of a spurious-correlation audit: which map found it, where
    it ranks, its evidence and whether the causal check confirmed it. ``audit_digest``
    identifies the audit (model weights, images, labels, parameters), so a rerun of the
    same audit adds no rows."""

    __tablename__ = "audit_findings"
    __table_args__ = (UniqueConstraint("audit_digest", "map_name", "rank",
                                       name="uq_audit_finding"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    audit_digest: Mapped[str] = mapped_column(String(64), index=True)
    model_checksum: Mapped[str] = mapped_column(String(64), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    map_name: Mapped[str] = mapped_column(String(32))
    rank: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(256))
    confirmed: Mapped[bool] = mapped_column(Boolean)
    shortcut: Mapped[bool] = mapped_column(Boolean)
    confidence: Mapped[float] = mapped_column(Float)
    effect: Mapped[float | None] = mapped_column(Float)
    random_effect: Mapped[float | None] = mapped_column(Float)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    report_uri: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ReviewDecisionRow(Base):
    """A person's decision (``shortcut`` / ``legitimate``) on a confirmed pattern of a model
    family: what identifies the pattern again in later audits (class, signature, descriptor
    centroids and radii, see :func:`vitsem.audit.verdicts.same_pattern`), its excess removal
    effect when decided, who decided and why. One row per pattern: a new decision on the
    same pattern replaces the old one."""

    __tablename__ = "review_decisions"
    __table_args__ = (UniqueConstraint("family", "class_name", "signature",
                                       name="uq_review_decision"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    family: Mapped[str] = mapped_column(String(256), index=True)
    class_name: Mapped[str] = mapped_column(String(256))
    signature: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))
    centroids: Mapped[list[Any]] = mapped_column(JSON)
    radii: Mapped[list[Any]] = mapped_column(JSON)
    excess_effect: Mapped[float | None] = mapped_column(Float)
    reviewer: Mapped[str] = mapped_column(String(256))
    note: Mapped[str] = mapped_column(Text)
    finding_id: Mapped[int | None] = mapped_column(Integer)
    """The ``audit_findings`` row it was decided on, and that row's audit."""
    audit_digest: Mapped[str | None] = mapped_column(String(64))
    decided_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


def upsert(session: Session, model: type[Base], rows: Sequence[dict[str, Any]],
           keys: Sequence[str], update: Sequence[str] = ()) -> None:
    """Atomic INSERT ... ON CONFLICT (``keys``) DO NOTHING, or DO UPDATE of the ``update``
    columns, for SQLite and PostgreSQL: safe when concurrent runs insert the same row."""
    if not rows:
        return
    insert: Any = postgresql.insert if session.get_bind().dialect.name == "postgresql" \
        else sqlite.insert
    stmt = insert(model.__table__).values(list(rows))
    if update:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys),
                                          set_={k: stmt.excluded[k] for k in update})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    session.execute(stmt)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and foreign keys so threads can share it."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except Exception as e:  # bad URL or missing driver
        raise VitsemError(f"cannot use database {redact(url)}: {e}") from None
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    return engine


@contextmanager
def serialised(url: str, name: str) -> Iterator[None]:
    """Hold the lock ``name`` of the database at ``url``: one holder at a time among the
    threads and processes of this machine (a lock file), and for PostgreSQL among every
    client of the server too (an advisory lock). For one-off set-up that is not safe to run
    twice at once: creating a schema, applying migrations."""
    digest = hashlib.sha256(f"{redact(url)}\0{name}".encode()).digest()
    lock_path = Path(tempfile.gettempdir()) / f"vitsem-{name}-{digest[:8].hex()}.lock"
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if url.startswith("postgresql"):
                key = int.from_bytes(digest[:8], "big", signed=True)
                engine = create_engine(url)
                try:
                    with engine.connect() as conn:
                        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                        conn.commit()
                        try:
                            yield
                        finally:
                            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                            conn.commit()
                finally:
                    engine.dispose()
            else:
                yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations to ``url`` (``vitsem db upgrade``); concurrent callers
    take turns (:func:`serialised`), so two runs starting on a fresh database both work."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = url
    with serialised(url, "migrate"):
        command.upgrade(cfg, revision)


class MetadataStore:
    """Sessions over a migrated database."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        if migrate:
            upgrade(url)
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def dataset(self, uri: str, name: str) -> int:
        """The id of the data set at ``uri``, created on first use (an atomic upsert, so
        concurrent runs on one data set get one row)."""
        with self.session() as s:
            upsert(s, Dataset, [{"uri": uri, "name": name, "created_at": _now()}], ["uri"])
            found = s.scalar(select(Dataset.id).where(Dataset.uri == uri))
            assert found is not None
            return found

    def record_rejected(self, dataset_id: int, rejected: Sequence[dict[str, str]]) -> None:
        """Index entries of a data set that are not images to process (``path``, ``reason``,
        ``detail``) as ``rejected`` images, once however often they are seen."""
        rows = [{"dataset_id": dataset_id, "path": r["path"], "sha256": None,
                 "size_bytes": None, "status": "rejected", "rejection_reason": r["reason"],
                 "rejection_detail": r["detail"]} for r in rejected]
        with self.session() as s:
            for i in range(0, len(rows), 500):  # within SQLite's bound on parameters
                upsert(s, Image, rows[i:i + 500], ["dataset_id", "path"],
                       update=["status", "rejection_reason", "rejection_detail"])

    def __repr__(self) -> str:
        return f"MetadataStore({redact(self.url)!r})"
