"""Audit building blocks: token removal, attribution maps and the off-object score, on
cases with known answers and against literal references."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from vitsem.audit.maps import MAPS, attention_rollout, cls_attention_last
from vitsem.audit.scores import off_object_semantic_attention, patch_coverage
from vitsem.audit.tokens import predict_removed_reference, predict_without
from vitsem.concentration import TokenGrid


def _vit(**kw: object) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3,
                             num_classes=4, **kw).eval()


def _drop(b: int, n: int, counts: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    drop = torch.zeros(b, n, dtype=torch.bool)
    for i, c in enumerate(counts):
        drop[i, torch.randperm(n, generator=g)[:c]] = True
    return drop


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}, {"class_token": False,
                                                         "global_pool": "avg"}])
def test_removal_equals_a_shorter_sequence(kw: dict) -> None:
    model = _vit(**kw)
    x = torch.randn(3, 3, 32, 32)
    drop = _drop(3, 4, [1, 2, 1])
    with torch.no_grad():
        batched = predict_without(model, x, drop)
        for i in range(3):  # literally one shorter sequence per image
            ref = predict_removed_reference(model, x[i:i + 1], drop[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(predict_without(model, x, torch.zeros(3, 4, dtype=torch.bool)),
                                   model(x))


def test_removal_changes_the_output_and_refuses_empty() -> None:
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(predict_without(model, x, _drop(2, 4, [2, 2])), model(x))
        with pytest.raises(ValueError, match="no patch token"):
            predict_without(model, x, torch.ones(2, 4, dtype=torch.bool))


def test_maps_are_distributions_over_patches() -> None:
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    for name, fn in MAPS.items():
        m = fn(model, x)
        assert m.shape == (2, 4), name
        torch.testing.assert_close(m.sum(-1), torch.ones(2), msg=name)
        assert (m >= 0).all(), name


def test_rollout_of_a_single_block_is_its_mixed_cls_row() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
                              num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    from vitsem.attention import extract_attention

    with torch.no_grad():
        _, maps = extract_attention(model, x)
    a = maps[0].mean(1)[0]
    mixed = 0.5 * a + 0.5 * torch.eye(5)
    mixed = mixed / mixed.sum(-1, keepdim=True)
    expected = mixed[0, 1:] / mixed[0, 1:].sum()
    torch.testing.assert_close(attention_rollout(model, x)[0], expected)
    last = a[0, 1:] / a[0, 1:].sum()
    torch.testing.assert_close(cls_attention_last(model, x)[0], last)


def test_patch_coverage_and_off_object_share() -> None:
    grid = TokenGrid((4, 4), (2, 2))
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # patch 0 fully, nothing else
    mask[4:6, 4:8] = True  # half of patch 3
    np.testing.assert_allclose(patch_coverage(mask, grid), [1.0, 0.0, 0.0, 0.5])
    attention = np.array([[0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 0.0, 0.0]])
    semantic = np.array([[1, 1, 0, 1], [1, 1, 1, 1]])
    cov = np.tile(patch_coverage(mask, grid), (2, 1))
    out = off_object_semantic_attention(attention, semantic, cov)
    assert out[0] == pytest.approx(0.3 + 0.1 * 0.5)  # patch 1 wholly, patch 3 half outside
    assert np.isnan(out[1])  # an empty map has no share to report
