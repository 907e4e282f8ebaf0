"""The MLflow model registry as the source of the audited weights: ``models:/<name>@<alias>``
and ``models:/<name>/<version>`` resolve to a local vitsem checkpoint (safetensors, never
pickle), and a checkpoint finds its registered version by its checksum."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vitsem.errors import RegistryError
from vitsem.platform.lineage import RegistryVersion
from vitsem.platform.settings import Settings

__all__ = ["CHECKSUM_TAG", "is_model_uri", "parse_model_uri", "resolve_checkpoint",
           "resolve_version", "version_of_checksum"]

CHECKSUM_TAG = "vitsem.checksum"
"""Model-version tag: the checksum of the version's weights and spec (as the services compute
it), so an audit of a file finds the version it came from."""

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_URI = re.compile(rf"^models:/(?P<name>{_NAME})(?:@(?P<alias>{_NAME})|/(?P<version>[0-9]{{1,9}}))$")


def is_model_uri(text: str | None) -> bool:
    return bool(text) and str(text).startswith("models:/")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    m = _URI.match(uri)
    if m is None:
        raise RegistryError(
            f"{uri!r} is not a registered-model reference; write models:/<name>@<alias> "
            "(e.g. models:/vitsem-tiny-vit@champion) or models:/<name>/<version>")
    return m["name"], m["version"], m["alias"]


def resolve_version(client: Any, uri: str) -> RegistryVersion:
    """The registered version ``uri`` names now (an alias moves; a version does not)."""
    name, version, alias = parse_model_uri(uri)
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, version))
    except Exception as e:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise RegistryError(
            f"{uri}: the registry has no {what} of model {name!r} ({type(e).__name__}); list "
            f"them with `mlflow models` / the MLflow UI's Models page, or register one with "
            f"`vitsem model register`") from e
    return RegistryVersion(name, str(mv.version), alias)


def resolve_checkpoint(settings: Settings, client: Any, uri: str
                       ) -> tuple[Path, RegistryVersion]:
    """Download the version's checkpoint once into ``<home>/registry/<name>/<version>/`` and
    return its path. Only a ``.safetensors`` file is accepted: a version holding pickled
    weights is refused rather than loaded."""
    ref = resolve_version(client, uri)
    target = settings.home / "registry" / ref.name / ref.version
    if not target.is_dir():
        mv = client.get_model_version(ref.name, ref.version)
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            import mlflow.artifacts

            mlflow.artifacts.download_artifacts(artifact_uri=str(mv.source),
                                                dst_path=str(scratch))
            try:  # a version is immutable: whichever process renames first wins
                scratch.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    files = sorted(target.rglob("*.safetensors"))
    if len(files) != 1:
        raise RegistryError(
            f"{ref.uri} holds {len(files)} .safetensors files ({target}); a vitsem model "
            "version holds exactly one checkpoint: register it with `vitsem model register`")
    return files[0], ref


def version_of_checksum(client: Any, checksum: str) -> RegistryVersion | None:
    """The newest registered version whose weights have ``checksum``, or None."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", checksum):
        return None
    try:
        found = client.search_model_versions(f"tags.`{CHECKSUM_TAG}` = '{checksum}'")
    except Exception:  # a store without a registry (e.g. plain file store)
        return None
    if not found:
        return None
    newest = max(found, key=lambda mv: int(mv.version))
    return RegistryVersion(str(newest.name), str(newest.version))
