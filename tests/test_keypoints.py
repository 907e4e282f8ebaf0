"""SIFT on the model view and the keypoint-to-token-grid mapping."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image

from vitsem.method.attention import token_layout
from vitsem.method.concentration import (
    TokenGrid,
    concentration,
    concentration_levels,
    patch_weights,
)
from vitsem.method.keypoints import Keypoints, ViewedKeypoints, detect_sift, sift_files
from vitsem.method.view import ModelView


def _blob_image(w: int, h: int, cx: float, cy: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    spot = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return np.clip(200 - 180 * spot, 0, 255).astype(np.uint8)


def _kps(xy: list[tuple[float, float]], size: float = 2.0, response: float = 1.0) -> Keypoints:
    n = len(xy)
    return Keypoints(np.asarray(xy, np.float32).reshape(n, 2), np.full(n, size, np.float32),
                     np.zeros(n, np.float32), np.full(n, response, np.float32),
                     np.zeros(n, np.int32), (64, 64))


def test_patch_index_hand_built() -> None:
    grid = TokenGrid((16, 16), (4, 4))
    xy = np.array([[0, 0], [15, 0], [16, 0], [15.4, 15.4], [63, 63], [20, 40], [64, 0], [-1, 3]],
                  np.float32)
    # pixel 15 is the last of patch 0; 16 starts patch 1; row 2 col 1 -> 9; outside -> -1
    assert grid.patch_index(xy).tolist() == [0, 0, 1, 0, 15, 9, -1, -1]


def test_weightings_and_levels() -> None:
    grid = TokenGrid((16, 16), (4, 4))
    kps = _kps([(8, 8), (9, 9), (40, 8), (40, 40)], response=0.5)
    c = concentration(kps, grid, "count")
    assert c[0] == 2 and c[2] == 1 and c[10] == 1 and c.sum() == 4
    r = concentration(kps, grid, "response")
    np.testing.assert_allclose(r, c * 0.5)
    s = concentration(kps, grid, "scale")
    # Small keypoints in patch centres keep nearly all their unit mass in their own patch.
    np.testing.assert_allclose(s, c, atol=1e-6)
    big = concentration(_kps([(15.5, 15.5)], size=8.0), grid, "scale")
    # Centred on a 4-patch corner (pixel edge 16), sigma 4: each patch holds the Gaussian
    # mass of one quadrant clipped at the patch's far edges, 16 px = 4 sigma away.
    half = 0.5 * math.erf(16 / (4 * math.sqrt(2)))
    np.testing.assert_allclose(big[[0, 1, 4, 5]], half**2, rtol=1e-9)
    w = patch_weights(c)
    assert w.sum() == pytest.approx(1.0)
    levels = concentration_levels(c)
    assert levels[0] == 2 and levels[2] == 1 and levels[10] == 1 and (levels[c == 0] == 0).all()
    with pytest.raises(ValueError, match="unknown weighting"):
        concentration(kps, grid, "votes")
    # Fixed thresholds (e.g. data-set quantiles) instead of the image's own median.
    assert concentration_levels(c, 3, np.array([1.5]))[0] == 2
    assert concentration_levels(c, 3, np.array([2.0]))[0] == 1


def test_no_keypoints_gives_zero_weights() -> None:
    grid = TokenGrid((16, 16), (4, 4))
    c = concentration(Keypoints.empty((64, 64)), grid)
    assert c.sum() == 0 and patch_weights(c).sum() == 0
    assert (concentration_levels(c) == 0).all()


def test_keypoint_at_known_pixel_lands_in_known_patch() -> None:
    img = _blob_image(64, 64, cx=40, cy=24, sigma=2.5)
    kps = detect_sift(img)
    assert len(kps) >= 1
    best = int(np.argmax(kps.response))
    np.testing.assert_allclose(kps.xy[best], [40, 24], atol=1.0)
    grid = TokenGrid((16, 16), (4, 4))
    assert grid.patch_index(kps.xy[best:best + 1])[0] == 1 * 4 + 2


def test_keypoints_follow_the_models_resize_and_crop() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    view = ModelView.from_model(model)
    cfg = view.data_config
    assert cfg["crop_pct"] < 1.0  # timm crops: the view is not a plain resize
    w, h = 300, 200
    cx, cy = 170.0, 110.0  # original pixel
    original = Image.fromarray(_blob_image(w, h, cx, cy, sigma=3.0)).convert("RGB")
    # Reference geometry of timm's eval transform: shorter side -> floor(224 / crop_pct),
    # then a centred 224 crop.
    scale_size = int(224 / cfg["crop_pct"])
    s = scale_size / min(w, h)
    new_w, new_h = int(w * s), scale_size
    left, top = round((new_w - 224) / 2), round((new_h - 224) / 2)
    ex = (cx + 0.5) * s - 0.5 - left
    ey = (cy + 0.5) * s - 0.5 - top
    arr = view.geometry_array(original)
    assert arr.shape == (224, 224, 3)
    kps = detect_sift(arr)
    best = int(np.argmax(kps.response))
    np.testing.assert_allclose(kps.xy[best], [ex, ey], atol=1.5)
    grid = token_layout(model, view.hw).grid
    expected_patch = int(ey // 16) * 14 + int(ex // 16)
    assert grid.patch_index(kps.xy[best:best + 1])[0] == expected_patch
    # The uncropped position would be a different patch: the mapping really is tested.
    assert int(cy // 16) * 14 + int(cx // 16) != expected_patch


def test_batch_is_deterministic_across_worker_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    view = ModelView.from_data_config({"input_size": (3, 48, 48), "mean": (0.5,) * 3,
                                       "std": (0.5,) * 3, "crop_pct": 1.0})
    one = list(sift_files(paths, view, workers=1))
    two = list(sift_files(paths, view, workers=2, chunksize=1))
    assert all(isinstance(r, ViewedKeypoints) for r in one + two)
    for a, b in zip(one, two, strict=True):
        assert isinstance(a, ViewedKeypoints) and isinstance(b, ViewedKeypoints)
        assert a.path == b.path
        np.testing.assert_array_equal(a.keypoints.xy, b.keypoints.xy)
        np.testing.assert_array_equal(a.keypoints.response, b.keypoints.response)


def test_descriptors_optional() -> None:
    from vitsem.method.keypoints import SiftParams

    img = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    with_desc = detect_sift(img, SiftParams(descriptors=True))
    assert with_desc.descriptors is not None
    assert with_desc.descriptors.shape == (len(with_desc), 128)
    assert detect_sift(img).descriptors is None
    # One stored set (with descriptors) serves every use: the same keypoints either way.
    plain = detect_sift(img)
    np.testing.assert_array_equal(plain.xy, with_desc.xy)
    np.testing.assert_array_equal(plain.response, with_desc.response)
