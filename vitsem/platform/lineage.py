"""What a tracked run looked at and where it ran: the MLflow run's name, its tags and its
dataset input, so that two nightly audits can be told apart and compared in the runs table."""

from __future__ import annotations

import datetime as dt
import functools
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import vitsem
from vitsem.digests import json_digest

__all__ = ["Lineage", "RegistryVersion", "code_version", "dataset_digest"]

TAG_PREFIX = "vitsem."


@dataclass(frozen=True)
class RegistryVersion:
    """A version of a registered MLflow model: ``models:/<name>/<version>``."""

    name: str
    version: str
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def dataset_digest(image_sha256: Iterable[str]) -> str:
    """The digest of a data set's content: its images' sha256, order and names ignored, so a
    renamed or re-listed folder keeps its digest and one changed pixel changes it."""
    return json_digest(sorted(set(image_sha256)))


@functools.cache
def code_version() -> str:
    """``<package version>+g<commit>`` when running from a git checkout, else the version."""
    root = Path(vitsem.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return vitsem.__version__
    return f"{vitsem.__version__}+g{sha}" if sha else vitsem.__version__


@dataclass(frozen=True)
class Lineage:
    """The model, the data and the orchestration of one tracked run.

    ``kind`` names what ran (``audit``, ``analysis``, ``model audit``); ``cached`` says
    whether the result was found in the artifact store rather than computed."""

    kind: str
    model_name: str
    model_checksum: str
    dataset_name: str
    dataset_digest: str
    dataset_source: str
    num_images: int
    registry: RegistryVersion | None = None
    cached: bool | None = None
    flow_run_id: str | None = None
    flow_run_url: str | None = None
    deployment: str | None = None
    parent_run_id: str | None = None
    code: str = field(default_factory=code_version)
    date: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))

    def with_kind(self, kind: str, cached: bool | None = None) -> Lineage:
        return replace(self, kind=kind, cached=cached)

    @property
    def model_label(self) -> str:
        """``<registered name>@v<version>``, or ``<architecture>#<checksum>`` when the
        weights are not a registered version."""
        if self.registry is not None:
            return f"{self.registry.name}@v{self.registry.version}"
        return f"{self.model_name}#{self.model_checksum[:8]}"

    def run_name(self) -> str:
        """``audit vitsem-tiny-vit@v3 benchmark 2026-12-03``: what ran, on what, when."""
        return f"{self.kind} {self.model_label} {self.dataset_name} {self.date}"

    def tags(self) -> dict[str, str]:
        """MLflow tags; absent facts are left out rather than written as empty strings."""
        tags = {
            "model": self.model_name, "model.checksum": self.model_checksum,
            "model.label": self.model_label,
            "dataset": self.dataset_name, "dataset.digest": self.dataset_digest,
            "dataset.images": str(self.num_images), "code_version": self.code,
            "prefect.flow_run_id": self.flow_run_id, "prefect.flow_run_url": self.flow_run_url,
            "prefect.deployment": self.deployment,
        }
        if self.registry is not None:
            tags |= {"registered_model": self.registry.name,
                     "registered_model.version": self.registry.version,
                     "registered_model.uri": self.registry.uri}
        if self.cached is not None:
            tags["result"] = "cached" if self.cached else "computed"
        out = {TAG_PREFIX + k: v for k, v in tags.items() if v}
        if self.parent_run_id:
            out["mlflow.parentRunId"] = self.parent_run_id
        return out
