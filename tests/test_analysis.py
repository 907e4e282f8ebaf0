"""The interrelation statistics against a plain per-image, per-head reference, on hand-built
cases with known answers, and the streaming accumulation against the batch computation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import timm
import torch

from vitsem.method import row_stats
from vitsem.method.analysis import InterrelationAnalyzer, SemanticBatch, interrelation_stats
from vitsem.method.attention import AttentionBlock, TokenLayout, token_layout
from vitsem.method.concentration import TokenGrid, concentration_levels, patch_weights
from vitsem.method.stats import StatsAccumulator, StreamingMoments

GRID = TokenGrid((8, 8), (3, 4))
N = GRID.num_patches


def _reference(attn: np.ndarray, c: np.ndarray, prefix: int, has_cls: bool, k: int = 3
               ) -> dict[str, np.ndarray]:
    """METHOD.md §2 written out literally, one image and head at a time."""
    b_, h_ = attn.shape[:2]
    pos = GRID.positions()
    out = {n: np.full((b_, h_), np.nan) for n in ("semantic_mass", "semantic_lift", "cls_focus")}
    out["level_matrix"] = np.full((b_, h_, k, k), np.nan)
    out["distance"] = np.full((b_, h_, k), np.nan)
    out["entropy"] = np.full((b_, h_, k), np.nan)
    for b in range(b_):
        sem = c[b] > 0
        w = patch_weights(c[b])
        lv = concentration_levels(c[b], k)
        for h in range(h_):
            app = attn[b, h, prefix:, prefix:]
            app = app / app.sum(1, keepdims=True)
            m = np.array([sum(app[i, j] for j in range(N) if sem[j]) for i in range(N)])
            out["semantic_mass"][b, h] = m.mean()
            if sem.any():
                out["semantic_lift"][b, h] = m.mean() / (sem.sum() / N)
                if has_cls:
                    a = attn[b, h, 0, prefix:] / attn[b, h, 0, prefix:].sum()
                    out["cls_focus"][b, h] = sum(a[j] * w[j] * N for j in range(N))
            for la in range(k):
                qs = [i for i in range(N) if lv[i] == la]
                if not qs:
                    continue
                for lb in range(k):
                    out["level_matrix"][b, h, la, lb] = np.mean(
                        [sum(app[i, j] for j in range(N) if lv[j] == lb) for i in qs])
                out["distance"][b, h, la] = np.mean(
                    [sum(app[i, j] * np.linalg.norm(pos[i] - pos[j]) for j in range(N))
                     for i in qs])
                out["entropy"][b, h, la] = np.mean(
                    [-sum(app[i, j] * math.log(app[i, j]) for j in range(N) if app[i, j] > 0)
                     for i in qs])
    return out


def _random_case(b: int, h: int, prefix: int, seed: int) -> tuple[AttentionBlock, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    t = prefix + N
    attn = AttentionBlock.from_logits(torch.randn(b, h, t, t, generator=g) * 2)
    rng = np.random.default_rng(seed)
    c = rng.poisson(0.8, size=(b, N)).astype(np.float64)
    c[0] = 0.0  # an image with no keypoint
    return attn, c


@pytest.mark.parametrize(("prefix", "has_cls"), [(1, True), (2, True), (5, True), (2, False)])
def test_matches_literal_reference(prefix: int, has_cls: bool) -> None:
    attn, c = _random_case(3, 2, prefix, seed=prefix)
    layout = TokenLayout(prefix, has_cls, GRID)
    sem = SemanticBatch.from_concentrations(c)
    dist = torch.from_numpy(GRID.distances().astype(np.float32))
    ours = {k: v.numpy() for k, v in interrelation_stats(attn, sem, layout, dist).items()}
    ref = _reference(attn.probs.double().numpy(), c, prefix, has_cls)
    for name, value in ref.items():
        np.testing.assert_allclose(ours[name], value, rtol=2e-4, atol=2e-5, err_msg=name)
    assert np.isnan(ours["semantic_lift"][0]).all() and np.isnan(ours["cls_focus"][0]).all()


def test_uniform_attention_has_known_answers() -> None:
    t = 1 + N
    attn = AttentionBlock.from_logits(torch.zeros(1, 2, t, t))
    c = np.zeros((1, N))
    c[0, [1, 2, 7]] = [1, 2, 3]
    layout = TokenLayout(1, True, GRID)
    sem = SemanticBatch.from_concentrations(c)
    dist = torch.from_numpy(GRID.distances().astype(np.float32))
    s = interrelation_stats(attn, sem, layout, dist)
    torch.testing.assert_close(s["semantic_lift"], torch.ones(1, 2))
    torch.testing.assert_close(s["cls_focus"], torch.ones(1, 2))
    torch.testing.assert_close(s["entropy"], torch.full((1, 2, 3), math.log(N)))
    base = sem.uniform_level_matrix()[:, None].expand(-1, 2, -1, -1)
    torch.testing.assert_close(s["level_matrix"], base)
    torch.testing.assert_close(s["level_matrix"].sum(-1), torch.ones(1, 2, 3))


def test_attention_on_one_keypoint_patch() -> None:
    t = 1 + N
    attn = torch.full((1, 1, t, t), 1e-12)
    attn[..., 3 + 1] = 1.0  # every token attends to patch 3
    attn = AttentionBlock.from_logits((attn / attn.sum(-1, keepdim=True)).log())
    c = np.zeros((1, N))
    c[0, [3, 5]] = 1.0
    layout = TokenLayout(1, True, GRID)
    s = interrelation_stats(attn, SemanticBatch.from_concentrations(c), layout,
                            torch.from_numpy(GRID.distances().astype(np.float32)))
    assert s["semantic_mass"].item() == pytest.approx(1.0, abs=1e-6)
    assert s["semantic_lift"].item() == pytest.approx(N / 2, rel=1e-5)
    assert s["cls_focus"].item() == pytest.approx(0.5 * N, rel=1e-5)  # w_3 = 1/2
    ent = s["entropy"][0, 0]
    assert ent[:2].abs().max().item() == pytest.approx(0.0, abs=1e-4)
    assert torch.isnan(ent[2])  # both keypoint patches tie at the median: level 2 is empty


def test_streaming_equals_batch_with_nans() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(503, 4, 3))
    data[rng.uniform(size=data.shape) < 0.1] = np.nan
    acc = StreamingMoments((4, 3))
    i = 0
    while i < len(data):
        step = int(rng.integers(1, 40))
        acc.add(data[i:i + step])
        i += step
    s = acc.summary()
    np.testing.assert_allclose(s.mean, np.nanmean(data, 0), rtol=1e-12)
    np.testing.assert_allclose(s.std, np.nanstd(data, 0, ddof=1), rtol=1e-10)
    np.testing.assert_array_equal(s.count, np.isfinite(data).sum(0))
    from scipy import stats as st

    n = np.isfinite(data).sum(0)
    half = st.t.ppf(0.975, n - 1) * np.nanstd(data, 0, ddof=1) / np.sqrt(n)
    np.testing.assert_allclose(s.ci_high - s.mean, half, rtol=1e-10)
    # Shards merged equal one pass.
    a, b = StreamingMoments((4, 3)), StreamingMoments((4, 3))
    a.add(data[:100])
    b.add(data[100:])
    a.merge(b)
    np.testing.assert_allclose(a.summary().mean, s.mean, rtol=1e-12)
    np.testing.assert_allclose(a.summary().std, s.std, rtol=1e-10)
    back = StreamingMoments.from_dict(acc.to_dict())
    np.testing.assert_allclose(back.summary().std, s.std)


def test_accumulator_memory_is_fixed() -> None:
    acc = StatsAccumulator()
    for _ in range(3):
        acc.add({"x": np.ones((10, 6, 3)), "y": np.ones((10, 6, 3, 3, 3))})
    sizes = [m.mean.nbytes for m in acc.moments.values()]
    for _ in range(50):
        acc.add({"x": np.ones((10, 6, 3)), "y": np.ones((10, 6, 3, 3, 3))})
    assert [m.mean.nbytes for m in acc.moments.values()] == sizes
    assert acc.num_images == 530


def test_analyzer_over_a_real_model_batches_agree() -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, pretrained=False).eval()
    layout = token_layout(model, (32, 32))
    an = InterrelationAnalyzer(model, layout)
    x = torch.randn(4, 3, 32, 32)
    c = np.random.default_rng(0).poisson(1.0, size=(4, layout.grid.num_patches)).astype(float)
    whole = an.run(x, SemanticBatch.from_concentrations(c), keep_cls_maps=True)
    half = an.run(x[2:], SemanticBatch.from_concentrations(c[2:]))
    for name, v in whole.stats.items():
        assert v.shape[:3] == (4, 12, 3)
        np.testing.assert_allclose(v[2:], half.stats[name], rtol=1e-4, atol=1e-5)
    assert whole.cls_maps is not None and whole.cls_maps.shape == (4, 12, 3, 4)
    np.testing.assert_allclose(whole.cls_maps.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("path", ["eager", "fused"])
def test_masked_keys_count_as_zero_attention(path: str, request: pytest.FixtureRequest
                                             ) -> None:
    if path == "fused":
        request.getfixturevalue("fused_always")
    t = 1 + N
    logits = torch.randn(2, 2, t, t)
    logits[..., 1 + 4] = float("-inf")  # nobody may attend to patch 4
    block = AttentionBlock.from_logits(logits)
    assert block.masked
    c = np.random.default_rng(1).poisson(1.0, size=(2, N)).astype(float)
    layout = TokenLayout(1, True, GRID)
    s = interrelation_stats(block, SemanticBatch.from_concentrations(c), layout,
                            torch.from_numpy(GRID.distances().astype(np.float32)))
    ref = _reference(block.probs.double().numpy(), c, 1, True)
    for name, value in ref.items():
        np.testing.assert_allclose(s[name].numpy(), value, rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("path", ["eager", "fused"])
@pytest.mark.parametrize("prefix", [1, 5])
def test_chunked_rows_match_the_literal_reference(prefix: int, path: str,
                                                  request: pytest.FixtureRequest) -> None:
    """A budget of one query row per chunk on the eager path (three on the fused one, which
    keeps one buffer instead of three): every chunk boundary gives the same figures."""
    if path == "fused":
        request.getfixturevalue("fused_always")
    attn, c = _random_case(2, 3, prefix, seed=7 + prefix)
    tiny = AttentionBlock.from_logits(attn.logits, memory_budget=2 * 3 * N * 4 * 3)
    assert tiny.chunk_rows(3, keys=N) == 1
    layout = TokenLayout(prefix, True, GRID)
    sem = SemanticBatch.from_concentrations(c)
    dist = torch.from_numpy(GRID.distances().astype(np.float32))
    ours = {k: v.numpy() for k, v in interrelation_stats(tiny, sem, layout, dist).items()}
    ref = _reference(attn.probs.double().numpy(), c, prefix, True)
    for name, value in ref.items():
        np.testing.assert_allclose(ours[name], value, rtol=2e-4, atol=2e-5, err_msg=name)


def test_capture_statistics_do_not_depend_on_the_memory_budget() -> None:
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56).eval()
    layout = token_layout(model, (56, 56))
    x = torch.randn(3, 3, 56, 56)
    c = np.random.default_rng(3).poisson(1.0, size=(3, layout.grid.num_patches)).astype(float)
    sem = SemanticBatch.from_concentrations(c)
    whole = InterrelationAnalyzer(model, layout).run(x, sem, keep_cls_maps=True)
    rows = InterrelationAnalyzer(model, layout, memory_budget=3 * 3 * 16 * 4 * 3
                                 ).run(x, sem, keep_cls_maps=True)
    assert torch.equal(whole.logits, rows.logits)
    for name, v in whole.stats.items():
        np.testing.assert_allclose(rows.stats[name], v, rtol=1e-5, atol=1e-6, err_msg=name)
    assert whole.cls_maps is not None and rows.cls_maps is not None
    np.testing.assert_allclose(rows.cls_maps, whole.cls_maps, rtol=1e-5, atol=1e-7)


@pytest.fixture
def fused_always(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every block through the compiled kernel, however small; fails if it fell back."""
    monkeypatch.setattr(row_stats, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(row_stats, "_failed", set())
    monkeypatch.setenv("VITSEM_FUSED_STATS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield
    assert not row_stats._failed, "the fused kernel did not compile"


def test_fused_and_eager_analyses_agree_on_a_real_model(monkeypatch: pytest.MonkeyPatch,
                                                        fused_always: None) -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                              depth=2).eval()
    layout = token_layout(model, (64, 64))
    x = torch.randn(3, 3, 64, 64)
    c = np.random.default_rng(5).poisson(1.0, size=(3, layout.grid.num_patches)).astype(float)
    sem = SemanticBatch.from_concentrations(c)
    fused = InterrelationAnalyzer(model, layout).run(x, sem)
    monkeypatch.setenv("VITSEM_FUSED_STATS", "0")
    eager = InterrelationAnalyzer(model, layout).run(x, sem)
    assert torch.equal(fused.logits, eager.logits)
    for name, v in eager.stats.items():
        np.testing.assert_allclose(fused.stats[name], v, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_kernel_that_cannot_compile_falls_back_to_the_same_figures(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler() -> None:
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(row_stats, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(row_stats, "_failed", set())
    monkeypatch.setattr(row_stats, "_compiled_kernel", no_compiler)
    attn, c = _random_case(2, 3, 1, seed=13)
    layout = TokenLayout(1, True, GRID)
    sem = SemanticBatch.from_concentrations(c)
    dist = torch.from_numpy(GRID.distances().astype(np.float32))
    with pytest.warns(RuntimeWarning, match="could not compile on cpu.*VITSEM_FUSED_STATS=0"):
        s = interrelation_stats(attn, sem, layout, dist)
    assert row_stats._failed == {"cpu"}
    with warnings.catch_warnings():  # said once per device, then eager without a word
        warnings.simplefilter("error", RuntimeWarning)
        again = interrelation_stats(attn, sem, layout, dist)
    ref = _reference(attn.probs.double().numpy(), c, 1, True)
    for name, value in ref.items():
        np.testing.assert_allclose(s[name].numpy(), value, rtol=2e-4, atol=2e-5, err_msg=name)
        np.testing.assert_array_equal(again[name].numpy(), s[name].numpy())


def test_fused_kernel_called_from_threads_at_once_gives_each_its_own_figures(
        fused_always: None) -> None:
    """Flows analyse shards on threads; torch.compile itself is not thread-safe."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [_random_case(2, 3, 1, seed=20 + i) for i in range(4)]
    layout = TokenLayout(1, True, GRID)
    dist = torch.from_numpy(GRID.distances().astype(np.float32))

    def stats(i: int) -> dict[str, np.ndarray]:
        attn, c = cases[i]
        out = interrelation_stats(attn, SemanticBatch.from_concentrations(c), layout, dist)
        return {k: v.numpy() for k, v in out.items()}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stats, range(4)))
    for (attn, c), got in zip(cases, results, strict=True):
        ref = _reference(attn.probs.double().numpy(), c, 1, True)
        for name, value in ref.items():
            np.testing.assert_allclose(got[name], value, rtol=2e-4, atol=2e-5, err_msg=name)
