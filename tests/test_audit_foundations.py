"""Audit building blocks: token removal, attribution maps and the off-object score, on
cases with known answers and against literal references."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from tests.references import predict_removed_reference
from vitsem.audit.maps import MAPS, attention_rollout, cls_attention_last
from vitsem.audit.scores import off_object_semantic_attention, patch_coverage
from vitsem.audit.tokens import predict_without
from vitsem.method.concentration import TokenGrid


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
    semantic = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for name, fn in MAPS.items():
        m = fn(model, x, semantic)
        assert m.shape == (2, 4), name
        torch.testing.assert_close(m.sum(-1), torch.ones(2), msg=name)
        assert (m >= 0).all(), name


def test_rollout_of_a_single_block_is_its_mixed_cls_row() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
                              num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    from vitsem.method.attention import extract_attention

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


# ---------------------------------------------------------------------------------------------
# Discovery and the causal check on hand-built cases.

from vitsem.audit.causal import causal_check, matched_random_drop  # noqa: E402
from vitsem.audit.discovery import (  # noqa: E402
    discover_candidates,
    match_patches,
    recurring_positions,
)


def _synthetic(planted: bool, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray],
                                                      np.ndarray, np.ndarray, np.ndarray]:
    """20 images, 16 patches, 2 classes. With ``planted``, every class-0 image carries a
    fixed descriptor (the 'glyph') at patch 0, where its attention peaks."""
    rng = np.random.default_rng(seed)
    glyph = rng.normal(0, 1, 128) * 5
    descs, patches = [], []
    attention = rng.uniform(0.5, 1.0, (20, 16))
    predicted = np.array([0, 1] * 10)
    for i in range(20):
        d = rng.normal(0, 1, (6, 128)) * 5
        p = rng.integers(1, 16, 6)
        if planted and predicted[i] == 0:
            d = np.vstack([d, glyph + rng.normal(0, 0.1, 128)])
            p = np.append(p, 0)
            attention[i, 0] = 5.0
        descs.append(d)
        patches.append(p)
    attention /= attention.sum(1, keepdims=True)
    return descs, patches, attention, predicted, glyph


def test_planted_pattern_is_the_top_candidate() -> None:
    descs, patches, attention, predicted, glyph = _synthetic(planted=True)
    cands = discover_candidates(descs, patches, attention, predicted, top_fraction=0.0625)
    assert cands, "the planted pattern was not found"
    top = cands[0]
    assert top.cls == 0 and top.recurrence == 1.0 and top.other_rate == 0.0
    assert np.linalg.norm(top.centroids - glyph, axis=1).min() < 1.0
    assert top.attention_lift > 2
    mask = match_patches(top.centroids, top.radii, descs, patches, 16)
    np.testing.assert_array_equal(mask, top.patches)
    expected = np.zeros((20, 16), bool)
    expected[predicted == 0, 0] = True
    np.testing.assert_array_equal(mask, expected)


def test_no_candidate_without_a_recurring_pattern() -> None:
    descs, patches, attention, predicted, _ = _synthetic(planted=False)
    assert discover_candidates(descs, patches, attention, predicted) == []
    assert discover_candidates([np.zeros((0, 128))] * 2, [np.zeros(0)] * 2,
                               np.full((2, 4), 0.25), np.array([0, 1])) == []


def _stamp_attention(stamped: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """60 images on a 4 x 4 grid, 3 classes, no keypoint anywhere. With ``stamped``, four
    of five class-0 images carry a stamp across patches 14 and 15 (bottom right)
    where their attribution peaks; every image also peaks at one random place (its
    object)."""
    rng = np.random.default_rng(seed)
    predicted = np.repeat([0, 1, 2], 20)
    attention = rng.uniform(0.5, 1.0, (60, 16))
    attention[np.arange(60), rng.integers(0, 16, 60)] = 4.0
    if stamped:
        rows = np.flatnonzero(predicted == 0)[:16]
        attention[rows, 14] = 6.0
        attention[rows, 15] = 5.0
        attention[[20, 40], 15] = 6.0  # rarer elsewhere: one image of class 1 and of 2
    return attention / attention.sum(1, keepdims=True), predicted


def test_a_stamp_without_keypoints_is_a_candidate_by_its_place() -> None:
    attention, predicted = _stamp_attention(stamped=True)
    # Descriptor discovery has nothing to cluster: no keypoint falls on the stamp.
    assert discover_candidates([np.zeros((0, 128))] * 60, [np.zeros(0)] * 60, attention,
                               predicted, top_fraction=0.125) == []
    cands = recurring_positions(attention, predicted, top_fraction=0.125, grid_hw=(4, 4))
    assert len(cands) == 1
    top = cands[0]
    assert top.cls == 0 and top.centroids.shape == (0, 128) and top.radii.shape == (0,)
    # Marked: every image whose top two patches touch the stamp's place, with both of its
    # patches: the 16 stamped ones, the two elsewhere, and objects that happen to peak there.
    hit = (np.argsort(-attention, 1)[:, :2] >= 14).any(1)
    assert hit[:16].all() and hit[[20, 40]].all()
    expected = np.zeros((60, 16), bool)
    expected[hit, 14:] = True
    np.testing.assert_array_equal(top.patches, expected)
    assert top.recurrence == pytest.approx(hit[:20].mean()) and top.recurrence >= 16 / 20
    assert top.other_rate == pytest.approx(hit[20:].mean())
    assert top.recurrence >= 1.5 * top.other_rate
    assert top.attention_lift > 2


def test_no_place_candidate_from_chance_peaks_or_a_place_every_class_uses() -> None:
    # Objects peak at random places: 48 places x classes tested, none passes by chance
    # (seed 0 has one class peaking at one place in 6 of 20 images against 1 of 40:
    # p = 0.003 alone, not after the correction for the 48 tests).
    attention, predicted = _stamp_attention(stamped=False)
    assert recurring_positions(attention, predicted, top_fraction=0.125, grid_hw=(4, 4)) == []
    assert recurring_positions(attention, predicted, top_fraction=0.125, grid_hw=(4, 4),
                               alpha=0.5)  # without the correction it would
    # A place every class attends to (the centre, say) is not class-specific.
    attention, predicted = _stamp_attention(stamped=False)
    attention[:, 5] = 1.0
    attention /= attention.sum(1, keepdims=True)
    assert recurring_positions(attention, predicted, top_fraction=0.125, grid_hw=(4, 4)) == []
    # A few images of one class peaking at one place is chance, not recurrence: 5 of 20
    # against 1 of 40 is 10x enriched but fails the recurrence floor of 0.3.
    attention, predicted = _stamp_attention(stamped=False, seed=1)
    attention[:5, 3] = 1.0
    assert not [c for c in recurring_positions(attention, predicted, top_fraction=0.125,
                                               grid_hw=(4, 4)) if c.patches[:, 3].any()]


def test_matched_random_drop_avoids_the_candidate() -> None:
    cand = torch.zeros(3, 10, dtype=torch.bool)
    cand[0, :2] = True
    cand[1, 5:9] = True
    drop = matched_random_drop(cand, torch.Generator().manual_seed(0))
    assert drop.sum(1).tolist() == [2, 4, 0]
    assert not (drop & cand).any()


def test_causal_check_confirms_a_real_cause_and_rejects_a_decoy() -> None:
    n = 8

    def predict(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        # Class 0 evidence lives in patch 0 only: removing it flips the prediction.
        has = (~drop[:, 0]).float() * 4.0
        return torch.stack([has, torch.zeros_like(has)], 1)

    x = torch.zeros(12, 3, 4, 4)
    target = torch.zeros(12, dtype=torch.long)
    cause = torch.zeros(12, n, dtype=torch.bool)
    cause[:, 0] = True
    res = causal_check(predict, x, target, cause)
    # p(class 0) falls from sigmoid(4) to 1/2 without patch 0; random drops change nothing
    assert res.confirmed and res.effect == pytest.approx(1 / (1 + np.exp(-4)) - 0.5, abs=1e-6)
    assert res.random_effect == pytest.approx(0.0)
    assert res.images == 12 and res.p_value < 0.01
    decoy = torch.zeros(12, n, dtype=torch.bool)
    decoy[:, 3] = True
    res = causal_check(predict, x, target, decoy)
    assert not res.confirmed and res.effect == pytest.approx(0.0)
    none = causal_check(predict, x, target, torch.zeros(12, n, dtype=torch.bool))
    assert not none.confirmed and none.images == 0


def test_causal_check_on_a_vit_with_token_removal() -> None:
    model = _vit()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        target = model(x).argmax(-1)
    cand = torch.zeros(6, 4, dtype=torch.bool)
    cand[:, 1] = True
    res = causal_check(lambda xx, d: predict_without(model, xx, d), x, target, cand, trials=3)
    assert res.images == 6 and np.isfinite(res.effect) and np.isfinite(res.random_effect)


def test_the_repair_builds_on_the_method_map_else_the_first_map_that_confirmed() -> None:
    """A pattern without keypoints is confirmed by a baseline map only (the bench's bullseye);
    the repair must still get pseudo-groups from it rather than be skipped."""
    from types import SimpleNamespace

    from vitsem.audit.pipeline import METHOD, MapAudit, repair_reference

    def map_audit(name: str, *relied: bool) -> MapAudit:
        findings = [SimpleNamespace(relied_on=r) for r in relied]
        empty = np.zeros(0)
        return MapAudit(name, findings, empty, empty, empty)  # type: ignore[arg-type]

    both = {METHOD: map_audit(METHOD, False, True), "gae": map_audit("gae", True)}
    assert repair_reference(both) is both[METHOD]
    blind = {METHOD: map_audit(METHOD, False), "rollout": map_audit("rollout"),
             "gae": map_audit("gae", False, True), "occlusion": map_audit("occlusion", True)}
    assert repair_reference(blind) is blind["gae"]  # the first in audit order
    assert repair_reference({METHOD: map_audit(METHOD, False), "gae": map_audit("gae")}) is None
    assert repair_reference({}) is None
