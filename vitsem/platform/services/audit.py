"""The spurious-correlation audit of a labelled data set: views and keypoints from the keypoint
store, the audit, its report in the artifact store and its findings in SQL. A finished audit
of the same weights, images, labels and parameters is found in the store, not run again."""

from __future__ import annotations

import hashlib
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
from vitsem.data.remote import is_remote, read_bytes
from vitsem.digests import json_digest
from vitsem.errors import AuditInputError
from vitsem.method.images import open_image
from vitsem.method.keypoints import SiftParams, ViewedKeypoints
from vitsem.method.models import ModelSpec, save_checkpoint
from vitsem.paths import path_text
from vitsem.platform.services.context import ShardReport, context, load_model_cached
from vitsem.platform.services.keypoints import KeypointStore
from vitsem.platform.settings import Settings
from vitsem.platform.storage.artifacts import ArtifactStore
from vitsem.platform.storage.db import AuditFinding, upsert
from vitsem.platform.storage.reviews import load_reviews
from vitsem.render.audit_report import write_report

log = logging.getLogger("vitsem.platform.audit")

REPORT_PREFIX = "reports/spurious_audit"
REPAIR_METHOD = "dfr:pseudo"
"""The repair that needs no annotation: its model is saved, registered and re-audited."""
REPAIRED_FILE = "repaired-dfr-pseudo.safetensors"


@dataclass
class AuditReport:
    """What an audit run produced: the summary document, the report files (local copies,
    also in the artifact store under ``report_prefix``), the rejected images, the model
    family whose review decisions were carried and the repaired checkpoint, if any."""

    digest: str
    summary: dict[str, Any]
    files: list[Path]
    report_prefix: str
    report_uri: str
    cached: bool
    rejected: list[dict[str, str]]
    family: str = ""
    repaired: Path | None = None
    """The repaired checkpoint (safetensors, ``dfr:pseudo``) when the audit repaired."""


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


def split_heldout(images: Sequence[InputImage], fraction: float
                  ) -> tuple[list[InputImage], list[InputImage]]:
    """(audited, held out): ``fraction`` of each group's images held out for the repair,
    chosen by a hash of the file name (the same images on every run, whatever the order or
    where the data lie)."""
    if not 0.0 <= fraction < 1.0:
        raise AuditInputError(f"the held-out share must be in [0, 1), got {fraction}")
    by_group: dict[str, list[InputImage]] = {}
    for im in images:
        by_group.setdefault(str(im.group or im.label), []).append(im)
    held: set[str] = set()
    for members in by_group.values():
        ranked = sorted(members, key=lambda im: hashlib.sha256(Path(im.path).name.encode(
            "utf-8", "surrogateescape")).hexdigest())
        held.update(im.path for im in ranked[:round(fraction * len(members))])
    return ([im for im in images if im.path not in held],
            [im for im in images if im.path in held])


def _object_masks(kept: Sequence[InputImage], view: Any) -> np.ndarray | None:
    if not all(im.mask for im in kept):
        return None
    return np.stack([view_mask(np.asarray(_open_mask(str(im.mask)).convert("L")), view)
                     for im in kept])


def _open_mask(mask: str) -> Any:
    """A mask file, local or an ``s3://`` object."""
    return open_image(read_bytes(mask), name=mask) if is_remote(mask) else open_image(mask)


def _digest_cfg(cfg: AuditConfig) -> dict[str, Any]:
    """The audit settings that change its report: not the device (a report found in the
    store serves any device, and digests of reports stored before it existed hold)."""
    return {k: v for k, v in asdict(cfg).items() if k != "device"}


@dataclass
class _Loaded:
    data: AuditData
    images: list[InputImage]
    report: ShardReport


def _load(ctx: Any, dataset_id: int, view: Any, spec: ModelSpec, class_names: list[str],
          images: Sequence[InputImage], sift: SiftParams) -> _Loaded:
    """Views and keypoints of ``images`` from the keypoint store (computed where missing)."""
    report = ShardReport(0)
    store = KeypointStore(ctx, dataset_id, view, [im.path for im in images], sift,
                          report=report)
    kept: list[tuple[InputImage, ViewedKeypoints]] = []
    for im in images:
        item = store.get(im.path)
        if item is not None:
            kept.append((im, item))
    store.flush()
    if not kept:
        reasons = sorted({r["reason"] for r in report.rejected})
        raise AuditInputError(f"all {len(images)} images were rejected ({', '.join(reasons)});"
                              " nothing can be audited; see the rejected list and fix the files")
    names = [im for im, _ in kept]
    labels = label_indices(names, spec, len(class_names))[1]
    clean = (np.array([bool(im.clean) for im in names])
             if all(im.clean is not None for im in names) else None)
    data = AuditData(
        views=np.stack([it.view for _, it in kept]),
        keypoints=[it.keypoints for _, it in kept], labels=labels,
        class_names=class_names, groups=[str(im.group or im.label) for im in names],
        masks=_object_masks(names, view), clean=clean,
        names=[Path(path_text(im.path)).name for im in names])
    return _Loaded(data, names, report)


def _image_keys(loaded: _Loaded) -> list[str]:
    return sorted(f"{sha}:{im.label}:{im.group}" for sha, im in zip(
        loaded.report.image_sha256, loaded.images, strict=True))


def audit_images(settings: Settings, dataset_id: int, images: Sequence[InputImage],
                 model: str | None, checkpoint: str | None, cfg: AuditConfig = AuditConfig(),
                 meta: dict[str, Any] | None = None, sift: SiftParams = SiftParams(), *,
                 heldout: Sequence[InputImage] = (), family: str | None = None
                 ) -> AuditReport:
    """Audit ``model`` on labelled images: the report stored under
    ``reports/spurious_audit/<digest>/`` and its findings indexed in SQL. The review
    decisions recorded for the model ``family`` (default: the model's name) are carried.
    With ``heldout`` labelled images (of the same data set, not trained on), the last layer
    is repaired from the findings and the repaired checkpoint stored beside the report."""
    cfg.validate()
    ctx = context(settings)
    loaded = load_model_cached(model, checkpoint)
    net, spec, view = loaded.net, loaded.spec, loaded.view
    family = family or spec.name
    class_names, _ = label_indices(images, spec, int(getattr(net, "num_classes", 0)))
    main = _load(ctx, dataset_id, view, spec, class_names, images, sift)
    held = _load(ctx, dataset_id, view, spec, class_names, heldout, sift) if heldout else None
    reviews = load_reviews(ctx.meta, family)
    audit_digest = json_digest({
        "model": loaded.checksum, "cfg": _digest_cfg(cfg), "images": _image_keys(main),
        **({"heldout": _image_keys(held)} if held else {}),
        **({"family": family, "reviews": [
            {k: v for k, v in r.to_dict().items() if k != "decided_at"} for r in reviews]}
           if reviews else {})})
    prefix = f"{REPORT_PREFIX}/{audit_digest}"
    out = Path(tempfile.mkdtemp(prefix="vitsem-audit-"))
    cached = ctx.store.exists(f"{prefix}/files.json")
    if cached:
        log.info("audit %s found in the store", audit_digest)
        files = copy_report(ctx.store, prefix, out)
        summary = json.loads((out / "audit.json").read_text())
    else:
        log.info("auditing %d images with maps %s", len(main.data), ", ".join(cfg.maps))
        result = audit(net, view, main.data, cfg, heldout=held.data if held else None,
                       family=family, reviews=reviews)
        files = write_report(result, main.data, out, {
            "model": spec.name, "family": family,
            "checkpoint": Path(checkpoint).name if checkpoint else None,
            "model_checksum": loaded.checksum[:16], "audit_digest": audit_digest,
            "rejected": len(main.report.rejected), "reviews_carried": len(reviews),
            "heldout_images": len(held.data) if held else 0, **(meta or {})})
        summary = json.loads((out / "audit.json").read_text())
        repaired = result.repaired_models.get(REPAIR_METHOD)
        if repaired is not None:
            ckpt = save_checkpoint(repaired, spec, out / REPAIRED_FILE)
            ctx.store.put(f"{prefix}/{REPAIRED_FILE}", ckpt.read_bytes())
        for f in files:
            ctx.store.put(f"{prefix}/{f.name}", f.read_bytes())
        # files.json last: its presence marks a complete report in the store.
        ctx.store.put(f"{prefix}/files.json", json.dumps([f.name for f in files]).encode())
    repaired_path = None
    if ctx.store.exists(f"{prefix}/{REPAIRED_FILE}"):
        repaired_path = out / REPAIRED_FILE
        if not repaired_path.exists():
            repaired_path.write_bytes(ctx.store.get(f"{prefix}/{REPAIRED_FILE}"))
    report_uri = ctx.store.uri_for(f"{prefix}/report.html")
    _index_findings(settings, audit_digest, loaded.checksum, dataset_id, summary, report_uri,
                    family)
    return AuditReport(audit_digest, summary, files, prefix, report_uri, cached,
                       main.report.rejected + (held.report.rejected if held else []), family,
                       repaired_path)


def copy_report(store: ArtifactStore, prefix: str, out: Path) -> list[Path]:
    """Copy a stored report (every file its ``files.json`` lists) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in json.loads(store.get(f"{prefix}/files.json")):
        (out / name).write_bytes(store.get(f"{prefix}/{name}"))
        files.append(out / name)
    return files


def _index_findings(settings: Settings, audit_digest: str, checksum: str, dataset_id: int,
                    summary: dict[str, Any], report_uri: str, family: str) -> None:
    rows = [{
        "audit_digest": audit_digest, "model_checksum": checksum, "dataset_id": dataset_id,
        "map_name": map_name, "rank": f["rank"], "class_name": f["class_name"],
        "confirmed": bool(f["confirmed"]), "shortcut": bool(f["shortcut"]),
        "confidence": float(f["confidence"]), "effect": _finite(f["effect"]),
        "random_effect": _finite(f["random_effect"]),
        "evidence": {"family": family, **{k: _json_safe(v) for k, v in f.items()}},
        "report_uri": report_uri}
        for map_name, findings in summary["findings"].items() for f in findings]
    with context(settings).meta.session() as s:
        upsert(s, AuditFinding, rows, ["audit_digest", "map_name", "rank"])


def _json_safe(v: Any) -> Any:
    """``v`` with every non-finite float as None (PostgreSQL's JSON refuses NaN)."""
    if isinstance(v, float):
        return _finite(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _finite(v: Any) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
