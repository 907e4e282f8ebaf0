"""SIFT keypoints on the image exactly as the model sees it.

A :class:`Keypoints` holds one image's keypoints as flat arrays (no per-keypoint objects),
in pixel coordinates of the model view (x to the right, y down, origin at the top-left
pixel's centre, as OpenCV reports them).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from vitsem.errors import ImageError
from vitsem.method.images import ImageLimits, open_image
from vitsem.method.view import ModelView

T = TypeVar("T")


@dataclass(frozen=True)
class SiftParams:
    """OpenCV SIFT parameters (``cv2.SIFT_create``); defaults are OpenCV's."""

    nfeatures: int = 0
    n_octave_layers: int = 3
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    sigma: float = 1.6
    descriptors: bool = False

    def create(self) -> Any:
        return cv2.SIFT_create(  # type: ignore[attr-defined]
            nfeatures=self.nfeatures,
            nOctaveLayers=self.n_octave_layers,
            contrastThreshold=self.contrast_threshold,
            edgeThreshold=self.edge_threshold,
            sigma=self.sigma,
        )


@dataclass
class Keypoints:
    """One image's keypoints. Shapes: ``xy`` (K, 2) float32 pixels, ``size``/``angle``
    (degrees)/``response`` (K,) float32, ``octave`` (K,) int32 (OpenCV's packed octave),
    ``descriptors`` (K, 128) float32 or None; ``image_hw`` is the view's (height, width)."""

    xy: np.ndarray
    size: np.ndarray
    angle: np.ndarray
    response: np.ndarray
    octave: np.ndarray
    image_hw: tuple[int, int]
    descriptors: np.ndarray | None = field(default=None)

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    @classmethod
    def empty(cls, image_hw: tuple[int, int]) -> Keypoints:
        z = np.zeros(0, np.float32)
        return cls(np.zeros((0, 2), np.float32), z, z.copy(), z.copy(), np.zeros(0, np.int32),
                   image_hw)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for ``np.savez`` / Parquet; inverse of :meth:`from_arrays`."""
        out = {"xy": self.xy, "size": self.size, "angle": self.angle, "response": self.response,
               "octave": self.octave, "image_hw": np.asarray(self.image_hw, np.int32)}
        if self.descriptors is not None:
            out["descriptors"] = self.descriptors
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Keypoints:
        hw = arrays["image_hw"]
        return cls(arrays["xy"], arrays["size"], arrays["angle"], arrays["response"],
                   arrays["octave"], (int(hw[0]), int(hw[1])), arrays.get("descriptors"))


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB uint8 or (H, W) gray -> (H, W) uint8 gray (OpenCV's luma weights)."""
    if image.ndim == 2:
        return np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")


def detect_sift(image: np.ndarray, params: SiftParams = SiftParams()) -> Keypoints:
    """Run SIFT on one image, (H, W, 3) RGB or (H, W) gray, uint8."""
    gray = to_gray_uint8(image)
    sift = params.create()
    if params.descriptors:
        kps, desc = sift.detectAndCompute(gray, None)
    else:
        kps, desc = sift.detect(gray, None), None
    hw = (int(gray.shape[0]), int(gray.shape[1]))
    n = len(kps)
    if n == 0:
        out = Keypoints.empty(hw)
        if params.descriptors:
            out.descriptors = np.zeros((0, 128), np.float32)
        return out

    # map/attrgetter iterate in C: no Python bytecode runs per keypoint.
    def grab(name: str, dtype: type) -> np.ndarray:
        return np.fromiter(map(attrgetter(name), kps), dtype=dtype, count=n)

    pts = cv2.KeyPoint_convert(kps)  # type: ignore[attr-defined]
    xy = np.asarray(pts, np.float32).reshape(n, 2)
    return Keypoints(
        xy=xy,
        size=grab("size", np.float32),
        angle=grab("angle", np.float32),
        response=grab("response", np.float32),
        octave=grab("octave", np.int32),
        image_hw=hw,
        descriptors=None if desc is None else np.asarray(desc, np.float32),
    )


# ---------------------------------------------------------------------------------------------
# Batch work over many files: all cores, deterministic order, bad files quarantined.


@dataclass(frozen=True)
class ViewedKeypoints:
    """A file's model view (H, W, 3) uint8 and its keypoints."""

    path: str
    view: np.ndarray
    keypoints: Keypoints


@dataclass(frozen=True)
class Rejected:
    """A file a batch skipped, and why (``reason`` is the error's code)."""

    path: str
    reason: str
    detail: str


def _init_worker() -> None:
    # One thread per process: the pool supplies the parallelism, and nested thread pools
    # would oversubscribe the cores.
    cv2.setNumThreads(1)


def _sift_file(job: tuple[str, ModelView, SiftParams, ImageLimits]) -> ViewedKeypoints | Rejected:
    path, view, params, limits = job
    try:
        img = open_image(path, limits=limits)
        arr = view.geometry_array(img)
        return ViewedKeypoints(path, arr, detect_sift(arr, params))
    except ImageError as e:
        return Rejected(e.path, e.reason, e.detail)


def default_workers() -> int:
    """Usable cores (respects CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _apply_chunk(fn: Callable[[T], object], chunk: Sequence[T]) -> list[object]:
    return [fn(job) for job in chunk]


def parallel_map(fn: Callable[[T], object], jobs: Iterable[T], workers: int,
                 chunksize: int) -> Iterator[object]:
    """Ordered ``map`` over a process pool, or in-process when ``workers <= 1``.

    At most ``2 * workers`` chunks are in flight, so memory stays bounded however many jobs
    there are and however slowly the caller consumes the results.
    """
    if workers <= 1:
        _init_worker()
        yield from map(fn, jobs)
        return
    it = iter(jobs)
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        pending: deque[Future[list[object]]] = deque()
        while True:
            chunk = list(islice(it, chunksize))
            if chunk:
                pending.append(pool.submit(_apply_chunk, fn, chunk))
            if pending and (not chunk or len(pending) >= 2 * workers):
                yield from pending.popleft().result()
            if not chunk and not pending:
                return


def sift_files(paths: Iterable[str | Path], view: ModelView, params: SiftParams = SiftParams(),
               *, workers: int | None = None, limits: ImageLimits = ImageLimits(),
               chunksize: int = 8) -> Iterator[ViewedKeypoints | Rejected]:
    """Load each file, apply the model's view and run SIFT, over ``workers`` processes
    (default: all cores). Yields results in input order; bad files come back as
    :class:`Rejected` instead of stopping the batch."""
    jobs = ((str(p), view, params, limits) for p in paths)
    n = default_workers() if workers is None else workers
    for item in parallel_map(_sift_file, jobs, n, chunksize):
        assert isinstance(item, ViewedKeypoints | Rejected)
        yield item
