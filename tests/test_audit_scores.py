"""The audit's new scores on hand-built cases with known answers: deletion curves and ABPC
on a toy model, localisation, the gradient-weighted rollout and leave-one-out occlusion
against literal implementations, candidate growth, the last-layer repair on a linearly
separable toy case, verdicts and carried review decisions, and bad input to the repair."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from tests.references import predict_removed_reference
from vitsem.audit.faithfulness import deletion_curves, faithfulness, pattern_localisation
from vitsem.audit.grow import grow_candidate
from vitsem.audit.maps import generic_attention, occlusion_map
from vitsem.audit.repair import fit_balanced_head, linear_head, repair_last_layer
from vitsem.audit.verdicts import (
    Decision,
    PatternKey,
    ReviewDecision,
    Verdict,
    carry_review,
    pattern_signature,
    verdict_of,
)
from vitsem.errors import RepairInputError

# ---------------------------------------------------------------------------------------------
# Deletion curves and ABPC on a toy model whose output depends on known tokens


def _toy_predict(values: torch.Tensor):
    """Two classes; logit of class 0 = sum of the kept tokens' values, class 1 = 0. The
    images ``x`` are ignored: token j of image i is worth values[i, j]."""

    def predict(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        kept = (values * ~drop).sum(1)
        return torch.stack([kept, torch.zeros_like(kept)], 1)

    return predict


def test_abpc_equals_the_literal_curves_and_ranks_the_true_map_first() -> None:
    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.uniform(0, 1, (5, 8)))
    predict = _toy_predict(values)
    x = torch.zeros(5, 1)
    target = np.zeros(5, np.int64)
    steps = 4
    fractions, morf, lerf = deletion_curves(predict, x, values.numpy(), target, steps)
    np.testing.assert_allclose(fractions, [0, 0.25, 0.5, 0.75])
    # Literal: remove the k most / least valuable tokens, one image and step at a time.
    for i in range(5):
        order = np.argsort(-values[i].numpy())
        for k, f in enumerate(fractions):
            m = round(f * 8)
            for curve, removed in ((morf, order[:m]), (lerf, order[::-1][:m])):
                kept = np.delete(values[i].numpy(), removed).sum()
                assert curve[i, k] == pytest.approx(1 / (1 + np.exp(-kept)))
    good = faithfulness(predict, x, values.numpy(), target, steps=steps)
    flipped = faithfulness(predict, x, -values.numpy(), target, steps=steps)
    assert good.abpc == pytest.approx(float((lerf - morf).mean()))
    assert good.abpc > 0 > flipped.abpc
    assert flipped.abpc == pytest.approx(-good.abpc)


def test_localisation_auroc_and_pointing_by_hand() -> None:
    attribution = np.array([[0.9, 0.1, 0.5, 0.2], [0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.2, 0.2],
                            [0.5, 0.1, 0.1, 0.3]])
    pattern = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
    auc, hit = pattern_localisation(attribution, pattern)
    np.testing.assert_allclose(auc[:3], [1.0, 0.0, 0.5])  # ties count half
    assert np.isnan(auc[3]) and np.isnan(hit[3])  # no pattern in image 3
    np.testing.assert_array_equal(hit[:3], [1.0, 0.0, 0.5])  # a flat map: half its ties


# ---------------------------------------------------------------------------------------------
# Maps against literal implementations


@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             embed_dim=48, num_heads=3, num_classes=3).eval()


def _gae_literal(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Chefer et al. (2021), written out: run the blocks by hand with explicit attention,
    take each attention's gradient of the predicted logit, then for each image and block
    R = R + mean_h[(grad * A)^+] @ R."""
    vit = model
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    attns = []
    for blk in vit.blocks:
        a = blk.attn
        z = blk.norm1(h)
        b, t, c = z.shape
        q, k, v = a.qkv(z).reshape(b, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        att = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
        att.retain_grad()
        attns.append(att)
        h = h + blk.ls1(a.proj((att @ v).transpose(1, 2).reshape(b, t, c)))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    logits = vit.forward_head(vit.norm(h))
    torch.testing.assert_close(logits, model(x), atol=1e-4, rtol=1e-4)
    logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()
    out = []
    for i in range(len(x)):
        r = torch.eye(attns[0].shape[-1])
        for att in attns:
            cam = (att.grad[i] * att[i]).clamp(min=0).mean(0)
            r = r + cam @ r
        row = r[0, 1:].detach()
        out.append(row / row.sum())
    return torch.stack(out)


def test_generic_attention_equals_the_literal_loop(tiny_vit: nn.Module) -> None:
    x = torch.randn(3, 3, 32, 32)
    fused = [m.fused_attn for m in tiny_vit.modules() if hasattr(m, "fused_attn")]
    got = generic_attention(tiny_vit, x)
    torch.testing.assert_close(got, _gae_literal(tiny_vit, x), atol=1e-5, rtol=1e-4)
    assert [m.fused_attn for m in tiny_vit.modules() if hasattr(m, "fused_attn")] == fused


def test_occlusion_equals_one_removal_at_a_time(tiny_vit: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    got = occlusion_map(tiny_vit, x, chunk=5)  # chunks smaller than one image's rows
    with torch.no_grad():
        base = tiny_vit(x).softmax(-1)
        cls = base.argmax(-1)
        n = got.shape[1]
        drops = torch.zeros(2, n)
        for i in range(2):
            for j in range(n):
                drop = torch.zeros(1, n, dtype=torch.bool)
                drop[0, j] = True
                p = predict_removed_reference(tiny_vit, x[i:i + 1], drop).softmax(-1)
                drops[i, j] = base[i, cls[i]] - p[0, cls[i]]
    want = drops.clamp_min(0)
    torch.testing.assert_close(got, want / want.sum(1, keepdim=True), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Growth: a redundant pattern is only confirmed once all of it is removed


def test_growth_covers_a_redundant_pattern() -> None:
    """4 x 4 grid; class 0's logit is 6 while ANY of the 2 x 2 pattern's tokens (patches
    0, 1, 4, 5) stays, so removing the one seed patch changes nothing."""
    pattern = np.zeros(16, bool)
    pattern[[0, 1, 4, 5]] = True
    pat = torch.from_numpy(pattern)

    def predict(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        alive = (~drop & pat).any(1).double()
        noise = 0.05 * (~drop).sum(1).double()  # every token helps a little
        return torch.stack([6 * alive + noise, torch.zeros_like(alive)], 1)

    b = 12
    seeds = np.zeros((b, 16), bool)
    seeds[:, 0] = True
    attribution = np.tile(np.where(pattern, 0.2, 0.2 / 12 * 0.1), (b, 1))
    growth = grow_candidate(predict, torch.zeros(b, 1), torch.zeros(b, dtype=torch.long),
                            seeds, attribution, (4, 4), rings=2)
    assert growth.excess[0] == pytest.approx(0.0, abs=0.02)  # the seed alone: no effect
    np.testing.assert_array_equal(growth.patches, np.tile(pattern, (b, 1)))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    # Known answer: the whole pattern gone vs 4 random other tokens gone.
    want = (sig(6.8) - sig(0.6)) - (sig(6.8) - sig(6.6))
    assert growth.levels == 1 and growth.excess[1] == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Repair on a linearly separable toy case


class _Linear(nn.Module):
    """A 'model' whose penultimate features are its input: (B, 2) = (core, spurious)."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(weight))
            self.head.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def _toy_split(n: int, rho: float, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Class y; core feature = +-1 by class (separable); spurious = +-2 agreeing with the
    class with probability rho."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    agree = rng.uniform(size=n) < rho
    s = np.where(agree, y, 1 - y)
    x = np.stack([2 * y - 1 + rng.normal(0, 0.3, n), 2 * (2 * s - 1) + rng.normal(0, 0.3, n)], 1)
    return torch.tensor(x, dtype=torch.float32), y, s.astype(bool)


def test_repair_recovers_the_core_on_a_separable_toy_case() -> None:
    model = _Linear([[0.0, -1.0], [0.0, 1.0]])  # the floor reads the spurious feature only
    hx, hy, hs = _toy_split(400, 0.9, 1)
    ex, ey, es = _toy_split(400, 0.5, 2)
    names = ["a", "b"]
    eval_groups = [f"{names[c]}|{int(s)}" for c, s in zip(ey, es, strict=True)]
    true_groups = [f"{names[c]}|{int(s)}" for c, s in zip(hy, hs, strict=True)]
    # Pseudo-groups: the pattern is "present" where the spurious feature is positive.
    rep = repair_last_layer(model, hx, hy, hs, ex, ey, eval_groups, names,
                            held_true_groups=true_groups)
    floor, pseudo, oracle = (rep.outcomes[k] for k in ("none", "dfr:pseudo", "dfr:oracle"))
    assert floor.worst_group_accuracy < 0.05  # decorrelated: the spurious feature misleads
    assert oracle.worst_group_accuracy > 0.97 and pseudo.worst_group_accuracy > 0.97
    assert pseudo.gap_closed == pytest.approx(
        (pseudo.worst_group_accuracy - floor.worst_group_accuracy)
        / (oracle.worst_group_accuracy - floor.worst_group_accuracy))
    w = linear_head(rep.models["dfr:pseudo"]).weight.detach().numpy()
    assert abs(w[1, 0] - w[0, 0]) > abs(w[1, 1] - w[0, 1])  # the core weighs more
    # The floor's head is untouched.
    assert linear_head(model).weight[0, 1].item() == -1.0


def test_balanced_fit_weights_core_over_spurious_where_plain_fit_does_not() -> None:
    x, y, s = _toy_split(600, 0.97, 3)
    feats = x.double().numpy()
    groups = [f"{c}|{int(v)}" for c, v in zip(y, s, strict=True)]
    w_bal, _ = fit_balanced_head(feats, y, groups, 2)
    w_cls, _ = fit_balanced_head(feats, y, [str(c) for c in y], 2)
    core = lambda w: w[1, 0] - w[0, 0]  # noqa: E731
    spur = lambda w: w[1, 1] - w[0, 1]  # noqa: E731
    assert core(w_bal) / spur(w_bal) > core(w_cls) / spur(w_cls)


def test_repair_bad_inputs_are_clear_errors() -> None:
    model = _Linear([[1.0, 0.0], [-1.0, 0.0]])
    hx, hy, hs = _toy_split(100, 0.9, 4)
    ex, ey, _ = _toy_split(50, 0.5, 5)
    groups = [str(c) for c in ey]
    # One group empty: class b never appears without the pattern.
    present = hs.copy()
    present[hy == 1] = True
    with pytest.raises(RepairInputError, match=r"\['b\|no-pattern'\] hold no image"):
        repair_last_layer(model, hx, hy, present, ex, ey, groups, ["a", "b"])
    with pytest.raises(RepairInputError, match="8 held-out images"):
        repair_last_layer(model, hx[:8], hy[:8], hs[:8], ex, ey, groups, ["a", "b"])
    headless = _Linear([[1.0, 0.0], [0.0, 1.0]])
    headless.head = nn.Sequential(nn.Linear(2, 2))  # type: ignore[assignment]
    with pytest.raises(RepairInputError, match="not a linear layer"):
        repair_last_layer(headless, hx, hy, hs, ex, ey, groups, ["a", "b"])


# ---------------------------------------------------------------------------------------------
# Verdicts and carried review decisions


def test_without_masks_a_confirmed_pattern_goes_to_review_never_shortcut() -> None:
    assert verdict_of(True, float("nan"), 0.5) is Verdict.REVIEW
    assert verdict_of(True, 0.1, 0.5) is Verdict.SHORTCUT
    assert verdict_of(True, 0.8, 0.5) is Verdict.ON_OBJECT
    assert verdict_of(False, float("nan"), 0.5) is Verdict.NOT_CONFIRMED


def test_review_decisions_carry_to_later_audits_of_the_family() -> None:
    rng = np.random.default_rng(0)
    pattern = rng.uniform(0, 50, (2, 128)).astype(np.float32)
    radii = np.array([20.0, 20.0])
    key = PatternKey("tiny-vit", "zero", pattern_signature(pattern))
    legit = ReviewDecision(key, Decision.LEGITIMATE, pattern, radii, excess_effect=0.3)
    assert ReviewDecision.from_dict(legit.to_dict()).key == key
    again = pattern + rng.normal(0, 1, pattern.shape).astype(np.float32)  # a later audit
    other = rng.uniform(0, 50, (1, 128)).astype(np.float32)
    carried = carry_review("tiny-vit", "zero", again, radii, Verdict.REVIEW, 0.35, [legit])
    assert carried.verdict is Verdict.REVIEWED_LEGITIMATE and carried.flag == ""
    grown = carry_review("tiny-vit", "zero", again, radii, Verdict.REVIEW, 0.6, [legit])
    assert grown.flag == "regressed"
    assert carry_review("tiny-vit", "zero", other, radii[:1], Verdict.REVIEW, 0.3,
                        [legit]).flag == "new"
    assert carry_review("other-model", "zero", again, radii, Verdict.REVIEW, 0.3,
                        [legit]).flag == "new"
    assert carry_review("tiny-vit", "zero", other, radii[:1], Verdict.NOT_CONFIRMED, 0.0,
                        [legit]).flag == ""
