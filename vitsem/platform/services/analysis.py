"""The weighted patch interrelation analysis over a data set: streaming statistics per shard,
stored by content, merged in shard order, and the report (statistics, rejected files, pictures)
written to the artifact store."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitsem.digests import json_digest
from vitsem.method.keypoints import Rejected
from vitsem.method.pipeline import AnalysisConfig, AnalysisResult, analyze_batch, new_analysis
from vitsem.method.stats import StatsAccumulator
from vitsem.method.view import ModelView
from vitsem.platform.services.context import ShardReport, context, load_model_cached
from vitsem.platform.services.keypoints import KeypointStore
from vitsem.platform.settings import Settings
from vitsem.platform.storage.artifacts import content_key
from vitsem.platform.storage.db import AnalysisShard, upsert
from vitsem.render.files import stats_document, write_pictures, write_rejected

log = logging.getLogger("vitsem.platform.analysis")

_NOT_RESULT_AFFECTING = {"workers": None, "device": None, "num_examples": None,
                         "batch_size": None}


def analysis_digest(cfg: AnalysisConfig, view: ModelView) -> str:
    """The analysis parameters that change its statistics (not workers, device, batching)."""
    return json_digest({"cfg": asdict(cfg) | _NOT_RESULT_AFFECTING, "view": view.data_config})


def analyze_shard(settings: Settings, dataset_id: int, shard: int, paths: Sequence[str],
                  model: str | None, checkpoint: str | None,
                  cfg: AnalysisConfig = AnalysisConfig()) -> ShardReport:
    """Streaming interrelation statistics of a shard's readable images, stored as JSON.

    Views and keypoints come from the keypoint store; any that are missing are computed,
    stored and indexed here, so this is a complete SIFT + analysis step on its own."""
    ctx = context(settings)
    loaded = load_model_cached(model, checkpoint)
    params = analysis_digest(cfg, loaded.view)
    sift_report = ShardReport(shard)
    items = KeypointStore(ctx, dataset_id, loaded.view, paths, cfg.sift, cfg.limits,
                          sift_report).get_many(paths)
    report = ShardReport(shard, rejected=sift_report.rejected,
                         image_sha256=sift_report.image_sha256)
    shard_digest = json_digest(sorted(report.image_sha256))
    key = content_key("analysis", shard_digest, f"{loaded.checksum[:16]}-{params}", "json")
    report.artifact_key = key
    if ctx.store.exists(key):
        report.cached = len(items)
        report.artifact_uri = ctx.store.uri_for(key)
    else:
        analyzer, result = new_analysis(loaded.net, loaded.view, cfg)
        for i in range(0, len(items), cfg.batch_size):
            analyze_batch(items[i:i + cfg.batch_size], analyzer, loaded.view, cfg, result)
        report.artifact_uri = ctx.store.put(key, json.dumps(result.stats.to_dict()).encode())
        report.computed = len(items)
    with ctx.meta.session() as s:
        upsert(s, AnalysisShard, [{
            "model_checksum": loaded.checksum, "params_digest": params,
            "shard_digest": shard_digest, "artifact_uri": report.artifact_uri,
            "num_images": len(items)}], ["model_checksum", "params_digest", "shard_digest"])
    log.info("analysis shard %d: %d images (%s), %d rejected", shard, len(items),
             "from the store" if report.cached else "computed", len(report.rejected))
    return report


def merge_analysis(settings: Settings, dataset_id: int, reports: Sequence[ShardReport],
                   model: str | None, checkpoint: str | None,
                   cfg: AnalysisConfig = AnalysisConfig(), example_paths: Sequence[str] = ()
                   ) -> AnalysisResult:
    """Merge the shards' stored statistics into one result (in shard order, so any runner
    gives identical numbers) and analyse ``cfg.num_examples`` example images for pictures
    (their views and keypoints from the keypoint store)."""
    ctx = context(settings)
    loaded = load_model_cached(model, checkpoint)
    analyzer, result = new_analysis(loaded.net, loaded.view, cfg)
    for rep in sorted(reports, key=lambda r: r.shard):
        if rep.artifact_key is not None:
            shard_stats = json.loads(ctx.store.get(rep.artifact_key))
            result.stats.merge(StatsAccumulator.from_dict(shard_stats))
        result.rejected.extend(Rejected(r["path"], r["reason"], r["detail"])
                               for r in rep.rejected)
    wanted = list(example_paths[: cfg.num_examples])
    examples = KeypointStore(ctx, dataset_id, loaded.view, wanted, cfg.sift,
                             cfg.limits).get_many(wanted)
    if examples:
        scratch = AnalysisResult(result.layout, result.num_layers, result.num_heads, cfg,
                                 StatsAccumulator())
        analyze_batch(examples, analyzer, loaded.view, cfg, scratch)
        result.examples = scratch.examples
    return result


def analysis_report_prefix(reports: Sequence[ShardReport]) -> str:
    """Where the report of an analysis of these shards is stored: one place per shard set."""
    shards = sorted(r.artifact_key or "" for r in reports)
    return f"reports/attention_analysis/{json_digest(shards)}"


def store_analysis_report(settings: Settings, reports: Sequence[ShardReport],
                          result: AnalysisResult, meta: dict[str, Any]) -> list[Path]:
    """Write ``stats.json``, ``rejected.jsonl`` and the pictures to a local folder and to the
    artifact store under ``reports/attention_analysis/<digest of the shards>/``; returns the
    local files."""
    out = Path(tempfile.mkdtemp(prefix="vitsem-analysis-"))
    (out / "stats.json").write_text(json.dumps(stats_document(result, meta), indent=1))
    write_rejected(out / "rejected.jsonl", result.rejected)
    files = [out / "stats.json", out / "rejected.jsonl"]
    if result.num_images:
        files += write_pictures(result, out, None)
    prefix = analysis_report_prefix(reports)
    store = context(settings).store
    for f in files:
        store.put(f"{prefix}/{f.name}", f.read_bytes())
    return files
