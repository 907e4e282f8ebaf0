"""Every timm architecture: the capture matches timm's AttentionExtract or is refused.

``timm.list_models()`` is grouped by the timm module that defines each model (one family a
file, timm's own layout), and the smallest-named variant of each family is checked, plus
one model per attention variant inside the supported families. Each either

- matches ``AttentionExtract`` (fused attention off) to 1e-5 with its logits bit-equal to a
  plain forward, or
- raises :class:`UnsupportedModelError` naming the family,

and nothing else. The held-back check runs the same over every variant of the given
families (minutes to hours of CPU; giant variants need tens of GB)::

    VITSEM_ATTENTION_FAMILIES=vision_transformer,eva,beit \\
        pytest tests/test_attention_families.py -k held_back
"""

from __future__ import annotations

import gc
import os
import re
import warnings
from collections.abc import Iterator

import pytest
import timm
import torch
from timm.utils import AttentionExtract

from vitsem.errors import UnsupportedModelError
from vitsem.method.attention import attention_modules, capture_attention, extract_attention

SIZE_WORDS = ("test", "atto", "femto", "pico", "nano", "micro", "xxxs", "xxs", "tiny", "xs",
              "mini", "wee", "little", "small", "s", "medium", "m", "base", "b")
"""Words in timm names for small variants, smallest first."""

VARIANTS = [
    "vit_tiny_patch16_224",  # plain ViT
    "deit_tiny_distilled_patch16_224",  # CLS + distillation token
    "vit_small_patch14_reg4_dinov2",  # registers
    "eva02_tiny_patch14_224",  # EVA02: rotary after q/k norms
    "vit_small_patch16_rope_224",  # rotary ViT (EvaAttention)
    "vit_small_patch16_rope_mixed_224",  # mixed (learned) rotary
    "vit_small_patch16_dinov3",  # DINOv3: rotary, registers
    "vit_pe_core_tiny_patch16_384",  # perception encoder
    "beit_base_patch16_224",  # relative position bias as SDPA mask
    "vit_relpos_small_patch16_224",  # relative-position ViT
    "vit_pwee_patch16_reg1_gap_256",  # ParallelScalingBlock
    "vit_dwee_patch16_reg1_gap_256",  # differential attention: refused
    "cait_xxs24_224",  # talking heads + class attention: refused
    "naflexvit_base_patch16_gap",  # NaFlex
    "resnet18",  # no attention: refused
]


@pytest.fixture(autouse=True)
def _free_models() -> Iterator[None]:
    """One model at a time: free each family's model before the next is built."""
    yield
    gc.collect()


def _size_rank(name: str) -> tuple[int, int, int, str]:
    words = [re.sub(r"\d+$", "", w) for w in re.split(r"[_\-.]", name)]
    ranks = [SIZE_WORDS.index(w) for w in words if w in SIZE_WORDS]
    millions = [int(m) for m in re.findall(r"_(\d+)m(?:_|$)", name)]  # e.g. qwen3_vit_88m
    return (min(ranks) if ranks else len(SIZE_WORDS), min(millions, default=0), len(name), name)


def family_representatives() -> dict[str, str]:
    """timm module -> its smallest-named model, over all of ``timm.list_models()``."""
    families: dict[str, list[str]] = {}
    for module in timm.list_modules():
        families[module] = timm.list_models(module=module)
    return {m: min(names, key=_size_rank) for m, names in sorted(families.items()) if names}


def _build(name: str, **kwargs: object) -> torch.nn.Module:
    """Random weights, eval mode; two blocks where the family takes ``depth`` (memory and
    time: a 412M-parameter family then fits in well under 1 GB)."""
    try:
        return timm.create_model(name, pretrained=False, depth=2, **kwargs).eval()
    except Exception:  # no integer depth in this family: its full depth
        return timm.create_model(name, pretrained=False, **kwargs).eval()


def _create(name: str, small: bool = True) -> tuple[torch.nn.Module, int]:
    """The model at a small input (4 patches a side) where the family allows, else at its
    own input size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if small:
            try:
                model = _build(name, img_size=64)
                patch = next((m.patch_size for n, m in model.named_modules()
                              if n.endswith("patch_embed") and hasattr(m, "patch_size")), (16,))
                if 64 % int(patch[0]) == 0:
                    return model, 64
                size = 4 * int(patch[0])
                return _build(name, img_size=size), size
            except TypeError:  # no img_size argument
                pass
        model = _build(name)
    return model, int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def _forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        plain = model(x)
        out, maps = extract_attention(model, x)
    assert torch.equal(plain, out), "logits changed under capture"
    return out, maps


def check_model(name: str) -> str:
    """'matches' or 'refused: <message>'; fails the test on any other outcome."""
    model, size = _create(name)
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    try:
        attention_modules(model)  # structural refusal first: no forward needed
        try:
            _, maps = _forward(model, x)
        except (RuntimeError, AssertionError) as e:  # the family breaks at the small size
            if isinstance(e, UnsupportedModelError) or size != 64:
                raise
            model, size = _create(name, small=False)
            assert size <= 256, f"{name} fails at 64 px and its own size {size} is too big: {e}"
            x = torch.randn(2, 3, size, size)
            _, maps = _forward(model, x)
    except UnsupportedModelError as e:
        assert type(model).__name__ in str(e), f"{name}: the error must name the family: {e}"
        return f"refused: {e}"
    mods = attention_modules(model)
    names = [n + ".attn_drop" for n, m in model.named_modules() if any(m is a for a in mods)]
    for m in mods:
        m.fused_attn = False  # type: ignore[assignment]
    with torch.no_grad():
        reference = list(AttentionExtract(model, names=names, method="hook")(x).values())
    assert len(reference) == len(maps), f"{name}: {len(maps)} maps, reference {len(reference)}"
    for layer, (ours, ref) in enumerate(zip(maps, reference, strict=True)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0,
                                   msg=lambda m, layer=layer: f"{name} block {layer}: {m}")
    return "matches"


@pytest.mark.parametrize("name", VARIANTS)
def test_attention_variants(name: str) -> None:
    outcome = check_model(name)
    refused = ("vit_dwee", "cait", "resnet")
    assert outcome.startswith("refused") == name.startswith(refused), outcome


@pytest.mark.parametrize("module", sorted(family_representatives()))
def test_every_timm_family_matches_or_is_refused(module: str) -> None:
    check_model(family_representatives()[module])


HELD_BACK = [name for module in filter(None, os.environ.get(
    "VITSEM_ATTENTION_FAMILIES", "").split(",")) for name in timm.list_models(module=module)]


@pytest.mark.skipif(not HELD_BACK, reason="held back: set VITSEM_ATTENTION_FAMILIES")
@pytest.mark.parametrize("name", HELD_BACK or ["none"])
def test_held_back_variants(name: str) -> None:
    check_model(name)


def test_explicit_path_is_read_at_attn_drop() -> None:
    model, size = _create("eva02_tiny_patch14_224")
    for m in attention_modules(model):
        m.fused_attn = False  # type: ignore[assignment]
    x = torch.randn(1, 3, size, size)
    seen: list[torch.Tensor] = []
    with torch.no_grad(), capture_attention(model, lambda _l, b: seen.append(b.probs)):
        model(x)
    reference = list(AttentionExtract(model)(x).values())
    for ours, ref in zip(seen, reference, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
