"""The spurious-correlation audit of a labelled data set: views and keypoints from the keypoint
store, the audit, its report in the artifact store and its findings in SQL. A finished audit
of the same weights, images, labels and parameters is found in the store, not run again."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitsem.audit.benchmark import view_mask
from vitsem.audit.pipeline import AuditConfig, AuditData, audit
from vitsem.data.inputs import InputImage
from vitsem.digests import json_digest
from vitsem.errors import AuditInputError
from vitsem.method.images import open_image
from vitsem.method.keypoints import SiftParams, ViewedKeypoints
from vitsem.method.models import ModelSpec
from vitsem.paths import path_text
from vitsem.platform.services.context import ShardReport, context, load_model_cached
from vitsem.platform.services.keypoints import KeypointStore
from vitsem.platform.settings import Settings
from vitsem.platform.storage.artifacts import ArtifactStore
from vitsem.platform.storage.db import AuditFinding, upsert
from vitsem.render.audit_report import write_report

log = logging.getLogger("vitsem.platform.audit")

REPORT_PREFIX = "reports/spurious_audit"


@dataclass
class AuditReport:
    """What an audit run produced: the summary document, the report files (local copies,
    also in the artifact store under ``report_prefix``) and the rejected images."""

    digest: str
    summary: dict[str, Any]
    files: list[Path]
    report_prefix: str
    report_uri: str
    cached: bool
    rejected: list[dict[str, str]]


def label_indices(images: Sequence[InputImage], spec: ModelSpec, num_classes: int
                  ) -> tuple[list[str], np.ndarray]:
    """The model's class names and each image's label as an index into them."""
    names = spec.class_names
    if names is None:
        raise AuditInputError(
            f"model {spec.name} carries no class names, so its outputs cannot be matched to "
            "the labels; audit a vitsem checkpoint (saved with its classes) or one trained "
            "on the labels' classes")
    unknown = sorted({str(im.label) for im in images} - set(names))
    if unknown or len(names) != num_classes:
        raise AuditInputError(
            f"the labels {unknown[:8]} are not classes of the model (it predicts "
            f"{names[:8]}{'...' if len(names) > 8 else ''}); audit the model on data of its "
            "own classes")
    index = {n: i for i, n in enumerate(names)}
    return list(names), np.array([index[str(im.label)] for im in images], np.int64)


def _object_masks(kept: Sequence[InputImage], view: Any) -> np.ndarray | None:
    if not all(im.mask for im in kept):
        return None
    return np.stack([view_mask(np.asarray(open_image(str(im.mask)).convert("L")), view)
                     for im in kept])


def audit_images(settings: Settings, dataset_id: int, images: Sequence[InputImage],
                 model: str | None, checkpoint: str | None, cfg: AuditConfig = AuditConfig(),
                 meta: dict[str, Any] | None = None, sift: SiftParams = SiftParams()
                 ) -> AuditReport:
    """Audit ``model`` on labelled images: the report stored under
    ``reports/spurious_audit/<digest>/`` and its findings indexed in SQL."""
    cfg.validate()
    ctx = context(settings)
    loaded = load_model_cached(model, checkpoint)
    net, spec, view = loaded.net, loaded.spec, loaded.view
    class_names, _ = label_indices(images, spec, int(getattr(net, "num_classes", 0)))
    sift_report = ShardReport(0)
    store = KeypointStore(ctx, dataset_id, view, [im.path for im in images], sift,
                          report=sift_report)
    kept: list[tuple[InputImage, ViewedKeypoints]] = []
    for im in images:
        item = store.get(im.path)
        if item is not None:
            kept.append((im, item))
    store.flush()
    if not kept:
        reasons = sorted({r["reason"] for r in sift_report.rejected})
        raise AuditInputError(f"all {len(images)} images were rejected ({', '.join(reasons)});"
                              " nothing can be audited; see the rejected list and fix the files")
    labels = label_indices([im for im, _ in kept], spec, len(class_names))[1]
    audit_digest = json_digest({
        "model": loaded.checksum, "cfg": asdict(cfg), "images": sorted(
            f"{sha}:{im.label}:{im.group}" for sha, (im, _) in zip(
                sift_report.image_sha256, kept, strict=True))})
    prefix = f"{REPORT_PREFIX}/{audit_digest}"
    out = Path(tempfile.mkdtemp(prefix="vitsem-audit-"))
    cached = ctx.store.exists(f"{prefix}/files.json")
    if cached:
        log.info("audit %s found in the store", audit_digest)
        files = copy_report(ctx.store, prefix, out)
        summary = json.loads((out / "audit.json").read_text())
    else:
        names = [im for im, _ in kept]
        clean = (np.array([bool(im.clean) for im in names])
                 if all(im.clean is not None for im in names) else None)
        data = AuditData(
            views=np.stack([it.view for _, it in kept]),
            keypoints=[it.keypoints for _, it in kept], labels=labels,
            class_names=class_names, groups=[str(im.group or im.label) for im in names],
            masks=_object_masks(names, view), clean=clean,
            names=[Path(path_text(im.path)).name for im in names])
        log.info("auditing %d images with maps %s", len(kept), ", ".join(cfg.maps))
        result = audit(net, view, data, cfg)
        files = write_report(result, data, out, {
            "model": spec.name, "checkpoint": Path(checkpoint).name if checkpoint else None,
            "model_checksum": loaded.checksum[:16], "audit_digest": audit_digest,
            "rejected": len(sift_report.rejected), **(meta or {})})
        summary = json.loads((out / "audit.json").read_text())
        for f in files:
            ctx.store.put(f"{prefix}/{f.name}", f.read_bytes())
        # files.json last: its presence marks a complete report in the store.
        ctx.store.put(f"{prefix}/files.json", json.dumps([f.name for f in files]).encode())
    report_uri = ctx.store.uri_for(f"{prefix}/report.html")
    _index_findings(settings, audit_digest, loaded.checksum, dataset_id, summary, report_uri)
    return AuditReport(audit_digest, summary, files, prefix, report_uri, cached,
                       sift_report.rejected)


def copy_report(store: ArtifactStore, prefix: str, out: Path) -> list[Path]:
    """Copy a stored report (every file its ``files.json`` lists) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in json.loads(store.get(f"{prefix}/files.json")):
        (out / name).write_bytes(store.get(f"{prefix}/{name}"))
        files.append(out / name)
    return files


def _index_findings(settings: Settings, audit_digest: str, checksum: str, dataset_id: int,
                    summary: dict[str, Any], report_uri: str) -> None:
    rows = [{
        "audit_digest": audit_digest, "model_checksum": checksum, "dataset_id": dataset_id,
        "map_name": map_name, "rank": f["rank"], "class_name": f["class_name"],
        "confirmed": bool(f["confirmed"]), "shortcut": bool(f["shortcut"]),
        "confidence": float(f["confidence"]), "effect": _finite(f["effect"]),
        "random_effect": _finite(f["random_effect"]),
        "evidence": {k: _finite(v) if isinstance(v, float) else v for k, v in f.items()},
        "report_uri": report_uri}
        for map_name, findings in summary["findings"].items() for f in findings]
    with context(settings).meta.session() as s:
        upsert(s, AuditFinding, rows, ["audit_digest", "map_name", "rank"])


def _finite(v: Any) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
