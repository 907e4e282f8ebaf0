"""The benchmark generator and the tiny-ViT trainer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitsem.data.shortcut import ShortcutDataset, ShortcutSpec, make_shortcut_dataset, render_sample
from vitsem.errors import DatasetError
from vitsem.method.models import load_model


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_by_seed(tmp_path: Path) -> None:
    spec = ShortcutSpec(n_train=20, n_test=8, seed=5)
    a = make_shortcut_dataset(tmp_path / "a", spec, workers=1)
    b = make_shortcut_dataset(tmp_path / "b", spec, workers=2)
    assert _digest(a) == _digest(b)
    c = make_shortcut_dataset(tmp_path / "c", ShortcutSpec(n_train=20, n_test=8, seed=6), workers=1)
    assert _digest(a) != _digest(c)


@pytest.mark.parametrize("glyph", ["checker", "text", "bullseye"])
def test_shortcut_agreement_and_groups(glyph: str) -> None:
    spec = ShortcutSpec(rho=0.9, glyph=glyph, position="random")
    rows = [render_sample(spec, "train", i)[2] for i in range(600)]
    agree = np.mean([r.agrees for r in rows])
    assert 0.86 < agree < 0.94
    assert all(r.shortcut == (r.label == 0) for r in rows if r.agrees)
    assert all(r.group == f"{r.class_name}|{'glyph' if r.shortcut else 'no-glyph'}" for r in rows)
    test_rows = [render_sample(spec, "test", i)[2] for i in range(600)]
    present = np.array([r.shortcut for r in test_rows])
    is_target = np.array([r.label == 0 for r in test_rows])
    assert 0.42 < present.mean() < 0.58  # decorrelated: independent of the label
    assert abs(present[is_target].mean() - present[~is_target].mean()) < 0.12


def test_glyph_pixels_and_masks() -> None:
    spec = ShortcutSpec(glyph="checker")
    img, mask, row = next(r for r in (render_sample(spec, "train", i) for i in range(50))
                          if r[2].shortcut)
    assert row.glyph_box is not None
    x0, y0, x1, y1 = row.glyph_box
    patch = img[y0:y1, x0:x1].astype(int)
    assert patch.min() < 15 and patch.max() > 240  # black and white cells
    ox0, oy0, ox1, oy1 = row.object_box
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (ox0, oy0, ox1, oy1)


def test_control_has_no_shortcut() -> None:
    spec = ShortcutSpec(glyph="none")
    assert not any(render_sample(spec, "train", i)[2].shortcut for i in range(100))


def test_reversed_test_split() -> None:
    spec = ShortcutSpec(rho=0.95, test_mode="reversed")
    rows = [render_sample(spec, "test", i)[2] for i in range(300)]
    assert np.mean([r.agrees for r in rows]) < 0.12


def test_bad_specs_and_folders(tmp_path: Path) -> None:
    for bad in (ShortcutSpec(rho=1.5), ShortcutSpec(glyph="logo"), ShortcutSpec(num_classes=9)):
        with pytest.raises(ValueError):
            bad.validate()
    with pytest.raises(DatasetError, match="vitsem data make"):
        ShortcutDataset.load(tmp_path)


def test_trainer_writes_a_loadable_checkpoint(small_dataset: Path, small_checkpoint: Path
                                              ) -> None:
    ds = ShortcutDataset.load(small_dataset)
    assert len(ds.split("train")) == 96 and len(ds.split("test")) == 40
    model, spec = load_model(checkpoint=small_checkpoint)
    assert spec.class_names == ["disc", "square", "triangle"]
    assert spec.kwargs["img_size"] == 64 and spec.kwargs["patch_size"] == 8
    img = Image.open(small_dataset / ds.samples[0].file)
    assert img.size == (64, 64)
    assert model.patch_embed.grid_size == (8, 8)
