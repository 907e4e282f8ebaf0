"""What every service shares: the stores of a settings object (opened once per process, as
tasks may run in Dask workers), the models it loads and the report a sharded step returns."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from vitsem.method.models import ModelSpec, load_model, model_checksum
from vitsem.method.view import ModelView
from vitsem.platform.settings import Settings
from vitsem.platform.storage.artifacts import ArtifactStore, open_store
from vitsem.platform.storage.db import MetadataStore, ModelRecord, upsert

log = logging.getLogger("vitsem.platform")


@dataclass
class ShardReport:
    """What one shard did: counts of work ``computed`` and found ``cached``, the files it
    rejected (path, reason, detail), the content hashes of the images it used, and where its
    result is stored."""

    shard: int
    computed: int = 0
    cached: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    image_sha256: list[str] = field(default_factory=list)
    artifact_key: str | None = None
    artifact_uri: str | None = None


@dataclass(frozen=True)
class Context:
    settings: Settings
    store: ArtifactStore
    meta: MetadataStore


@functools.lru_cache(maxsize=4)
def _context(settings_json: str) -> Context:
    settings = Settings.model_validate_json(settings_json)
    # Every task thread of the process shares the store: one connection each, two spare.
    return Context(settings, open_store(settings.resolved_artifact_uri(),
                                        settings.task_concurrency() + 2),
                   MetadataStore(settings.resolved_database_url()))


def context(settings: Settings) -> Context:
    """Stores for ``settings``, opened once per process."""
    return _context(settings.model_dump_json())


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode, its spec, a checksum of spec and weights file, and its view."""

    net: nn.Module
    spec: ModelSpec
    checksum: str
    view: ModelView
    source: str


@functools.lru_cache(maxsize=4)
def _load(model: str | None, checkpoint: str | None) -> LoadedModel:
    net, spec = load_model(model, checkpoint)
    checksum = model_checksum(spec, checkpoint)
    log.info("loaded model %s (%s)", spec.name, Path(checkpoint).name if checkpoint else "timm")
    return LoadedModel(net, spec, checksum, ModelView.from_model(net), checkpoint or spec.name)


def load_model_cached(model: str | None, checkpoint: str | None) -> LoadedModel:
    """The model loaded once per process; its checksum covers the spec and the weights file."""
    return _load(model, checkpoint)


def register_model(ctx: Context, loaded: LoadedModel) -> str:
    """Index the model in SQL (once per checksum); returns the checksum."""
    with ctx.meta.session() as s:
        upsert(s, ModelRecord, [{"checksum": loaded.checksum, "name": loaded.spec.name,
                                 "source": loaded.source,
                                 "spec": json.loads(loaded.spec.to_json())}], ["checksum"])
    return loaded.checksum
