"""Streaming statistics whose memory does not grow with the number of images.

:class:`StreamingMoments` keeps, per element of a fixed shape, the count of finite values,
their mean and the sum of squared deviations (Welford / Chan et al.), so batches can be
added in any order and shards merged, and the result equals the batch computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats


@dataclass
class Summary:
    """Per-element mean, sample standard deviation, count and a 95% t-interval."""

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


class StreamingMoments:
    """NaN-aware running mean and variance over the leading axis of added batches."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.count = np.zeros(self.shape, np.int64)
        self.mean = np.zeros(self.shape, np.float64)
        self.m2 = np.zeros(self.shape, np.float64)

    def add(self, batch: np.ndarray) -> None:
        """Add ``batch`` of shape (B, *shape); NaN entries are skipped element-wise."""
        x = np.asarray(batch, np.float64)
        if x.shape[1:] != self.shape:
            raise ValueError(f"batch shape {x.shape[1:]} does not match {self.shape}")
        finite = np.isfinite(x)
        n_b = finite.sum(0)
        xz = np.where(finite, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_b = np.where(n_b > 0, xz.sum(0) / np.maximum(n_b, 1), 0.0)
        m2_b = np.where(finite, (x - mean_b) ** 2, 0.0).sum(0)
        self._combine(n_b, mean_b, m2_b)

    def merge(self, other: StreamingMoments) -> None:
        """Fold another accumulator of the same shape into this one (for shards)."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge shape {other.shape} into {self.shape}")
        self._combine(other.count, other.mean, other.m2)

    def _combine(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.count
        n = n_a + n_b
        safe_n = np.maximum(n, 1)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / safe_n)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / safe_n)
        self.count = n

    def summary(self, confidence: float = 0.95) -> Summary:
        n = self.count
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, self.mean, np.nan)
            var = np.where(n > 1, self.m2 / np.maximum(n - 1, 1), np.nan)
            std = np.sqrt(var)
            t = _scipy_stats.t.ppf(0.5 + confidence / 2, np.maximum(n - 1, 1))
            half = np.where(n > 1, t * std / np.sqrt(np.maximum(n, 1)), np.nan)
        return Summary(mean, std, n, mean - half, mean + half)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "count": self.count.tolist(),
                "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamingMoments:
        out = cls(tuple(d["shape"]))
        out.count = np.asarray(d["count"], np.int64).reshape(out.shape)
        out.mean = np.asarray(d["mean"], np.float64).reshape(out.shape)
        out.m2 = np.asarray(d["m2"], np.float64).reshape(out.shape)
        return out


class StatsAccumulator:
    """A :class:`StreamingMoments` per named statistic, e.g. the per-head statistics of
    :mod:`vitsem.method.analysis` with element shape (L, H, ...)."""

    def __init__(self) -> None:
        self.moments: dict[str, StreamingMoments] = {}
        self.num_images = 0

    def add(self, stats: dict[str, np.ndarray]) -> None:
        """Add a batch: name -> (B, *shape) arrays, all with the same B."""
        sizes = {v.shape[0] for v in stats.values()}
        if len(sizes) > 1:
            raise ValueError(f"statistics disagree on batch size: {sorted(sizes)}")
        for name, value in stats.items():
            if name not in self.moments:
                self.moments[name] = StreamingMoments(value.shape[1:])
            self.moments[name].add(value)
        self.num_images += sizes.pop() if sizes else 0

    def merge(self, other: StatsAccumulator) -> None:
        for name, m in other.moments.items():
            if name in self.moments:
                self.moments[name].merge(m)
            else:
                self.moments[name] = StreamingMoments.from_dict(m.to_dict())
        self.num_images += other.num_images

    def summary(self, confidence: float = 0.95) -> dict[str, Summary]:
        return {name: m.summary(confidence) for name, m in self.moments.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"num_images": self.num_images,
                "moments": {k: m.to_dict() for k, m in self.moments.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatsAccumulator:
        out = cls()
        out.num_images = int(d["num_images"])
        out.moments = {k: StreamingMoments.from_dict(v) for k, v in d["moments"].items()}
        return out
