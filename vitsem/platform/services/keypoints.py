"""The keypoint store: one artifact per (image content, model view, SIFT settings) holding the
image as the model sees it and its SIFT keypoints with descriptors, indexed in SQL.

Every step that needs keypoints (extraction, analysis, audit, pre-training) reads the same set:
an image is decoded and run through SIFT once, whichever step comes first, and later steps read
the stored view instead of decoding the file again. Descriptors are always stored, so the audit
(which compares them) and the analysis (which does not) share one set.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from vitsem.data.remote import read_bytes
from vitsem.digests import json_digest, sha256_bytes
from vitsem.errors import ImageError
from vitsem.method.images import ImageLimits, open_image
from vitsem.method.keypoints import Keypoints, SiftParams, ViewedKeypoints, detect_sift
from vitsem.method.view import ModelView
from vitsem.paths import path_text
from vitsem.platform.services.context import Context, ShardReport, context, load_model_cached
from vitsem.platform.settings import Settings
from vitsem.platform.storage.artifacts import content_key
from vitsem.platform.storage.db import Image, KeypointSet, upsert

log = logging.getLogger("vitsem.platform.keypoints")

VIEW_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation")
"""The parts of a model's data config that decide the view geometry (normalisation does not
change SIFT's input)."""


def stored_sift(sift: SiftParams) -> SiftParams:
    """The SIFT settings of the stored set: ``sift`` with descriptors."""
    return replace(sift, descriptors=True)


def keypoint_digest(view: ModelView, sift: SiftParams) -> str:
    """Keypoints depend on the view geometry and the SIFT settings, not on the weights."""
    geometry = {k: view.data_config.get(k) for k in VIEW_KEYS}
    return json_digest({"view": geometry, "sift": asdict(stored_sift(sift))})


def _to_bytes(view: np.ndarray, kps: Keypoints) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, view=view, **kps.to_arrays())  # type: ignore[arg-type]
    return buf.getvalue()


def _from_bytes(data: bytes) -> tuple[np.ndarray, Keypoints]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays.pop("view"), Keypoints.from_arrays(arrays)


class KeypointStore:
    """Viewed keypoints of ``paths`` (images of one data set) under one view and SIFT
    settings.

    :meth:`get` returns an image's view and keypoints from the store, or decodes the file,
    runs SIFT and stores them; bad files are rejected (counted in ``report``). SQL rows for
    images and keypoint sets are written in one transaction by :meth:`flush`, after their
    artifacts are stored: a run killed before it leaves stored but unindexed keypoints, which
    the next run finds and indexes.
    """

    def __init__(self, ctx: Context, dataset_id: int, view: ModelView, paths: Sequence[str],
                 sift: SiftParams = SiftParams(), limits: ImageLimits = ImageLimits(),
                 report: ShardReport | None = None) -> None:
        self.ctx, self.dataset_id, self.view = ctx, dataset_id, view
        self.sift, self.limits = stored_sift(sift), limits
        self.digest = keypoint_digest(view, sift)
        self.report = report if report is not None else ShardReport(0)
        with ctx.meta.session() as s:
            self.indexed = set(s.scalars(select(KeypointSet.image_sha256).where(
                KeypointSet.params_digest == self.digest)).all())
            # Images of these paths already indexed with their content: not written again.
            self.known = dict(s.execute(select(Image.path, Image.sha256).where(
                Image.dataset_id == dataset_id, Image.status == "ok",
                Image.path.in_([path_text(p) for p in paths]))).all())
        self._images: list[dict[str, Any]] = []
        self._sets: list[dict[str, Any]] = []

    def key(self, sha: str) -> str:
        return content_key("keypoints", sha, self.digest, "npz")

    def get(self, path: str, need_view: bool = True) -> ViewedKeypoints | None:
        """``path``'s view and keypoints (None when the file is rejected). With
        ``need_view=False`` an already stored and indexed set is not read back (None)."""
        try:
            data = read_bytes(path)  # a local file or an s3:// object
        except OSError as e:
            self._reject(path, None, "unreadable", f"cannot read file ({e.strerror})")
            return None
        sha = sha256_bytes(data)
        key = self.key(sha)
        item = None
        # The store is asked, not the index: one database may index several stores.
        if self.ctx.store.exists(key):
            self.report.cached += 1
            if need_view or sha not in self.indexed:
                view, kps = _from_bytes(self.ctx.store.get(key))
                item = ViewedKeypoints(path, view, kps)
        else:
            try:
                view = self.view.geometry_array(open_image(data, name=path, limits=self.limits))
            except ImageError as e:
                self._reject(path, sha, e.reason, e.detail)
                return None
            item = ViewedKeypoints(path, view, detect_sift(view, self.sift))
            self.ctx.store.put(key, _to_bytes(view, item.keypoints))
            self.report.computed += 1
        self.report.image_sha256.append(sha)
        if self.known.get(path_text(path)) != sha:
            self._images.append({"dataset_id": self.dataset_id, "path": path_text(path),
                                 "sha256": sha,
                                 "size_bytes": len(data), "status": "ok",
                                 "rejection_reason": None, "rejection_detail": None})
        if sha not in self.indexed and item is not None:
            self._sets.append({"image_sha256": sha, "params_digest": self.digest,
                               "artifact_uri": self.ctx.store.uri_for(key),
                               "num_keypoints": len(item.keypoints)})
            self.indexed.add(sha)
        return item if need_view else None

    def get_many(self, paths: Sequence[str]) -> list[ViewedKeypoints]:
        """The views and keypoints of every readable file of ``paths``, in order; then
        :meth:`flush`."""
        items = [it for p in paths if (it := self.get(p)) is not None]
        self.flush()
        return items

    @classmethod
    def for_model(cls, settings: Settings, dataset_id: int, paths: Sequence[str],
                  model: str | None, checkpoint: str | None, sift: SiftParams = SiftParams(),
                  limits: ImageLimits = ImageLimits(), report: ShardReport | None = None
                  ) -> KeypointStore:
        """The store for ``paths`` under the view of a (cached) model."""
        view = load_model_cached(model, checkpoint).view
        return cls(context(settings), dataset_id, view, paths, sift, limits, report)

    def _reject(self, path: str, sha: str | None, reason: str, detail: str) -> None:
        text = path_text(path)
        log.warning("rejected %s: %s: %s", Path(text).name, reason, detail)
        self.report.rejected.append({"path": text, "reason": reason, "detail": detail})
        self._images.append({"dataset_id": self.dataset_id, "path": text, "sha256": sha,
                             "size_bytes": None, "status": "rejected",
                             "rejection_reason": reason, "rejection_detail": detail})

    def flush(self) -> None:
        """Index the images and keypoint sets seen since the last flush, in one transaction."""
        if not self._images and not self._sets:
            return
        with self.ctx.meta.session() as s:
            upsert(s, Image, self._images, ["dataset_id", "path"],
                   update=["sha256", "size_bytes", "status", "rejection_reason",
                           "rejection_detail"])
            upsert(s, KeypointSet, self._sets, ["image_sha256", "params_digest"])
        self.known.update({r["path"]: r["sha256"] for r in self._images if r["status"] == "ok"})
        self._images, self._sets = [], []


def sift_shard(settings: Settings, dataset_id: int, shard: int, paths: Sequence[str],
               model: str | None, checkpoint: str | None,
               sift: SiftParams = SiftParams(), limits: ImageLimits = ImageLimits()
               ) -> ShardReport:
    """SIFT on each image of a shard, unless its keypoints are already stored."""
    report = ShardReport(shard)
    kps = KeypointStore.for_model(settings, dataset_id, paths, model, checkpoint, sift, limits,
                                  report)
    for path in paths:
        kps.get(path, need_view=False)
    kps.flush()
    log.info("shard %d: %d computed, %d from the store, %d rejected", shard, report.computed,
             report.cached, len(report.rejected))
    return report
