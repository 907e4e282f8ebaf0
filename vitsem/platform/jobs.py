"""Sharded, idempotent units of work over the stores: what the Prefect tasks call.

Each function takes plain values (paths, digests, settings) and can be called and tested
without Prefect. Results are content-addressed in the artifact store and indexed in SQL, so
a rerun (or a rerun after a crash) finds finished work instead of repeating it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from vitsem.audit.benchmark import AUDIT_SIFT, view_mask
from vitsem.audit.pipeline import AuditConfig, AuditData, audit
from vitsem.data.inputs import LabelledImage
from vitsem.data.shortcut import ShortcutDataset
from vitsem.errors import AuditInputError, ImageError, PretrainInputError
from vitsem.method.concentration import TokenGrid
from vitsem.method.images import ImageLimits, open_image
from vitsem.method.keypoints import Keypoints, Rejected, SiftParams, ViewedKeypoints, detect_sift
from vitsem.method.models import ModelSpec, load_model, save_checkpoint
from vitsem.method.pipeline import AnalysisConfig, AnalysisResult, analyze_batch, new_analysis
from vitsem.method.stats import StatsAccumulator
from vitsem.method.view import ModelView
from vitsem.platform.settings import Settings
from vitsem.platform.storage.artifacts import ArtifactStore, content_key, open_store, sha256_bytes
from vitsem.platform.storage.db import (
    AnalysisShard,
    AuditFinding,
    Image,
    KeypointSet,
    MetadataStore,
    ModelRecord,
)
from vitsem.pretrain.data import encoder_view, semantic_weights
from vitsem.pretrain.loop import PretrainConfig, PretrainData, PretrainState, pretrain, save_state
from vitsem.render.audit_report import write_report


@dataclass
class ShardReport:
    """What one shard did: counts of work ``computed`` and found ``cached``, and rejects."""

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
    return Context(settings, open_store(settings.resolved_artifact_uri()),
                   MetadataStore(settings.resolved_database_url()))


def context(settings: Settings) -> Context:
    """Stores for ``settings``, opened once per process (tasks may run in Dask workers)."""
    return _context(settings.model_dump_json())


def _insert_ignore(session: Session, table: Table, values: dict[str, Any],
                   keys: Sequence[str], update: Sequence[str] = ()) -> None:
    """Portable INSERT ... ON CONFLICT DO NOTHING / UPDATE for SQLite and PostgreSQL."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table).values(**values)
    if update:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys),
                                          set_={k: values[k] for k in update})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    session.execute(stmt)


# ---------------------------------------------------------------------------------------------
# Models and views


@functools.lru_cache(maxsize=4)
def _load(model: str | None, checkpoint: str | None) -> tuple[Any, ModelSpec, str]:
    net, spec = load_model(model, checkpoint)
    h = hashlib.sha256(spec.to_json().encode())
    if checkpoint is not None:
        with open(checkpoint, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return net, spec, h.hexdigest()


def load_model_cached(model: str | None, checkpoint: str | None) -> tuple[Any, ModelSpec, str]:
    """(model, spec, checksum) loaded once per process; the checksum covers the weights file."""
    return _load(model, checkpoint)


def register_model(ctx: Context, model: str | None, checkpoint: str | None) -> str:
    _, spec, checksum = load_model_cached(model, checkpoint)
    with ctx.meta.session() as s:
        _insert_ignore(s, ModelRecord.__table__, {  # type: ignore[arg-type]
            "checksum": checksum, "name": spec.name, "source": checkpoint or spec.name,
            "spec": json.loads(spec.to_json())}, ["checksum"])
    return checksum


def keypoint_params_digest(view: ModelView, sift: SiftParams) -> str:
    """Keypoints depend on the view geometry and the SIFT parameters, not on the weights."""
    cfg = {k: view.data_config.get(k) for k in ("input_size", "crop_pct", "crop_mode",
                                                 "interpolation")}
    blob = json.dumps({"view": cfg, "sift": asdict(sift)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _keypoints_bytes(k: Keypoints) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **k.to_arrays())  # type: ignore[arg-type]
    return buf.getvalue()


def _keypoints_from_bytes(data: bytes) -> Keypoints:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return Keypoints.from_arrays({k: z[k] for k in z.files})


# ---------------------------------------------------------------------------------------------
# SIFT extraction


def _indexed_keypoints(ctx: Context, digest: str) -> set[str]:
    """Image hashes whose keypoints are indexed under ``digest`` (one query per shard)."""
    with ctx.meta.session() as s:
        return set(s.scalars(select(KeypointSet.image_sha256).where(
            KeypointSet.params_digest == digest)).all())


def _image_keypoints(ctx: Context, dataset_id: int, path: str, view: ModelView, digest: str,
                     sift: SiftParams, limits: ImageLimits, indexed: set[str],
                     report: ShardReport, need_view: bool) -> ViewedKeypoints | None:
    """One image's keypoints: from the store, or computed and stored; the image and its
    keypoint set indexed in SQL. Bad files are recorded as rejected and give None."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        _reject(ctx, dataset_id, path, None, "unreadable", str(e), report)
        return None
    sha = sha256_bytes(data)
    key = content_key("keypoints", sha, digest, "npz")
    arr = np.zeros((0, 0, 3), np.uint8)
    kps: Keypoints | None = None
    stored = ctx.store.exists(key)
    if need_view or not stored:
        try:
            arr = view.geometry_array(open_image(data, name=path, limits=limits))
        except ImageError as e:
            _reject(ctx, dataset_id, path, sha, e.reason, e.detail, report)
            return None
    if stored:
        report.cached += 1
        if need_view or sha not in indexed:  # a killed run may have stored but not indexed
            kps = _keypoints_from_bytes(ctx.store.get(key))
        uri = ctx.store.uri_for(key)
    else:
        kps = detect_sift(arr, sift)
        uri = ctx.store.put(key, _keypoints_bytes(kps))
        report.computed += 1
    report.image_sha256.append(sha)
    with ctx.meta.session() as s:
        _insert_ignore(s, Image.__table__, {  # type: ignore[arg-type]
            "dataset_id": dataset_id, "path": path, "sha256": sha, "size_bytes": len(data),
            "status": "ok", "rejection_reason": None, "rejection_detail": None},
            ["dataset_id", "path"], update=["sha256", "size_bytes", "status",
                                             "rejection_reason", "rejection_detail"])
        if sha not in indexed and kps is not None:
            _insert_ignore(s, KeypointSet.__table__, {  # type: ignore[arg-type]
                "image_sha256": sha, "params_digest": digest, "artifact_uri": uri,
                "num_keypoints": len(kps)}, ["image_sha256", "params_digest"])
            indexed.add(sha)
    return ViewedKeypoints(path, arr, kps) if kps is not None else None


def sift_shard(settings: Settings, dataset_id: int, shard: int, paths: Sequence[str],
               model: str | None, checkpoint: str | None,
               sift: SiftParams = SiftParams(), limits: ImageLimits = ImageLimits()
               ) -> ShardReport:
    """SIFT on each image of a shard, unless its keypoints are already stored."""
    ctx = context(settings)
    net, _, _ = load_model_cached(model, checkpoint)
    view = ModelView.from_model(net)
    digest = keypoint_params_digest(view, sift)
    report = ShardReport(shard)
    indexed = _indexed_keypoints(ctx, digest)
    for path in paths:
        _image_keypoints(ctx, dataset_id, path, view, digest, sift, limits, indexed, report,
                         need_view=False)
    return report


def _reject(ctx: Context, dataset_id: int, path: str, sha: str | None, reason: str,
            detail: str, report: ShardReport) -> None:
    report.rejected.append({"path": path, "reason": reason, "detail": detail})
    with ctx.meta.session() as s:
        _insert_ignore(s, Image.__table__, {  # type: ignore[arg-type]
            "dataset_id": dataset_id, "path": path, "sha256": sha, "size_bytes": None,
            "status": "rejected", "rejection_reason": reason, "rejection_detail": detail},
            ["dataset_id", "path"], update=["sha256", "status", "rejection_reason",
                                             "rejection_detail"])


# ---------------------------------------------------------------------------------------------
# Attention analysis


def analysis_params_digest(cfg: AnalysisConfig, view: ModelView) -> str:
    blob = json.dumps({"cfg": asdict(cfg) | {"workers": None, "device": None,
                                              "num_examples": None, "batch_size": None},
                       "view": view.data_config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def analyze_shard(settings: Settings, dataset_id: int, shard: int, paths: Sequence[str],
                  model: str | None, checkpoint: str | None,
                  cfg: AnalysisConfig = AnalysisConfig()) -> ShardReport:
    """Streaming interrelation statistics of a shard's readable images, stored as JSON.

    Keypoints come from the store; any that are missing are computed, stored and indexed
    here, so this is a complete SIFT + analysis step on its own."""
    ctx = context(settings)
    net, _, checksum = load_model_cached(model, checkpoint)
    view = ModelView.from_model(net)
    kp_digest = keypoint_params_digest(view, cfg.sift)
    params = analysis_params_digest(cfg, view)
    report, sift_report = ShardReport(shard), ShardReport(shard)
    indexed = _indexed_keypoints(ctx, kp_digest)
    items = [it for path in paths if (it := _image_keypoints(
        ctx, dataset_id, path, view, kp_digest, cfg.sift, cfg.limits, indexed, sift_report,
        need_view=True)) is not None]
    report.rejected = sift_report.rejected
    report.image_sha256 = sift_report.image_sha256
    shard_digest = hashlib.sha256("\n".join(sorted(report.image_sha256)).encode()).hexdigest()
    key = content_key("analysis", shard_digest, f"{checksum[:16]}-{params}", "json")
    report.artifact_key = key
    if ctx.store.exists(key):
        report.cached = len(items)
        report.artifact_uri = ctx.store.uri_for(key)
    else:
        analyzer, result = new_analysis(net, view, cfg)
        for i in range(0, len(items), cfg.batch_size):
            analyze_batch(items[i:i + cfg.batch_size], analyzer, view, cfg, result)
        body = json.dumps(result.stats.to_dict()).encode()
        report.artifact_uri = ctx.store.put(key, body)
        report.computed = len(items)
    with ctx.meta.session() as s:
        _insert_ignore(s, AnalysisShard.__table__, {  # type: ignore[arg-type]
            "model_checksum": checksum, "params_digest": params, "shard_digest": shard_digest,
            "artifact_uri": report.artifact_uri, "num_images": len(items)},
            ["model_checksum", "params_digest", "shard_digest"])
    return report


def merge_analysis(settings: Settings, reports: Sequence[ShardReport], model: str | None,
                   checkpoint: str | None, cfg: AnalysisConfig = AnalysisConfig(),
                   example_paths: Sequence[str] = ()) -> AnalysisResult:
    """Merge the shards' stored statistics into one result (in shard order, so any runner
    gives identical numbers) and draw ``cfg.num_examples`` example images for pictures."""
    ctx = context(settings)
    net, _, _ = load_model_cached(model, checkpoint)
    view = ModelView.from_model(net)
    analyzer, result = new_analysis(net, view, cfg)
    for rep in sorted(reports, key=lambda r: r.shard):
        if rep.artifact_key is not None:
            shard_stats = json.loads(ctx.store.get(rep.artifact_key))
            result.stats.merge(StatsAccumulator.from_dict(shard_stats))
        result.rejected.extend(Rejected(r["path"], r["reason"], r["detail"])
                               for r in rep.rejected)
    examples = []
    for path in example_paths[: cfg.num_examples]:
        try:
            arr = view.geometry_array(open_image(path, limits=cfg.limits))
        except ImageError:
            continue
        examples.append(ViewedKeypoints(path, arr, detect_sift(arr, cfg.sift)))
    if examples:
        scratch = AnalysisResult(result.layout, result.num_layers, result.num_heads, cfg,
                                 StatsAccumulator())
        analyze_batch(examples, analyzer, view, cfg, scratch)
        result.examples = scratch.examples
    return result


# ---------------------------------------------------------------------------------------------
# Spurious-correlation audit


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


def _label_indices(images: Sequence[LabelledImage], spec: ModelSpec, num_classes: int
                   ) -> tuple[list[str], np.ndarray]:
    names = spec.class_names
    if names is None:
        raise AuditInputError(
            f"model {spec.name} carries no class names, so its outputs cannot be matched to "
            "the labels; audit a vitsem checkpoint (saved with its classes) or one trained "
            "on the labels' classes")
    unknown = sorted({im.label for im in images} - set(names))
    if unknown or len(names) != num_classes:
        raise AuditInputError(
            f"the labels {unknown[:8]} are not classes of the model (it predicts "
            f"{names[:8]}{'...' if len(names) > 8 else ''}); audit the model on data of its "
            "own classes")
    index = {n: i for i, n in enumerate(names)}
    return list(names), np.array([index[im.label] for im in images], np.int64)


def audit_images(settings: Settings, dataset_id: int, images: Sequence[LabelledImage],
                 model: str | None, checkpoint: str | None, cfg: AuditConfig = AuditConfig(),
                 meta: dict[str, Any] | None = None) -> AuditReport:
    """Audit ``model`` on labelled images: keypoints (with descriptors) from the store or
    computed, the audit, the report stored under ``reports/spurious_audit/<digest>/`` and
    its findings indexed in SQL. A finished audit of the same weights, images, labels and
    parameters is found in the store instead of being run again."""
    cfg.validate()
    ctx = context(settings)
    net, spec, checksum = load_model_cached(model, checkpoint)
    class_names, _ = _label_indices(images, spec, int(getattr(net, "num_classes", 0)))
    view = ModelView.from_model(net)
    digest = keypoint_params_digest(view, AUDIT_SIFT)
    indexed = _indexed_keypoints(ctx, digest)
    sift_report = ShardReport(0)
    kept: list[tuple[LabelledImage, ViewedKeypoints]] = []
    for im in images:
        item = _image_keypoints(ctx, dataset_id, im.path, view, digest, AUDIT_SIFT,
                                ImageLimits(), indexed, sift_report, need_view=True)
        if item is not None:
            kept.append((im, item))
    if not kept:
        reasons = sorted({r["reason"] for r in sift_report.rejected})
        raise AuditInputError(f"all {len(images)} images were rejected ({', '.join(reasons)});"
                              " nothing can be audited; see the rejected list and fix the files")
    labels = _label_indices([im for im, _ in kept], spec, len(class_names))[1]
    audit_digest = hashlib.sha256(json.dumps({
        "model": checksum, "cfg": asdict(cfg), "images": sorted(
            f"{sha}:{im.label}:{im.group}" for sha, (im, _) in zip(
                sift_report.image_sha256, kept, strict=True))}, sort_keys=True).encode()
    ).hexdigest()[:24]
    prefix = f"reports/spurious_audit/{audit_digest}"
    out = Path(tempfile.mkdtemp(prefix="vitsem-audit-"))
    cached = ctx.store.exists(f"{prefix}/audit.json")
    if cached:
        listing = json.loads(ctx.store.get(f"{prefix}/files.json"))
        files = []
        for name in listing:
            (out / name).write_bytes(ctx.store.get(f"{prefix}/{name}"))
            files.append(out / name)
        summary = json.loads((out / "audit.json").read_text())
    else:
        masks = None
        if all(im.mask for im, _ in kept):
            masks = np.stack([view_mask(np.asarray(open_image(str(im.mask)).convert("L")), view)
                              for im, _ in kept])
        clean = (np.array([bool(im.clean) for im, _ in kept])
                 if all(im.clean is not None for im, _ in kept) else None)
        data = AuditData(
            views=np.stack([it.view for _, it in kept]),
            keypoints=[it.keypoints for _, it in kept], labels=labels,
            class_names=class_names, groups=[im.group for im, _ in kept], masks=masks,
            clean=clean, names=[Path(im.path).name for im, _ in kept])
        result = audit(net, view, data, cfg)
        files = write_report(result, data, out, {
            "model": spec.name, "checkpoint": Path(checkpoint).name if checkpoint else None,
            "model_checksum": checksum[:16], "audit_digest": audit_digest,
            "rejected": len(sift_report.rejected), **(meta or {})})
        summary = json.loads((out / "audit.json").read_text())
        # files.json last: its presence marks a complete report in the store.
        for f in files:
            ctx.store.put(f"{prefix}/{f.name}", f.read_bytes())
        ctx.store.put(f"{prefix}/files.json", json.dumps([f.name for f in files]).encode())
    report_uri = ctx.store.uri_for(f"{prefix}/report.html")
    with ctx.meta.session() as s:
        for map_name, findings in summary["findings"].items():
            for f in findings:
                _insert_ignore(s, AuditFinding.__table__, {  # type: ignore[arg-type]
                    "audit_digest": audit_digest, "model_checksum": checksum,
                    "dataset_id": dataset_id, "map_name": map_name, "rank": f["rank"],
                    "class_name": f["class_name"], "confirmed": bool(f["confirmed"]),
                    "shortcut": bool(f["shortcut"]), "confidence": float(f["confidence"]),
                    "effect": _finite(f["effect"]), "random_effect": _finite(f["random_effect"]),
                    "evidence": {k: _finite(v) if isinstance(v, float) else v
                                 for k, v in f.items()},
                    "report_uri": report_uri}, ["audit_digest", "map_name", "rank"])
    return AuditReport(audit_digest, summary, files, prefix, report_uri, cached,
                       sift_report.rejected)


def _finite(v: Any) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


# ---------------------------------------------------------------------------------------------
# Guided pre-training


@dataclass
class PretrainRun:
    """A finished pre-training run: its key, history, where its checkpoints and final
    encoder are, and how many epochs this call ran (the rest were resumed)."""

    run_key: str
    history: list[dict[str, float]]
    checkpoint_prefix: str
    encoder_path: Path
    epochs_run: int
    resumed_from: int
    mlflow_run_id: str | None


def pretrain_weights(ctx: Context, dataset_id: int, paths: Sequence[str], view: ModelView,
                     grid: TokenGrid) -> tuple[list[str], np.ndarray, torch.Tensor, list[str]]:
    """The usable paths, their views (M, H, W, 3), keypoint weights (M, N) on the encoder's
    grid from the keypoint store (computed and stored for images it lacks) and image hashes;
    bad files are rejected and left out."""
    sift = SiftParams()
    digest = keypoint_params_digest(view, sift)
    indexed = _indexed_keypoints(ctx, digest)
    report = ShardReport(0)
    items = [it for p in paths if (it := _image_keypoints(
        ctx, dataset_id, p, view, digest, sift, ImageLimits(), indexed, report,
        need_view=True)) is not None]
    if not items:
        raise PretrainInputError(f"all {len(paths)} images were rejected; nothing to train on")
    views = np.stack([it.view for it in items])
    return ([it.path for it in items], views,
            semantic_weights([it.keypoints for it in items], grid), report.image_sha256)


def pretrain_run(settings: Settings, dataset_id: int, data_root: str, cfg: PretrainConfig,
                 *, limit: int | None = None, stop_after: int | None = None,
                 on_epoch: Any = None) -> PretrainRun:
    """Pre-train on a benchmark folder's ``train`` split (probes on train -> test), saving a
    complete state to the artifact store after every epoch and resuming from the last one
    when the same run (config + images) was interrupted."""
    ctx = context(settings)
    ds = ShortcutDataset.load(data_root)
    view, grid = encoder_view(cfg)
    labels = {str(ds.root / s.file): s.label for s in ds.samples}
    train = [str(ds.root / s.file) for s in ds.split("train")][:limit]
    test = [str(ds.root / s.file) for s in ds.split("test")]
    tr_paths, tr_views, weights, hashes = pretrain_weights(ctx, dataset_id, train, view, grid)
    te_paths, te_views, _, _ = pretrain_weights(ctx, dataset_id, test, view, grid)
    x_tr, x_te = view.to_tensor(tr_views), view.to_tensor(te_views)
    y_tr = torch.tensor([labels[p] for p in tr_paths])
    y_te = torch.tensor([labels[p] for p in te_paths])
    data = PretrainData(x_tr, weights, (x_tr, y_tr, x_te, y_te))
    run_key = hashlib.sha256(json.dumps({"cfg": cfg.to_dict(), "images": hashes},
                                        sort_keys=True, default=str).encode()).hexdigest()[:24]
    prefix = f"pretrain/{run_key}"
    latest_key = f"{prefix}/latest.json"
    resume, start, mlflow_run = None, 0, None
    if ctx.store.exists(latest_key):
        latest = json.loads(ctx.store.get(latest_key))
        resume = ctx.store.get(latest["checkpoint"])
        start, mlflow_run = int(latest["epoch"]), latest.get("mlflow_run_id")

    def save(state: PretrainState, record: dict[str, float]) -> None:
        nonlocal mlflow_run
        key = f"{prefix}/epoch-{state.epoch:04d}.pt"
        ctx.store.replace(key, save_state(state))  # a resumed run may write it again
        if on_epoch is not None:
            mlflow_run = on_epoch(mlflow_run, record) or mlflow_run
        # The pointer goes last: a run killed before it resumes from the previous epoch.
        ctx.store.replace(latest_key, json.dumps({"epoch": state.epoch, "checkpoint": key,
                                              "mlflow_run_id": mlflow_run}).encode())

    state = pretrain(cfg, data, resume=resume, on_epoch=save, stop_after=stop_after)
    out = Path(tempfile.mkdtemp(prefix="vitsem-pretrain-")) / f"encoder-{run_key[:12]}.safetensors"
    save_checkpoint(state.model.encoder, cfg.encoder_spec(), out)
    return PretrainRun(run_key, state.history, prefix, out, state.epoch - start, start,
                       mlflow_run)
