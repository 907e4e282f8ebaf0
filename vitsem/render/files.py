"""Write an analysis to a folder: statistics JSON, per-image Parquet, rejected files, PNGs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitsem.method.concentration import TokenGrid, concentration
from vitsem.method.keypoints import Rejected, ViewedKeypoints
from vitsem.method.pipeline import STAT_DESCRIPTIONS, AnalysisResult
from vitsem.paths import path_text


def _clean(x: Any) -> Any:
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


class PerImageWriter:
    """Streams rows (per image, per keypoint) to a Parquet file, batch by batch, so memory
    stays constant; the file appears complete or not at all (written under a temporary name)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp")
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        self.write(pa.Table.from_pylist([r | {"path": path_text(r["path"])} if "path" in r
                                         else r for r in rows]))

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self._tmp), table.schema)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        """Finish the file; with no rows written, an empty table (the file always exists)."""
        if self._writer is None:
            pq.write_table(pa.table({}), str(self._tmp))
        else:
            self._writer.close()
        self._tmp.replace(self.path)


class KeypointTableWriter:
    """Streams ``keypoints.parquet`` (one row per keypoint: path, x, y, size, angle, response,
    octave) and ``images.parquet`` (per image: keypoint count, keypoint patches and the patch
    concentration on ``grid``) into ``out``, a few hundred images at a time."""

    FIELDS = ("size", "angle", "response", "octave")

    def __init__(self, out: Path, grid: TokenGrid, weighting: str, buffer: int = 256) -> None:
        self.grid, self.weighting, self.buffer = grid, weighting, buffer
        self._keypoints = PerImageWriter(out / "keypoints.parquet")
        self._images = PerImageWriter(out / "images.parquet")
        self._pending: list[ViewedKeypoints] = []
        self.images = 0
        self.keypoints = 0

    def add(self, item: ViewedKeypoints) -> None:
        self._pending.append(item)
        if len(self._pending) >= self.buffer:
            self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        cols: dict[str, Any] = {"path": np.concatenate([
            np.full(len(it.keypoints), path_text(it.path), dtype=object) for it in self._pending])}
        cols["x"] = np.concatenate([it.keypoints.xy[:, 0] for it in self._pending])
        cols["y"] = np.concatenate([it.keypoints.xy[:, 1] for it in self._pending])
        for f in self.FIELDS:
            cols[f] = np.concatenate([getattr(it.keypoints, f) for it in self._pending])
        self._keypoints.write(pa.table({k: pa.array(v) for k, v in cols.items()}))
        rows = []
        for it in self._pending:
            c = concentration(it.keypoints, self.grid, self.weighting)
            # The path is written as text by PerImageWriter.
            rows.append({"path": it.path, "num_keypoints": len(it.keypoints),
                         "semantic_patches": int((c > 0).sum()), "concentration": c.tolist()})
            self.keypoints += len(it.keypoints)
        self._images(rows)
        self.images += len(rows)
        self._pending = []

    def close(self) -> None:
        self._write()
        self._keypoints.close()
        self._images.close()


def stats_document(result: AnalysisResult, meta: dict[str, Any]) -> dict[str, Any]:
    summary = result.summary()
    stats = {}
    for name, s in summary.items():
        stats[name] = {
            "description": STAT_DESCRIPTIONS.get(name, ""),
            "shape": list(s.mean.shape),
            "mean": s.mean.tolist(), "ci_low": s.ci_low.tolist(), "ci_high": s.ci_high.tolist(),
            "std": s.std.tolist(), "count": s.count.tolist(),
        }
    cfg = asdict(result.config)
    return _clean({
        "meta": meta,
        "config": cfg,
        "layout": {"num_prefix_tokens": result.layout.num_prefix, "has_cls": result.layout.has_cls,
                   "patch_hw": list(result.layout.grid.patch_hw),
                   "grid_hw": list(result.layout.grid.grid_hw)},
        "num_layers": result.num_layers, "num_heads": result.num_heads,
        "num_images": result.num_images, "num_rejected": len(result.rejected),
        "layer_profile": result.layer_profile(),
        "statistics": stats,
    })


def write_rejected(path: Path, rejected: list[Rejected]) -> None:
    """One JSON object per line: ``path`` (as :func:`~vitsem.paths.path_text`), ``reason``
    and ``detail``."""
    path.write_text("".join(json.dumps(asdict(r) | {"path": path_text(r.path)}) + "\n"
                            for r in rejected))


def write_pictures(result: AnalysisResult, out: Path, class_names: list[str] | None
                   ) -> list[Path]:
    from vitsem.render import pictures  # matplotlib is slow to import; only when drawing

    written = []
    figs = [("layer_profile.png", pictures.layer_profile_figure(result)),
            ("level_matrix.png", pictures.level_matrix_figure(result))]
    figs += [(f"attention_{i:02d}.png", pictures.attention_figure(ex, result, class_names))
             for i, ex in enumerate(result.examples)]
    for name, fig in figs:
        path = out / name
        fig.savefig(path, dpi=110)
        pictures.plt.close(fig)
        written.append(path)
    return written
