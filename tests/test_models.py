"""Model creation and safe checkpoint loading."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitsem.errors import CheckpointError, UnknownModelError
from vitsem.method.models import (
    ModelSpec,
    create_model,
    load_model,
    read_state_dict,
    save_checkpoint,
)

TINY = {"img_size": 32, "depth": 2}


class Payload:
    """Stands for arbitrary code in a pickle: unpickling it would run ``__reduce__``."""

    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_unknown_model_name_suggests() -> None:
    with pytest.raises(UnknownModelError, match="vit_tiny_patch16_224"):
        load_model("vit_tiny_patch16_244")


def test_vitsem_checkpoint_round_trip(tmp_path: Path) -> None:
    spec = ModelSpec("vit_tiny_patch16_224", {**TINY, "num_classes": 3}, ["a", "b", "c"])
    model = create_model(spec)
    path = save_checkpoint(model, spec, tmp_path / "m.safetensors")
    loaded, got = load_model(checkpoint=path)
    assert got == spec
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_timm_weights_from_local_files(tmp_path: Path) -> None:
    """Pretrained weights fetched elsewhere load from disk, in torch and safetensors form."""
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    sd = src.state_dict()
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    for name in ("w.pth", "w.safetensors"):
        model, spec = load_model("vit_tiny_patch16_224", tmp_path / name, **TINY)
        with torch.no_grad():
            assert torch.equal(model(x), src(x)), name
        assert spec.kwargs == TINY


def test_pickled_code_is_refused_not_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump(OrderedDict(w=Payload()), f)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    assert "pwned" not in capsys.readouterr().out


def test_wrong_shapes_are_named(tmp_path: Path) -> None:
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, **TINY)
    torch.save(other.state_dict(), tmp_path / "w7.pth")
    with pytest.raises(CheckpointError, match=r"head.weight: checkpoint \(7, 192\)"):
        load_model("vit_tiny_patch16_224", tmp_path / "w7.pth", num_classes=3, **TINY)
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    torch.save(small.state_dict(), tmp_path / "d1.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model("vit_tiny_patch16_224", tmp_path / "d1.pth", **TINY)


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "none.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(tmp_path / "w.onnx")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="name the architecture"):
        load_model(checkpoint=plain)


def test_device_auto_is_cuda_when_present_and_bad_devices_are_refused() -> None:
    from flows.attention_analysis import AnalysisParams
    from flows.guided_pretrain import PretrainParams
    from vitsem.errors import ConfigError
    from vitsem.method.models import resolve_device

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == here
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert AnalysisParams(data="x").config().device == here  # the flows' default is auto
    assert PretrainParams(data="x").config().device == here
    assert AnalysisParams(data="x", device="cpu").config().device == "cpu"


def test_the_audit_takes_a_device_refuses_unknown_ones_and_keeps_its_digest() -> None:
    from dataclasses import asdict

    from flows.model_audit import ModelAuditParams
    from flows.spurious_audit import AuditParams
    from vitsem.audit.pipeline import AuditConfig
    from vitsem.errors import ConfigError
    from vitsem.platform.services.audit import _digest_cfg

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert AuditParams(data="x").config().device == here
    assert AuditParams(data="x", device="cpu").config().device == "cpu"
    assert AuditParams(data="x", device="cuda:1").config().device == "cuda:1"
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        AuditParams(data="x", device="gpu").config()
    with pytest.raises(ConfigError, match="unknown device 'tpu0'"):
        AuditConfig(device="tpu0").validate()
    # The parent audit hands its device to the audit step.
    step = ModelAuditParams(data="x", device="cuda:0").step(AuditParams)
    assert step.device == "cuda:0"
    # Not part of the digest, which stays what it was before the field existed.
    old = {k: v for k, v in asdict(AuditConfig()).items() if k != "device"}
    assert _digest_cfg(AuditConfig(device="cuda")) == _digest_cfg(AuditConfig()) == old
