"""Attention capture against timm's own AttentionExtract, and its side effects."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.utils import AttentionExtract

from vitsem.errors import UnsupportedModelError
from vitsem.method.attention import (
    attention_modules,
    capture_attention,
    extract_attention,
    num_layers_heads,
    token_layout,
)

FAMILIES = [
    # (timm name, kwargs, prefix tokens): plain ViT, distilled DeiT (CLS + dist), registers
    ("vit_tiny_patch16_224", {"img_size": 64}, 1),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 2),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 56}, 5),
    ("vit_tiny_patch16_224", {"img_size": 48, "class_token": False, "global_pool": "avg",
                              "reg_tokens": 2, "no_embed_class": True}, 2),
]


def _model(name: str, kwargs: dict) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(("name", "kwargs", "prefix"), FAMILIES)
def test_matches_attention_extract(name: str, kwargs: dict, prefix: int) -> None:
    model = _model(name, kwargs)
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        _, maps = extract_attention(model, x)
    layout = token_layout(model, (size, size))
    assert layout.num_prefix == prefix
    assert maps[0].shape[-1] == layout.num_tokens
    for m in attention_modules(model):
        m.fused_attn = False  # AttentionExtract needs the explicit softmax node
    reference = list(AttentionExtract(model)(x).values())
    assert len(reference) == len(maps) == num_layers_heads(model)[0]
    for ours, ref in zip(maps, reference, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "kwargs", "prefix"), FAMILIES[:3])
def test_logits_unchanged_and_hooks_removed(name: str, kwargs: dict, prefix: int) -> None:
    model = _model(name, kwargs)
    assert all(m.fused_attn for m in attention_modules(model))  # timm's fused SDPA path
    x = torch.randn(3, 3, kwargs["img_size"], kwargs["img_size"])
    before = _hook_count(model)
    with torch.no_grad():
        plain = model(x)
        seen: list[int] = []
        with capture_attention(model, lambda layer, a: seen.append(layer)):
            captured = model(x)
        after = model(x)
    assert torch.equal(plain, captured) and torch.equal(plain, after)
    assert seen == list(range(len(attention_modules(model))))
    assert _hook_count(model) == before
    assert all(m.fused_attn for m in attention_modules(model))


def test_hooks_removed_when_the_forward_fails() -> None:
    model = _model("vit_tiny_patch16_224", {"img_size": 32})
    before = _hook_count(model)

    def boom(_layer: int, _a: torch.Tensor) -> None:
        raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"), capture_attention(model, boom):
        model(torch.randn(1, 3, 32, 32))
    assert _hook_count(model) == before


def test_dynamic_image_size_and_batch_of_one() -> None:
    model = _model("vit_tiny_patch16_224", {"img_size": 64, "dynamic_img_size": True})
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        out, maps = extract_attention(model, x)
        assert torch.equal(out, model(x))
    layout = token_layout(model, (48, 80))
    assert layout.grid.grid_hw == (3, 5)
    assert maps[0].shape == (1, 3, 16, 16)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 3, 16))


def test_works_with_gradients_enabled() -> None:
    model = _model("vit_tiny_patch16_224", {"img_size": 32})
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out, maps = extract_attention(model, x)
    out.sum().backward()
    assert x.grad is not None and not maps[0].requires_grad


def test_rejects_models_without_vit_attention() -> None:
    with pytest.raises(UnsupportedModelError, match="no timm ViT attention"):
        attention_modules(torch.nn.Sequential(torch.nn.Linear(3, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model = _model("vit_tiny_patch16_224", {"img_size": 64})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, cpu_maps = extract_attention(model, x)
        out, gpu_maps = extract_attention(model.cuda(), x.cuda())
        assert torch.equal(out, model(x.cuda()))
    for a, b in zip(cpu_maps, gpu_maps, strict=True):
        torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=0)


def test_concurrent_captures_on_one_model_do_not_mix() -> None:
    import threading

    model = _model("vit_tiny_patch16_224", {"img_size": 32})
    inputs = [torch.randn(b, 3, 32, 32) for b in (1, 2, 3, 4)]
    with torch.no_grad():
        expected = [[m.shape for m in extract_attention(model, x)[1]] for x in inputs]
    got: dict[int, list[torch.Size]] = {}
    plain_batches: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        # Assertions inside a thread only print; everything is checked in the main thread.
        try:
            shapes: list[torch.Size] = []
            batches = []
            with torch.no_grad():
                for _ in range(3):
                    shapes.clear()
                    with capture_attention(model, lambda _l, blk: shapes.append(blk.probs.shape)):
                        model(inputs[i])
                    # A plain forward meanwhile must not reach any sink.
                    batches.append(model(inputs[i]).shape[0])
            got[i], plain_batches[i] = list(shapes), batches
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert plain_batches == {i: [len(inputs[i])] * 3 for i in range(4)}
    assert [got[i] for i in range(4)] == expected
