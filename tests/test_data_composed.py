"""The composed offline benchmarks: determinism, the planted correlation, masks and cue
ground truth, and the trainer's shift augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitsem.data.composed import ComposedSpec, make_composed_dataset, render_composed
from vitsem.data.shortcut import ShortcutDataset
from vitsem.data.train import _shift


def test_rendering_is_deterministic_and_the_mask_is_the_digit() -> None:
    spec = ComposedSpec(family="background", seed=3)
    a, ma, sa = render_composed(spec, "train", 5)
    b, mb, sb = render_composed(spec, "train", 5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert sa == sb
    x0, y0, x1, y1 = sa.object_box
    assert ma[y0:y1, x0:x1].any() and not ma[:y0].any() and not ma[y1:].any()


@pytest.mark.parametrize("family", ["glyph", "background"])
def test_the_cue_follows_rho_in_training_and_not_at_test_time(family: str) -> None:
    spec = ComposedSpec(family=family, rho=0.9, seed=1)
    train = [render_composed(spec, "train", i)[2] for i in range(400)]
    test = [render_composed(spec, "test", i)[2] for i in range(400)]
    if family == "glyph":
        agree = np.mean([(s.cue_class is not None) == (s.label == 0) for s in train])
        assert 0.85 <= agree <= 0.95
        present = np.mean([s.cue_class is not None for s in test])
        assert 0.4 <= present <= 0.6
        assert all((s.glyph_box is not None) == (s.cue == "glyph") for s in train)
    else:
        cued = [s for s in train if s.cue_class is not None]
        assert 0.85 <= np.mean([s.cue_class == s.label for s in cued]) <= 0.95
        assert 0.1 <= 1 - len(cued) / len(train) <= 0.3  # neutral backgrounds in training
        t = [s for s in test if s.cue_class is not None]
        assert abs(np.mean([s.cue_class == s.label for s in t]) - 1 / 3) < 0.08
        assert all(s.group.endswith("bg-neutral") != s.shortcut for s in test)


def test_control_plants_no_correlated_cue() -> None:
    spec = ComposedSpec(family="glyph", control=True)
    assert not any(render_composed(spec, split, i)[2].shortcut
                   for split in ("train", "test") for i in range(50))
    spec = ComposedSpec(family="background", control=True, rho=0.99)
    rows = [render_composed(spec, "train", i)[2] for i in range(600)]
    cued = [s for s in rows if s.cue_class is not None]
    assert len(cued) > 400  # photo backgrounds, as in the planted runs...
    assert abs(np.mean([s.cue_class == s.label for s in cued]) - 1 / 3) < 0.06  # ...at random


def test_a_written_benchmark_loads_with_three_splits(tmp_path: Path) -> None:
    spec = ComposedSpec(n_train=12, n_val=6, n_test=9, image_size=48)
    root = make_composed_dataset(tmp_path / "d", spec, workers=1)
    ds = ShortcutDataset.load(root)
    assert ds.spec == spec and ds.class_names == ["zero", "one", "four"]
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [12, 6, 9]
    s = ds.split("test")[0]
    img = np.asarray(Image.open(root / s.file))
    assert img.shape == (48, 48, 3)
    mask = np.asarray(Image.open(root / s.mask))
    assert set(np.unique(mask)) <= {0, 255}
    info = json.loads((root / "dataset.json").read_text())
    assert info["kind"] == "vitsem-composed-benchmark"


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="digits"):
        ComposedSpec(digits=(1, 1)).validate()
    with pytest.raises(ValueError, match="glyph"):
        ComposedSpec(glyph="logo").validate()


def test_shift_moves_each_image_by_its_own_offset() -> None:
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the centre
    out = _shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = [divmod(int(o.argmax()), 9) for o in out[:, 0]]
    assert all(2 <= r <= 6 and 2 <= c <= 6 for r, c in pos)
    assert len(set(pos)) > 10  # per-image offsets, not one for the batch
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(64))
