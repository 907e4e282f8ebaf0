"""Service configuration: one settings object, env prefix ``VITSEM_``.

Every default needs no server: a SQLite file, a local artifact folder and a local MLflow
store under ``home``, and Prefect's ephemeral API (Prefect reads ``PREFECT_API_URL`` itself).
Point them at real services with ``VITSEM_DATABASE_URL`` (PostgreSQL),
``VITSEM_ARTIFACT_URI`` (``s3://bucket/prefix``; endpoint and credentials from the standard
AWS variables, e.g. ``AWS_ENDPOINT_URL`` for MinIO) and ``VITSEM_MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]+:)(?P<pw>[^@\s]+)@")
_SECRET_PARAMS = re.compile(
    r"(?i)(?P<key>(aws_)?(secret|password|passwd|token|access_key_id|secret_access_key|"
    r"session_token)[a-z_]*)(?P<sep>['\"]?\s*[=:]\s*['\"]?)(?P<val>[^\s'\"&,}]+)"
)


def redact(text: str) -> str:
    """``text`` with URL passwords and ``key=value`` secrets replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _SECRET_PARAMS.sub(r"\g<key>\g<sep>***", text)


class Settings(BaseSettings):
    """Where vitsem keeps things. Fields map to ``VITSEM_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="VITSEM_", extra="ignore")

    home: Path = Field(default=Path("vitsem-work"), description="Local working folder.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<home>/vitsem.db")
    artifact_uri: str | None = Field(
        default=None, description="file:// folder or s3://bucket/prefix; default <home>/artifacts")
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default sqlite:///<home>/mlflow.db")
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = Field(
        default=None, description="Scheduler of an existing Dask cluster; default: a local one")
    dask_workers: int = Field(default=2, description="Workers of the local Dask cluster.")
    max_workers: int | None = Field(
        default=None, ge=1, description="Threads of the thread runner; default min(32, cores + 4).")
    shard_size: int = Field(default=64, ge=1, description="Images per task.")

    def task_concurrency(self) -> int:
        """Tasks that run at once in one process: the thread runner's threads (Python's
        ThreadPoolExecutor default unless ``max_workers`` is set); 1 per Dask worker."""
        if self.task_runner == "dask":
            return 1
        return self.max_workers or min(32, (os.cpu_count() or 1) + 4)

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'vitsem.db').resolve()}"

    def resolved_artifact_uri(self) -> str:
        return self.artifact_uri or (self.home / "artifacts").resolve().as_uri()

    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    def public_dict(self) -> dict[str, str]:
        """The resolved settings with every secret redacted: safe to log or show."""
        return {
            "home": str(self.home),
            "database_url": redact(self.resolved_database_url()),
            "artifact_uri": redact(self.resolved_artifact_uri()),
            "mlflow_tracking_uri": redact(self.resolved_mlflow_uri()),
            "task_runner": self.task_runner,
            "shard_size": str(self.shard_size),
        }

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            yield key, redact(value) if isinstance(value, str) else value
