"""Data-set analysis: SIFT over all cores feeding batched attention analysis, with streaming
statistics (memory independent of the number of images) and bad files quarantined."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitsem.errors import ConfigError
from vitsem.method.analysis import PER_HEAD_STATS, InterrelationAnalyzer, SemanticBatch
from vitsem.method.attention import TokenLayout, token_layout
from vitsem.method.concentration import SemanticConfig, concentration, concentration_levels
from vitsem.method.images import ImageLimits
from vitsem.method.keypoints import Keypoints, Rejected, SiftParams, ViewedKeypoints, sift_files
from vitsem.method.stats import StatsAccumulator, Summary
from vitsem.method.view import ModelView

LAYER_STATS = ("semantic_lift", "cls_focus", "semantic_mass")
"""Per-head statistics also averaged over heads per image, as ``<name>_layer`` (B, L)."""


@dataclass(frozen=True)
class AnalysisConfig:
    """Options of :func:`analyze_images` (METHOD.md §1-2): the semantic concentration
    (``semantic``), model batch size, SIFT processes (``workers``, default all cores), SIFT
    settings, image limits, images kept for pictures and the model's device.
    ``attention_memory_budget``: bytes one block's attention statistics may take at a time
    (query-row chunks), default per device in
    :data:`~vitsem.method.attention.DEFAULT_MEMORY_BUDGET` (CPU 64 MiB, CUDA 512 MiB)."""

    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    batch_size: int = 32
    workers: int | None = None
    sift: SiftParams = field(default_factory=SiftParams)
    limits: ImageLimits = field(default_factory=ImageLimits)
    num_examples: int = 4
    device: str = "cpu"
    attention_memory_budget: int | None = None

    def validate(self) -> None:
        self.semantic.validate()
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.num_examples < 0:
            raise ConfigError(f"num_examples must be >= 0, got {self.num_examples}")
        if self.attention_memory_budget is not None and self.attention_memory_budget < 2**20:
            raise ConfigError("attention_memory_budget must be >= 1 MiB (1048576 bytes) or "
                              f"None for the device default, got {self.attention_memory_budget}")


@dataclass
class Example:
    """An image kept for pictures: its view (H, W, 3), keypoints, concentration (N,),
    levels (N,), CLS attention (L, H, N) and predicted class."""

    path: str
    view: np.ndarray
    keypoints: Keypoints
    concentration: np.ndarray
    levels: np.ndarray
    cls_maps: np.ndarray | None
    predicted: int


@dataclass
class AnalysisResult:
    layout: TokenLayout
    num_layers: int
    num_heads: int
    config: AnalysisConfig
    stats: StatsAccumulator
    rejected: list[Rejected] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return self.stats.num_images

    def summary(self) -> dict[str, Summary]:
        return self.stats.summary()

    def layer_profile(self) -> list[dict[str, float]]:
        """The semantic layer profile: per layer, head-averaged lift and focus with 95%
        intervals, and the most / least semantic head's mean lift."""
        s = self.summary()
        rows = []
        for layer in range(self.num_layers):
            lift_heads = s["semantic_lift"].mean[layer]
            row = {"layer": float(layer)}
            for name in ("semantic_lift", "cls_focus"):
                m = s[f"{name}_layer"]
                row[name] = float(m.mean[layer])
                row[f"{name}_ci_low"] = float(m.ci_low[layer])
                row[f"{name}_ci_high"] = float(m.ci_high[layer])
            row["lift_max_head"] = float(np.nanmax(lift_heads)) if np.isfinite(
                lift_heads).any() else float("nan")
            row["lift_min_head"] = float(np.nanmin(lift_heads)) if np.isfinite(
                lift_heads).any() else float("nan")
            row["images"] = float(s["semantic_lift_layer"].count[layer])
            rows.append(row)
        return rows


PerImageSink = Callable[[list[dict[str, Any]]], None]


def analyze_batch(items: list[ViewedKeypoints], analyzer: InterrelationAnalyzer,
                  view: ModelView, cfg: AnalysisConfig, result: AnalysisResult,
                  on_rows: PerImageSink | None = None) -> None:
    """Analyse one batch of viewed images into ``result`` (statistics, examples)."""
    grid = analyzer.layout.grid
    semantic = cfg.semantic
    c = np.stack([concentration(it.keypoints, grid, semantic.weighting) for it in items])
    thresholds = semantic.thresholds()
    sem = SemanticBatch.from_concentrations(c, semantic.levels, thresholds, cfg.device)
    x = view.to_tensor(np.stack([it.view for it in items])).to(cfg.device)
    want_maps = len(result.examples) < cfg.num_examples
    out = analyzer.run(x, sem, keep_cls_maps=want_maps)
    stats = dict(out.stats)
    for name in LAYER_STATS:
        stats[f"{name}_layer"] = _nanmean_last(stats[name])
    stats["uniform_level_matrix"] = out.uniform_level_matrix
    result.stats.add(stats)
    probs = torch.softmax(out.logits.float(), -1).cpu().numpy()
    pred = probs.argmax(-1)
    for i, it in enumerate(items):
        if len(result.examples) >= cfg.num_examples:
            break
        result.examples.append(Example(
            it.path, it.view, it.keypoints, c[i],
            concentration_levels(c[i], semantic.levels, thresholds),
            None if out.cls_maps is None else out.cls_maps[i], int(pred[i])))
    if on_rows is not None:
        on_rows([{
            "path": it.path,
            "num_keypoints": len(it.keypoints),
            "semantic_patches": int((c[i] > 0).sum()),
            "predicted": int(pred[i]),
            "confidence": float(probs[i, pred[i]]),
            "semantic_lift_by_layer": stats["semantic_lift_layer"][i].tolist(),
            "cls_focus_by_layer": stats["cls_focus_layer"][i].tolist(),
        } for i, it in enumerate(items)])


def _nanmean_last(v: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where every entry is NaN (no warning)."""
    finite = np.isfinite(v)
    n = finite.sum(-1)
    total = np.where(finite, v, 0.0).sum(-1)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def new_analysis(model: nn.Module, view: ModelView, config: AnalysisConfig
                 ) -> tuple[InterrelationAnalyzer, AnalysisResult]:
    """An analyzer for ``model`` at ``view``'s input size and an empty result to fill."""
    layout = token_layout(model, view.hw)
    analyzer = InterrelationAnalyzer(model, layout, config.attention_memory_budget)
    return analyzer, AnalysisResult(layout, analyzer.num_layers, analyzer.num_heads, config,
                                    StatsAccumulator())


def analyze_images(model: nn.Module, paths: Iterable[str | Path],
                   config: AnalysisConfig = AnalysisConfig(), *,
                   view: ModelView | None = None,
                   on_rows: PerImageSink | None = None,
                   on_rejected: Callable[[Rejected], None] | None = None,
                   progress: Callable[[int], None] | None = None) -> AnalysisResult:
    """Analyse every readable image in ``paths`` with ``model``.

    SIFT runs on the model view in ``config.workers`` processes while the model runs in this
    one. Bad files are recorded in ``result.rejected`` (and passed to ``on_rejected``) and the
    rest go on. ``on_rows`` receives per-image summary rows batch by batch, so a caller can
    stream them to disk; ``progress`` gets the number of files handled so far.
    """
    config.validate()
    model = model.to(config.device).eval()
    view = view or ModelView.from_model(model)
    analyzer, result = new_analysis(model, view, config)
    batch: list[ViewedKeypoints] = []
    done = 0
    for item in sift_files(paths, view, config.sift, workers=config.workers,
                           limits=config.limits):
        done += 1
        if isinstance(item, Rejected):
            result.rejected.append(item)
            if on_rejected is not None:
                on_rejected(item)
        else:
            batch.append(item)
            if len(batch) == config.batch_size:
                analyze_batch(batch, analyzer, view, config, result, on_rows)
                batch = []
        if progress is not None:
            progress(done)
    if batch:
        analyze_batch(batch, analyzer, view, config, result, on_rows)
    return result


STAT_DESCRIPTIONS = dict(PER_HEAD_STATS)
STAT_DESCRIPTIONS.update({f"{n}_layer": f"{n} averaged over heads; per layer"
                          for n in LAYER_STATS})
STAT_DESCRIPTIONS["uniform_level_matrix"] = "level matrix under uniform attention; (K, K)"
