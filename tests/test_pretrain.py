"""Guided pre-training: masker statistics, the MAE's masking, the probes, resume equals an
uninterrupted run, the flow end to end, and bad input."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch

from vitsem.errors import ConfigError, PretrainInputError, ProbeDataError
from vitsem.pretrain.loop import PretrainConfig, PretrainData, pretrain, save_state
from vitsem.pretrain.mae import MaskedAutoencoder, patchify
from vitsem.pretrain.maskers import MASKERS, MaskSpec, loss_weights, make_mask
from vitsem.pretrain.probe import knn_accuracy, linear_probe_accuracy

# ---------------------------------------------------------------------------------------------
# Maskers


def _weights(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(b, n, generator=g) ** 3
    w[:, : n // 4] = 0  # patches without keypoints
    return w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("masker", sorted(MASKERS))
@pytest.mark.parametrize("ratio", [0.25, 0.6, 0.75, 0.9])
def test_mask_ratio_is_exact_for_every_image(masker: str, ratio: float) -> None:
    w = _weights(64, 49)
    w[3] = 0  # an image without keypoints
    g = torch.Generator().manual_seed(0)
    mask = make_mask(masker, w, MaskSpec(ratio=ratio, alpha=2.0), g)
    assert mask.dtype == torch.bool and mask.shape == (64, 49)
    assert (mask.sum(1) == round(ratio * 49)).all()


@pytest.mark.parametrize("alpha", [1.0, -1.0, 2.0])
def test_single_draw_frequency_is_proportional_to_the_weights(alpha: float) -> None:
    # k = 1 of N = 8: P(i) = (w_i + eps)^alpha / sum_j (w_j + eps)^alpha exactly.
    n, draws = 8, 200_000
    w = torch.tensor([0.0, 0.05, 0.05, 0.1, 0.1, 0.2, 0.2, 0.3]).expand(draws, n)
    spec = MaskSpec(ratio=1 / n, alpha=alpha, eps=0.01)
    mask = make_mask("sift", w, spec, torch.Generator().manual_seed(1))
    freq = mask.double().mean(0).numpy()
    p = (w[0].double() + 0.01) ** alpha
    expected = (p / p.sum()).numpy()
    tolerance = 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-4  # 5 standard errors
    assert np.all(np.abs(freq - expected) <= tolerance), (freq, expected)


def test_many_draws_follow_successive_sampling() -> None:
    # k = 3 of 6: inclusion frequencies equal those of drawing one patch at a time in
    # proportion to the scores (numpy's choice without replacement), estimated side by side.
    n, k, draws = 6, 3, 100_000
    w = torch.tensor([0.01, 0.04, 0.1, 0.15, 0.3, 0.4])
    spec = MaskSpec(ratio=k / n, alpha=1.0, eps=0.01)
    mask = make_mask("sift", w.expand(draws, n), spec, torch.Generator().manual_seed(2))
    freq = mask.double().mean(0).numpy()
    p = (w.double() + 0.01).numpy()
    rng = np.random.default_rng(0)
    ref = np.zeros(n)
    for _ in range(draws // 10):
        ref[rng.choice(n, size=k, replace=False, p=p / p.sum())] += 1
    ref /= draws // 10
    np.testing.assert_allclose(freq, ref, atol=0.02)
    assert np.all(np.diff(freq) > 0)  # more weight, masked more often


def test_alpha_sign_and_hints_move_masking_as_specified() -> None:
    w = _weights(4000, 64, seed=3)
    g = torch.Generator().manual_seed(0)

    def masked_weight(name: str, alpha: float) -> float:
        mask = make_mask(name, w, MaskSpec(alpha=alpha), g)
        return float((w * mask).sum() / mask.sum())

    rnd = masked_weight("random", 1.0)
    assert masked_weight("sift", 1.0) > rnd > masked_weight("sift", -1.0)
    # sift-hint reveals some of the most semantic patches that sift would mask.
    top = w >= w.quantile(0.9, dim=1, keepdim=True)
    sift = make_mask("sift", w, MaskSpec(alpha=1.0), torch.Generator().manual_seed(5))
    hint = make_mask("sift-hint", w, MaskSpec(alpha=1.0, hint_ratio=0.2),
                     torch.Generator().manual_seed(5))
    assert (hint & top).float().mean() < (sift & top).float().mean()


def test_kamim_loss_weights_by_hand() -> None:
    w = torch.tensor([[0.0, 0.25, 0.75], [0.0, 0.0, 0.0]])
    lw = loss_weights("kamim", w, MaskSpec(kamim=2.0))
    torch.testing.assert_close(lw, torch.tensor([[1.0, 1.0 + 2 / 3, 3.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(loss_weights("sift", w, MaskSpec()), torch.ones(2, 3))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_mask_ratio_outside_the_open_interval_is_refused(ratio: float) -> None:
    with pytest.raises(ConfigError, match=r"mask ratio must be in \(0, 1\)"):
        PretrainConfig(mask=MaskSpec(ratio=ratio)).validate()


# ---------------------------------------------------------------------------------------------
# The masked autoencoder and the probes


def _mae(depth: int = 2) -> MaskedAutoencoder:
    cfg = PretrainConfig(img_size=32, patch_size=8, depth=depth, decoder_dim=32,
                         decoder_depth=1)
    from vitsem.method.models import create_model

    return MaskedAutoencoder(create_model(cfg.encoder_spec()), 32, 1).eval()


def test_patchify_matches_a_literal_loop() -> None:
    x = torch.randn(2, 3, 16, 24)
    out = patchify(x, 8)
    assert out.shape == (2, 6, 192)
    for r in range(2):
        for c in range(3):
            ref = x[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].permute(0, 2, 3, 1).reshape(2, -1)
            torch.testing.assert_close(out[:, r * 3 + c], ref)


def test_the_encoder_sees_only_visible_patches() -> None:
    mae = _mae()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 6, 15]] = True
    mask[1, [1, 2, 3, 4]] = True
    with torch.no_grad():
        out = mae.encode(x, mask)
        assert out.shape == (2, 1 + 12, mae.encoder.embed_dim)  # type: ignore[union-attr]
        y = x.clone()
        y[0, :, 0:8, 0:8] = 100.0  # pixels of masked patch 0 of image 0
        torch.testing.assert_close(mae.encode(y, mask), out)
        loss = mae(x, mask)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_standardised_knn_is_not_ruled_by_a_large_shared_dimension() -> None:
    # Two informative dimensions (class +-1, small noise) beside two huge, label-free
    # dimensions shared by every image, whose ratio varies: raw cosine sees only their
    # direction (chance), the standardised features see the classes.
    g = torch.Generator().manual_seed(0)
    y_tr, y_te = torch.arange(200) % 2, torch.arange(100) % 2

    def feats(y: torch.Tensor) -> torch.Tensor:
        sign = y.double() * 2 - 1
        informative = sign[:, None] + 0.3 * torch.randn(len(y), 2, generator=g,
                                                         dtype=torch.float64)
        nuisance = 1000 + 200 * torch.randn(len(y), 2, generator=g, dtype=torch.float64)
        return torch.cat([informative, nuisance], 1)

    x_tr, x_te = feats(y_tr), feats(y_te)
    assert knn_accuracy(x_tr, y_tr, x_te, y_te, k=5) < 0.7
    assert knn_accuracy(x_tr, y_tr, x_te, y_te, k=5, standardise=True) == 1.0


def test_normalised_pixel_target_on_a_hand_built_patch() -> None:
    mae = _mae()
    x = torch.zeros(1, 3, 32, 32)
    # Patch 0: the red channel 0 and 2 on alternate columns, the other channels 1: 192 values
    # of which 32 are 0, 32 are 2 and 128 are 1: mean 1, unbiased variance 64 / 191.
    x[0, :, :8, :8] = 1.0
    x[0, 0, :8, 0:8:2] = 0.0
    x[0, 0, :8, 1:8:2] = 2.0
    target = mae.target(x)[0, 0].reshape(8, 8, 3)
    sd = (64 / 191 + 1e-6) ** 0.5
    torch.testing.assert_close(target[:, 0::2, 0], torch.full((8, 4), -1 / sd))
    torch.testing.assert_close(target[:, 1::2, 0], torch.full((8, 4), 1 / sd))
    torch.testing.assert_close(target[..., 1:], torch.zeros(8, 8, 2))
    # A constant patch has no variance: its target is 0, not a division by zero.
    torch.testing.assert_close(mae.target(x)[0, 1], torch.zeros(192))
    mae.norm_pix_loss = False
    torch.testing.assert_close(mae.target(x), patchify(x, 8))


def test_lr_schedule_warms_up_linearly_then_decays_to_zero_by_the_last_step() -> None:
    from vitsem.pretrain.loop import _lr

    cfg = PretrainConfig(lr=1e-3, epochs=10, warmup_epochs=1.0)
    steps = 20  # per epoch: warm-up is steps 0..19, 200 steps in all
    assert _lr(cfg, 0, steps) == pytest.approx(1e-3 / 20)
    assert _lr(cfg, 9, steps) == pytest.approx(1e-3 * 10 / 20)
    assert _lr(cfg, 19, steps) == pytest.approx(1e-3)  # the peak at warm-up's end
    assert _lr(cfg, 20, steps) == pytest.approx(1e-3)  # cosine starts at the peak
    assert _lr(cfg, 110, steps) == pytest.approx(0.5e-3)  # half-way through the decay
    last = _lr(cfg, 199, steps)
    assert 0 < last < 1e-3 * 1e-3  # the last step trains at ~0
    lrs = [_lr(cfg, i, steps) for i in range(20, 200)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_probes_on_separable_and_clustered_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    y_tr, y_te = torch.arange(90) % 3, torch.arange(30) % 3
    x_tr = centres[y_tr] + torch.randn(90, 16, generator=g)
    x_te = centres[y_te] + torch.randn(30, 16, generator=g)
    assert linear_probe_accuracy(x_tr, y_tr, x_te, y_te) == 1.0
    assert knn_accuracy(x_tr, y_tr, x_te, y_te, k=5) == 1.0
    shuffled = y_te[torch.randperm(30, generator=g)]
    assert knn_accuracy(x_tr, y_tr, x_te, shuffled, k=5) < 0.7
    with pytest.raises(ProbeDataError, match="one class"):
        linear_probe_accuracy(x_tr, torch.zeros(90, dtype=torch.long), x_te, y_te)
    with pytest.raises(ProbeDataError, match="empty"):
        knn_accuracy(x_tr[:0], y_tr[:0], x_te, y_te)


# ---------------------------------------------------------------------------------------------
# The loop: resume equals uninterrupted; bad data


def _data(cfg: PretrainConfig, m: int = 48, n: int = 16) -> PretrainData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, 3, cfg.img_size, cfg.img_size, generator=g)
    y = torch.arange(m) % 2
    x[y == 1, 0] += 1.0
    w = torch.rand(m, n, generator=g)
    return PretrainData(x, w / w.sum(1, keepdim=True), (x, y, x[:16], y[:16]))


SMALL = PretrainConfig(img_size=32, patch_size=8, depth=2, decoder_dim=32, decoder_depth=1,
                       epochs=3, batch_size=16, masker="sift-hint", seed=3)


def test_resume_equals_an_uninterrupted_run() -> None:
    data = _data(SMALL)
    whole = pretrain(SMALL, data)
    saved: list[bytes] = []
    part = pretrain(SMALL, data, on_epoch=lambda s, _r: saved.append(save_state(s)),
                    stop_after=1)
    assert part.epoch == 1 and len(saved) == 1
    resumed = pretrain(SMALL, data, resume=saved[0])
    assert resumed.epoch == 3 and len(resumed.history) == 3
    for a, b in zip(whole.history, resumed.history, strict=True):
        for key in ("loss", "linear_probe", "knn"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    for (name, p), q in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_keypoint_weights_must_match_the_encoders_grid() -> None:
    data = _data(SMALL, n=64)  # weights for an 8 x 8 grid; the encoder has 4 x 4
    with pytest.raises(PretrainInputError, match="cover 64 patches per image but the encoder's "
                                                 "grid has 16"):
        pretrain(SMALL, data)
    one_class = _data(SMALL)
    x, _, xt, yt = one_class.probe
    one_class.probe = (x, torch.zeros(len(x), dtype=torch.long), xt, yt)
    with pytest.raises(ProbeDataError, match="one class"):
        pretrain(SMALL, one_class)


# ---------------------------------------------------------------------------------------------
# The flow on the platform


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset

    return make_shortcut_dataset(tmp_path_factory.mktemp("pretrain") / "data",
                                 ShortcutSpec(n_train=96, n_test=48, seed=4), workers=1)


FLOW_CHILD = """
import sys
from flows.guided_pretrain import PretrainParams, guided_pretrain
guided_pretrain(PretrainParams(data=sys.argv[1], masker="sift", epochs=4, depth=2,
                               batch_size=32, seed=1))
"""


def test_guided_pretrain_killed_midway_resumes_and_matches_an_uninterrupted_run(
        pretrain_data: Path, tmp_path: Path, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from vitsem.platform.services.context import context
    from vitsem.platform.settings import Settings

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "VITSEM_HOME": str(tmp_path / "home"), "VITSEM_MLFLOW_TRACKING_URI": mlflow_uri,
           "VITSEM_ARTIFACT_URI": f"s3://{s3_bucket}/killed",
           "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("VITSEM_DATABASE_URL", None)
    for k, v in env.items():
        if k.startswith(("VITSEM_", "AWS_")):
            monkeypatch.setenv(k, v)

    def run_child() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", FLOW_CHILD, str(pretrain_data)], env=env,
                                stdout=(tmp_path / "child.log").open("ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    store = context(Settings()).store
    proc = run_child()
    deadline = time.monotonic() + 300
    latest = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = [k for k in _keys(store, "pretrain/") if k.endswith("epoch-0002.pt")]
        if found:
            latest = found[0]
            break
        time.sleep(0.1)
    assert latest is not None, (tmp_path / "child.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # killed during epoch 3
    proc.wait()
    rerun = run_child()
    assert rerun.wait(timeout=300) == 0, (tmp_path / "child.log").read_text()[-3000:]
    prefix = latest.rsplit("/", 1)[0]
    import json

    pointer = json.loads(store.get(f"{prefix}/latest.json"))
    assert pointer["epoch"] == 4
    assert all(store.exists(f"{prefix}/epoch-{e:04d}.pt") for e in range(1, 5))
    # The same run uninterrupted, in a fresh store.
    from flows.guided_pretrain import PretrainParams, guided_pretrain

    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/whole")
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home2"))
    whole = guided_pretrain(PretrainParams(data=str(pretrain_data), masker="sift", epochs=4,
                                           depth=2, batch_size=32, seed=1))
    assert whole["resumed_from_epoch"] == 0 and whole["epochs_run"] == 4
    client = MlflowClient(mlflow_uri)
    killed_run = pointer["mlflow_run_id"]
    for key in ("loss", "linear_probe", "knn"):
        resumed = {m.step: m.value for m in client.get_metric_history(killed_run, key)}
        assert sorted(resumed) == [1, 2, 3, 4], key  # epoch 3 logged again after the resume
        expected = {int(r["epoch"]): r[key] for r in whole["history"]}
        for step, value in expected.items():
            assert resumed[step] == pytest.approx(value, abs=1e-5), (key, step)
    version = client.get_model_version_by_alias("vitsem-mae-encoder", "pretrained")
    assert version.run_id == whole["mlflow_run_id"]
    (killed_version,) = client.search_model_versions(f"run_id = '{killed_run}'")
    logged = client.get_logged_model(str(killed_version.source).removeprefix("models:/"))
    assert logged.source_run_id == killed_run
    arts = {a.path for a in client.list_logged_model_artifacts(logged.model_id, "data")}
    assert any(p.endswith(".safetensors") for p in arts)


def _keys(store: object, prefix: str) -> list[str]:
    """Object keys under ``prefix`` of an S3 artifact store."""
    client = store._client  # type: ignore[attr-defined]
    bucket, root = store.bucket, store.prefix  # type: ignore[attr-defined]
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{root}/{prefix}".lstrip("/")):
        out += [o["Key"].removeprefix(f"{root}/").lstrip("/") for o in page.get("Contents", [])]
    return out


@pytest.mark.usefixtures("prefect_api")
def test_flow_refuses_bad_settings_before_any_work(pretrain_data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from flows.guided_pretrain import PretrainParams, guided_pretrain

    home = tmp_path / "home"
    monkeypatch.setenv("VITSEM_HOME", str(home))
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValidationError, match=r"mask.ratio"):  # the parameter form refuses it
        PretrainParams(data=str(pretrain_data), mask_ratio=1.0)
    # Parameters that bypass the form (built unchecked): the flow refuses them itself.
    unchecked = PretrainParams.model_construct(**{
        **PretrainParams(data=str(pretrain_data)).model_dump(), "mask_ratio": 1.0})
    with pytest.raises((ConfigError, ValidationError), match=r"mask.ratio"):
        guided_pretrain(unchecked)
    # Nothing was done: no run record, no data set, no keypoints, no checkpoint.
    assert not (home / "artifacts").exists()
    db = home / "vitsem.db"
    if db.exists():
        eng = sa.create_engine(f"sqlite:///{db}")
        with eng.connect() as c:
            for table in ("flow_runs", "datasets", "keypoint_sets", "images"):
                assert c.scalar(sa.text(f"SELECT count(*) FROM {table}")) == 0, table
        eng.dispose()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixed_precision_epoch_runs() -> None:
    cfg = PretrainConfig(img_size=32, patch_size=8, depth=2, decoder_dim=32, decoder_depth=1,
                         epochs=1, batch_size=16, masker="sift", device="cuda", amp=True)
    state = pretrain(cfg, _data(cfg))
    assert state.mask_gen.device.type == "cuda"
    assert np.isfinite(state.history[0]["loss"]) and 0 <= state.history[0]["knn"] <= 1
