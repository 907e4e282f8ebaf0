"""Issue 13: the attention-guided masker (AttMask) on hand-built attention, the encoder's CLS
attention against timm's own attention, the loop masking by the current encoder's attention,
the benchmark's validity rule, and the digits benchmark data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vitsem.errors import ConfigError
from vitsem.method.models import ModelSpec, create_model
from vitsem.pretrain.digits import DigitTextureSpec, digit_texture_images
from vitsem.pretrain.loop import PretrainConfig, PretrainData, new_state, train_epoch
from vitsem.pretrain.mae import MaskedAutoencoder
from vitsem.pretrain.maskers import MASKERS, NEEDS_ATTENTION, MaskSpec, make_mask
from vitsem.pretrain.validity import INVALID_MESSAGE, baseline_validity

# ---------------------------------------------------------------------------------------------
# AttMask sampling law


def test_attmask_masks_exactly_the_most_attended_patches() -> None:
    assert "attmask" in MASKERS and "attmask" in NEEDS_ATTENTION
    att = torch.tensor([[0.05, 0.30, 0.01, 0.20, 0.02, 0.25, 0.07, 0.10],
                        [0.40, 0.00, 0.10, 0.05, 0.15, 0.03, 0.07, 0.20]])
    spec = MaskSpec(ratio=0.5, hint_ratio=0.0)
    mask = make_mask("attmask", att, spec, torch.Generator().manual_seed(0))
    assert mask.tolist() == [[False, True, False, True, False, True, False, True],
                             [True, False, True, False, True, False, False, True]]
    # The same law at another ratio: round(0.75 * 8) = 6 highest.
    mask = make_mask("attmask", att, MaskSpec(ratio=0.75, hint_ratio=0.0),
                     torch.Generator().manual_seed(3))
    assert mask.sum(1).tolist() == [6, 6]
    assert set(np.flatnonzero(~mask[0].numpy())) == {2, 4}
    assert set(np.flatnonzero(~mask[1].numpy())) == {1, 5}


@pytest.mark.parametrize("ratio", [0.25, 0.6, 0.75, 0.9])
def test_attmask_ratio_is_exact_with_and_without_hints(ratio: float) -> None:
    att = torch.rand(32, 49, generator=torch.Generator().manual_seed(1)).softmax(1)
    for hint in (0.0, 0.1, 0.3):
        mask = make_mask("attmask", att, MaskSpec(ratio=ratio, hint_ratio=hint),
                         torch.Generator().manual_seed(0))
        assert (mask.sum(1) == round(ratio * 49)).all()


def test_attmask_ties_are_broken_by_the_generator_deterministically() -> None:
    # Patch 0 is the single most attended; patches 1..4 tie for the second place; k = 2.
    att = torch.tensor([0.4, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.1]).expand(4000, 8)
    spec = MaskSpec(ratio=0.25, hint_ratio=0.0)
    a = make_mask("attmask", att, spec, torch.Generator().manual_seed(7))
    b = make_mask("attmask", att, spec, torch.Generator().manual_seed(7))
    c = make_mask("attmask", att, spec, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[:, 0].all() and not a[:, 5:7].any()
    # The second masked patch is one of the five tied ones, each about equally often.
    freq = a[:, [1, 2, 3, 4, 7]].double().mean(0).numpy()
    assert np.allclose(freq, 0.2, atol=5 * np.sqrt(0.2 * 0.8 / 4000)), freq
    assert (a.sum(1) == 2).all()


def test_attmask_hints_reveal_top_patches_and_mask_the_next_ones() -> None:
    n = 20
    att = torch.linspace(1.0, 0.05, n).expand(500, n)  # patch i is the i-th most attended
    spec = MaskSpec(ratio=0.5, hint_ratio=0.2)  # k = 10, 2 hints
    mask = make_mask("attmask", att, spec, torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 10).all()
    revealed = ~mask[:, :10]
    assert (revealed.sum(1) == 2).all()  # two of the ten most attended are shown
    assert mask[:, 10:12].all() and not mask[:, 12:].any()  # the next two masked instead
    # The hints are spread over all of the top ten, not always the same ones.
    assert (revealed.double().mean(0) > 0.1).all()


# ---------------------------------------------------------------------------------------------
# The encoder's CLS attention and the loop


def _mae(img: int = 32, patch: int = 8, depth: int = 2) -> MaskedAutoencoder:
    torch.manual_seed(0)
    enc = create_model(ModelSpec("vit_tiny_patch16_224", {"img_size": img, "patch_size": patch,
                                                          "depth": depth, "num_classes": 0}))
    return MaskedAutoencoder(enc, 32, 1).eval()


def test_cls_attention_equals_timms_last_block_attention() -> None:
    mae = _mae()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    enc: Any = mae.encoder
    last = enc.blocks[-1].attn
    seen: list[torch.Tensor] = []
    last.fused_attn = False  # timm's explicit softmax path, read at its dropout
    handle = last.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            enc.forward_features(x)
    finally:
        handle.remove()
    ref = seen[0][:, :, 0, 1:].mean(1)
    ref = ref / ref.sum(1, keepdim=True)
    got = mae.cls_attention(x)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_the_loop_masks_what_the_current_encoders_attention_ranks_highest() -> None:
    cfg = PretrainConfig(img_size=32, patch_size=8, depth=2, decoder_dim=32, decoder_depth=1,
                         masker="attmask", mask=MaskSpec(ratio=0.5, hint_ratio=0.0),
                         epochs=2, batch_size=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.arange(8) % 2
    data = PretrainData(x, torch.zeros(8, 16), (x, y, x, y))
    state = new_state(cfg)
    checked: list[int] = []
    forward = state.model.forward

    def spy(images: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
            ) -> torch.Tensor:
        top = state.model.cls_attention(images).topk(8, dim=1).indices
        expected = torch.zeros_like(mask).scatter_(1, top, True)
        assert torch.equal(mask, expected)
        checked.append(len(images))
        return forward(images, mask, weights)

    state.model.forward = spy  # type: ignore[method-assign]
    for _ in range(2):  # the second epoch's attention comes from the updated encoder
        record = train_epoch(state, data, cfg)
        assert 0 < record["mask_seconds"] < record["epoch_seconds"]
    assert checked == [4, 4, 4, 4]


# ---------------------------------------------------------------------------------------------
# The benchmark's validity rule


def test_validity_rejects_a_baseline_that_does_not_learn() -> None:
    # The 2026-11-25 CPU bench: the probe peaks after one epoch and falls.
    flat = [0.640, 0.675, 0.660, 0.655, 0.650, 0.648, 0.640, 0.636, 0.633]
    v = baseline_validity(flat)
    assert not v.valid and "required" in v.reason
    assert v.untrained == 0.640 and v.best == 0.675 and v.final == 0.633
    assert INVALID_MESSAGE == "invalid: baseline did not learn"


def test_validity_rejects_a_curve_that_peaks_and_falls_back() -> None:
    v = baseline_validity([0.10, 0.25, 0.40, 0.30, 0.28])
    assert not v.valid and "fell" in v.reason
    assert v.gain == pytest.approx(0.30)


def test_validity_accepts_a_learning_curve() -> None:
    v = baseline_validity([0.12, 0.15, 0.19, 0.24, 0.27, 0.29, 0.285])
    assert v.valid and v.gain == pytest.approx(0.17)
    # Exactly ten points, and a final just within the tolerance, pass.
    assert baseline_validity([0.5, 0.55, 0.6]).valid
    assert baseline_validity([0.5, 0.62, 0.60]).valid
    assert not baseline_validity([0.5, 0.62, 0.599]).valid
    with pytest.raises(ConfigError):
        baseline_validity([0.5])


# ---------------------------------------------------------------------------------------------
# The digits benchmark


def test_digit_benchmark_is_deterministic_balanced_and_split_by_instance() -> None:
    spec = DigitTextureSpec(image_size=24, n_train=300, n_test=100, seed=4)
    a = digit_texture_images(spec)
    b = digit_texture_images(spec)
    for u, v in zip(a, b, strict=True):
        assert np.array_equal(u, v)
    tr, ytr, te, _ = a
    assert tr.shape == (300, 24, 24, 3) and tr.dtype == np.uint8 and te.shape[0] == 100
    assert set(ytr.tolist()) == set(range(10)) and np.bincount(ytr).min() >= 15
    # Colour carries no label: the mean colour per class is close to the overall mean.
    means = np.stack([tr[ytr == c].reshape(-1, 3).mean(0) for c in range(10)])
    assert np.abs(means - tr.reshape(-1, 3).mean(0)).max() < 25
    with pytest.raises(ConfigError):
        DigitTextureSpec(background="stripes").validate()  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The flow: attmask from the form, no duplicate version on a rerun, curves in MLflow


@pytest.fixture(scope="module")
def flow_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset

    return make_shortcut_dataset(tmp_path_factory.mktemp("guided") / "data",
                                 ShortcutSpec(n_train=48, n_test=24, seed=5), workers=1)


@pytest.mark.usefixtures("prefect_api")
def test_rerun_of_a_finished_run_registers_no_duplicate_and_logs_curves(
        flow_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from flows.guided_pretrain import PretrainParams, guided_pretrain
    from vitsem.platform.pretrain_tracking import CURVES_ARTIFACT

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_MLFLOW_TRACKING_URI", mlflow_uri)
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI"):
        monkeypatch.delenv(var, raising=False)
    params = PretrainParams(data=str(flow_data), masker="attmask", epochs=2, depth=2,
                            batch_size=16, seed=2)
    first = guided_pretrain(params)
    assert first["epochs_run"] == 2 and "already registered" not in first["registered"]
    again = guided_pretrain(params)
    assert again["run_key"] == first["run_key"]
    assert again["epochs_run"] == 0 and again["resumed_from_epoch"] == 2
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    assert "already registered" in again["registered"]
    client = MlflowClient(mlflow_uri)
    versions = client.search_model_versions("name = 'vitsem-mae-encoder'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    assert str(client.get_model_version_by_alias("vitsem-mae-encoder", "pretrained").version) == "1"
    # A different run (another seed) is a new version, as before.
    third = guided_pretrain(params.model_copy(update={"seed": 3}))
    assert "(version 2)" in third["registered"]
    assert len(client.search_model_versions("name = 'vitsem-mae-encoder'")) == 2
    # The curves: per-epoch metrics with the epoch as step, and the picture as an artifact.
    run = first["mlflow_run_id"]
    for key in ("linear_probe", "knn"):
        steps = {m.step: m.value for m in client.get_metric_history(run, key)}
        assert sorted(steps) == [1, 2]
        assert steps[2] == pytest.approx(first["history"][-1][key])
    arts = {a.path for a in client.list_artifacts(run, "curves")}
    assert CURVES_ARTIFACT in arts
    local = Path(client.download_artifacts(run, CURVES_ARTIFACT, str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_form_offers_every_registered_masker() -> None:
    from typing import get_args

    from flows.guided_pretrain import MaskerName

    assert set(get_args(MaskerName)) == set(MASKERS)


# ---------------------------------------------------------------------------------------------
# The benchmark's analysis


def _bench() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_pretrain.py"
    spec = importlib.util.spec_from_file_location("bench_pretrain", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(masker: str, seed: int, curve: list[float]) -> dict[str, Any]:
    return {"masker": masker, "seed": seed, "epochs": len(curve) - 1,
            "untrained": {"linear_probe": curve[0], "knn": curve[0]},
            "history": [{"epoch": e, "linear_probe": a, "knn": a, "loss": 1.0,
                         "epoch_seconds": 1.0, "mask_seconds": 0.01}
                        for e, a in enumerate(curve[1:], 1)]}


def test_bench_reports_speed_ups_only_when_the_baseline_learns() -> None:
    bench = _bench()
    learning = [0.2, 0.25, 0.3, 0.35, 0.4]  # random reaches its final 0.4 at epoch 4
    fast = [0.2, 0.3, 0.4, 0.41, 0.42]  # at epoch 2: speed-up 2
    rows = [_row(m, s, c) for s in range(3) for m, c in (("random", learning),
                                                         ("attmask", fast))]
    summary = bench.analyse(rows)
    assert summary["valid"]
    for key in ("linear_probe", "knn"):
        m = summary["metrics"][key]
        assert m["target"] == pytest.approx(0.4) and m["gain"] == pytest.approx(0.2)
        assert m["maskers"]["attmask"]["epochs_to_target"] == [2, 2, 2]
        assert m["maskers"]["attmask"]["speedup"] == pytest.approx(2.0)
        assert m["maskers"]["attmask"]["interval"] == pytest.approx([2.0, 2.0])
    assert summary["best_guided"] == "attmask" and summary["claim_met"]
    flat = [0.64, 0.675, 0.66, 0.65, 0.633]
    rows = [_row(m, s, c) for s in range(3) for m, c in (("random", flat), ("attmask", fast))]
    summary = bench.analyse(rows)
    assert not summary["valid"] and not summary["claim_met"]
    assert summary["metrics"]["knn"]["maskers"]["attmask"]["speedup"] is None
    text = bench.table(summary, "# test")
    assert INVALID_MESSAGE in text.splitlines() and "refused" in text
