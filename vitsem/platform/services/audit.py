"""The spurious-correlation audit of a labelled data set: views and keypoints from the keypoint
store, the audit, its report in the artifact store and its findings in SQL. A finished audit
of the same weights, images, labels and parameters is found in the store, not run again."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vitsem.audit.benchmark import view_mask
from vitsem.audit.pipeline import (
    AuditConfig,
    AuditData,
    MapResult,
    assemble,
    audit_map,
    maps_to_audit,
    prepare,
)
from vitsem.audit.verdicts import ReviewDecision
from vitsem.data.inputs import InputImage
from vitsem.data.remote import is_remote, read_bytes
from vitsem.digests import json_digest
from vitsem.errors import AuditInputError
from vitsem.method.images import open_image
from vitsem.method.keypoints import SiftParams, ViewedKeypoints
from vitsem.method.models import ModelSpec, save_checkpoint
from vitsem.paths import path_text
from vitsem.platform.services.context import (
    LoadedModel,
    ShardReport,
    context,
    load_model_cached,
)
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


@dataclass(frozen=True)
class AuditJob:
    """One audit, planned: its ``digest`` (the report's address in the store), what it
    covers and the ``maps`` to audit, each of which any process can run
    (:func:`run_map`) before :func:`finish_audit` assembles the report. ``maps`` is empty
    when the report is stored already (``cached``) or no image holds a keypoint.
    ``inputs``/``heldout_inputs``: digests of the audited and held-out images' contents
    and labels, which every step checks (images replaced meanwhile fail the run instead of
    mixing two versions)."""

    digest: str
    dataset_id: int
    images: list[InputImage]
    heldout: list[InputImage]
    model: str | None
    checkpoint: str | None
    cfg: AuditConfig
    sift: SiftParams
    family: str
    reviews: list[ReviewDecision]
    meta: dict[str, Any]
    inputs: str
    heldout_inputs: str
    rejected: list[dict[str, str]]
    heldout_rejected: list[dict[str, str]]
    cached: bool
    maps: tuple[str, ...]

    @property
    def prefix(self) -> str:
        return f"{REPORT_PREFIX}/{self.digest}"


def plan_audit(settings: Settings, dataset_id: int, images: Sequence[InputImage],
               model: str | None, checkpoint: str | None, cfg: AuditConfig = AuditConfig(),
               meta: dict[str, Any] | None = None, sift: SiftParams = SiftParams(), *,
               heldout: Sequence[InputImage] = (), family: str | None = None) -> AuditJob:
    """The audit of ``model`` on labelled images, planned: views and keypoints loaded (and
    computed where missing), the data checked, the digest computed and the store asked for
    a finished report. The review decisions recorded for the model ``family`` (default: the
    model's name) are part of it."""
    cfg.validate()
    ctx = context(settings)
    loaded = load_model_cached(model, checkpoint)
    family = family or loaded.spec.name
    class_names, _ = label_indices(images, loaded.spec,
                                   int(getattr(loaded.net, "num_classes", 0)))
    main = _load(ctx, dataset_id, loaded.view, loaded.spec, class_names, images, sift)
    held = (_load(ctx, dataset_id, loaded.view, loaded.spec, class_names, heldout, sift)
            if heldout else None)
    reviews = load_reviews(ctx.meta, family)
    audit_digest = json_digest({
        "model": loaded.checksum, "cfg": _digest_cfg(cfg), "images": _image_keys(main),
        **({"heldout": _image_keys(held)} if held else {}),
        **({"family": family, "reviews": [
            {k: v for k, v in r.to_dict().items() if k != "decided_at"} for r in reviews]}
           if reviews else {})})
    cached = ctx.store.exists(f"{REPORT_PREFIX}/{audit_digest}/files.json")
    maps = () if cached else maps_to_audit(loaded.net, loaded.view, main.data, cfg)
    return AuditJob(audit_digest, dataset_id, list(images), list(heldout), model, checkpoint,
                    cfg, sift, family, list(reviews), dict(meta or {}),
                    json_digest(_image_keys(main)),
                    json_digest(_image_keys(held)) if held else "", main.report.rejected,
                    held.report.rejected if held else [], cached, maps)


def _job_data(settings: Settings, job: AuditJob, loaded: LoadedModel, heldout: bool = False
              ) -> _Loaded:
    """The audited (or the held-out) data of ``job``, loaded in this process (images read
    from where they lie, keypoints from the store), as they were when it was planned."""
    images, digest = (job.heldout, job.heldout_inputs) if heldout else (job.images,
                                                                         job.inputs)
    data = _load(context(settings), job.dataset_id, loaded.view, loaded.spec,
                 list(loaded.spec.class_names or []), images, job.sift)
    if json_digest(_image_keys(data)) != digest:
        raise AuditInputError(
            "the images or labels changed while they were being audited; run the audit "
            "again once the data set is settled")
    return data


def _on(cfg: AuditConfig, device: str | None) -> AuditConfig:
    """``cfg`` on ``device`` (the process's own choice; not part of the digest)."""
    return cfg if device is None else replace(cfg, device=device)


_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(net: Any) -> threading.Lock:
    """One audit step at a time on a model shared by a process's task threads: the GAE and
    Grad-CAM maps switch its attention path and hook its blocks for the call, which
    another thread's forward pass would see (and its results would differ from a run
    alone)."""
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(net)
        if lock is None:
            lock = _MODEL_LOCKS[net] = threading.Lock()
        return lock


def run_map(settings: Settings, job: AuditJob, name: str, device: str | None = None
            ) -> MapResult:
    """The audit of ``job`` with the map ``name`` (its heavy part), in this process: the
    model and the data are loaded here, so any worker that reaches the store and the images
    (``s3://`` URIs) can run it. ``device`` overrides ``job.cfg.device``."""
    if name not in job.maps:
        raise ValueError(f"map {name!r} is not one the audit runs ({list(job.maps)})")
    loaded = load_model_cached(job.model, job.checkpoint)
    cfg = _on(job.cfg, device)
    # The data are loaded under the lock too: map tasks on threads wait for it anyway, and
    # they then hold one copy of the views at a time instead of one each.
    with _model_lock(loaded.net):
        main = _job_data(settings, job, loaded)
        log.info("audit %s: map %s on %d images", job.digest[:12], name, len(main.data))
        return audit_map(loaded.net, prepare(loaded.net, loaded.view, main.data, cfg), cfg,
                         name)


def finish_audit(settings: Settings, job: AuditJob, maps: Sequence[MapResult],
                 device: str | None = None) -> AuditReport:
    """The report of ``job``: read back from the store when it was there, else assembled
    from the per-map results ``maps`` (one per map of ``job.maps``, any order), with the
    repair when ``job`` holds held-out images, and stored (``files.json`` last). Its
    findings are indexed in SQL either way."""
    ctx = context(settings)
    loaded = load_model_cached(job.model, job.checkpoint)
    prefix = job.prefix
    out = Path(tempfile.mkdtemp(prefix="vitsem-audit-"))
    if job.cached:
        log.info("audit %s found in the store", job.digest)
        files = copy_report(ctx.store, prefix, out)
    else:
        files = _assemble_and_store(settings, job, loaded, {m.audit.map: m for m in maps},
                                    out, _on(job.cfg, device))
    summary = json.loads((out / "audit.json").read_text())
    repaired_path = None
    if ctx.store.exists(f"{prefix}/{REPAIRED_FILE}"):
        repaired_path = out / REPAIRED_FILE
        if not repaired_path.exists():
            repaired_path.write_bytes(ctx.store.get(f"{prefix}/{REPAIRED_FILE}"))
    report_uri = ctx.store.uri_for(f"{prefix}/report.html")
    _index_findings(settings, job.digest, loaded.checksum, job.dataset_id, summary,
                    report_uri, job.family)
    return AuditReport(job.digest, summary, files, prefix, report_uri, job.cached,
                       job.rejected + job.heldout_rejected, job.family, repaired_path)


def _assemble_and_store(settings: Settings, job: AuditJob, loaded: LoadedModel,
                        maps: dict[str, MapResult], out: Path, cfg: AuditConfig
                        ) -> list[Path]:
    """Assemble ``job``'s result, write its report into ``out`` and put it in the store."""
    ctx = context(settings)
    main = _job_data(settings, job, loaded)
    held = _job_data(settings, job, loaded, heldout=True) if job.heldout else None
    net, spec = loaded.net, loaded.spec
    with _model_lock(net):
        result = assemble(net, loaded.view, main.data,
                          prepare(net, loaded.view, main.data, cfg), maps, cfg,
                          heldout=held.data if held else None, family=job.family,
                          reviews=job.reviews)
    files = write_report(result, main.data, out, {
        "model": spec.name, "family": job.family,
        "checkpoint": Path(job.checkpoint).name if job.checkpoint else None,
        "model_checksum": loaded.checksum[:16], "audit_digest": job.digest,
        "rejected": len(job.rejected), "reviews_carried": len(job.reviews),
        "heldout_images": len(held.data) if held else 0, **job.meta})
    repaired = result.repaired_models.get(REPAIR_METHOD)
    if repaired is not None:
        ckpt = save_checkpoint(repaired, spec, out / REPAIRED_FILE)
        ctx.store.put(f"{job.prefix}/{REPAIRED_FILE}", ckpt.read_bytes())
    for f in files:
        ctx.store.put(f"{job.prefix}/{f.name}", f.read_bytes())
    # files.json last: its presence marks a complete report in the store.
    ctx.store.put(f"{job.prefix}/files.json", json.dumps([f.name for f in files]).encode())
    return files


def audit_images(settings: Settings, dataset_id: int, images: Sequence[InputImage],
                 model: str | None, checkpoint: str | None, cfg: AuditConfig = AuditConfig(),
                 meta: dict[str, Any] | None = None, sift: SiftParams = SiftParams(), *,
                 heldout: Sequence[InputImage] = (), family: str | None = None
                 ) -> AuditReport:
    """Audit ``model`` on labelled images in this process: the report stored under
    ``reports/spurious_audit/<digest>/`` and its findings indexed in SQL. The review
    decisions recorded for the model ``family`` (default: the model's name) are carried.
    With ``heldout`` labelled images (of the same data set, not trained on), the last layer
    is repaired from the findings and the repaired checkpoint stored beside the report.
    The flow runs the same steps as tasks: :func:`plan_audit`, :func:`run_map` per map,
    :func:`finish_audit`."""
    job = plan_audit(settings, dataset_id, images, model, checkpoint, cfg, meta, sift,
                     heldout=heldout, family=family)
    log.info("auditing %d images with maps %s", len(job.images), ", ".join(job.maps))
    return finish_audit(settings, job, [run_map(settings, job, m) for m in job.maps])


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
