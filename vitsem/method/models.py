"""Create timm models by name and load weights safely.

Weights are only ever read with ``safetensors`` or ``torch.load(..., weights_only=True)``:
a checkpoint that needs arbitrary code to unpickle is refused, never executed.
vitsem's own checkpoints are safetensors files whose metadata carry a :class:`ModelSpec`,
so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import pickle
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file
from torch import nn

from vitsem.errors import CheckpointError, ConfigError, UnknownModelError

SPEC_METADATA_KEY = "vitsem_model_spec"


@dataclass
class ModelSpec:
    """What rebuilds a model: the timm ``name``, its constructor ``kwargs`` (img_size,
    patch_size, depth, num_classes, ...) and optional ``class_names``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model spec") -> ModelSpec:
        """Parse and check a spec (see :func:`validate_spec`); :class:`CheckpointError`
        naming ``source`` for malformed JSON, missing fields or values out of bounds."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{source}: the embedded model spec is not valid JSON ({e}); "
                                  "re-save the checkpoint with vitsem") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: the embedded model spec is not a JSON object")
        unknown = sorted(set(d) - {"name", "kwargs", "class_names"})
        if unknown:
            raise CheckpointError(f"{source}: the embedded model spec has unknown fields "
                                  f"{unknown[:5]}")
        spec = cls(name=d.get("name"), kwargs=d.get("kwargs", {}),  # type: ignore[arg-type]
                   class_names=d.get("class_names"))
        validate_spec(spec, source)
        return spec


# ---------------------------------------------------------------------------------------------
# What a checkpoint may ask for. A spec read from a file is untrusted: its kwargs reach
# timm.create_model, so only constructor arguments of the Vision Transformer family, each in
# bounds that a ViT vitsem can analyse on a workstation respects, are accepted.

SPEC_ARCH_MODULES = ("vision_transformer",)
"""timm modules whose models a checkpoint spec may name (ViTs with a patch grid)."""

_INT_KWARGS: dict[str, tuple[int, int]] = {
    "img_size": (8, 1024), "patch_size": (1, 64), "depth": (1, 48), "embed_dim": (8, 2048),
    "num_heads": (1, 64), "num_classes": (0, 100_000), "in_chans": (1, 8),
    "reg_tokens": (0, 16), "num_register_tokens": (0, 16),
}
_FLOAT_KWARGS: dict[str, tuple[float, float]] = {
    "mlp_ratio": (0.25, 8.0), "drop_rate": (0.0, 0.99), "attn_drop_rate": (0.0, 0.99),
    "drop_path_rate": (0.0, 0.99), "proj_drop_rate": (0.0, 0.99), "pos_drop_rate": (0.0, 0.99),
    "patch_drop_rate": (0.0, 0.99), "init_values": (0.0, 10.0),
}
_BOOL_KWARGS = frozenset({"class_token", "qkv_bias", "qk_norm", "no_embed_class",
                          "pre_norm", "fc_norm", "dynamic_img_size", "dynamic_img_pad"})
_CHOICE_KWARGS: dict[str, frozenset[str]] = {
    "global_pool": frozenset({"", "token", "avg", "avgmax", "max", "map"}),
}
SPEC_KWARGS = frozenset(_INT_KWARGS) | frozenset(_FLOAT_KWARGS) | _BOOL_KWARGS \
    | frozenset(_CHOICE_KWARGS)
"""The constructor arguments a checkpoint spec may carry (nothing that names a file)."""

MAX_SPEC_TOKENS = 16_384
"""Patch tokens per image at most ((img_size / patch_size)^2): attention memory grows with
its square."""

MAX_SPEC_PARAMETERS = 1_000_000_000
"""Parameters at most (4 GB of float32 weights)."""

MAX_CLASS_NAMES = 100_000


def _bounded_int(source: str, key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{source}: model spec {key}={value!r:.60} is not an integer")
    if not lo <= value <= hi:
        raise CheckpointError(f"{source}: model spec {key}={value} is out of bounds "
                              f"[{lo}, {hi}]; refusing to build it")
    return value


def validate_spec(spec: ModelSpec, source: str = "model spec") -> None:
    """Check an untrusted spec before any model is built: a known ViT architecture, only
    allow-listed constructor arguments (:data:`SPEC_KWARGS`) of the right types within
    bounds, a bounded token count and size, and class names that are strings. Raises
    :class:`CheckpointError` naming ``source`` and the offending value."""
    if not isinstance(spec.name, str) or not spec.name:
        raise CheckpointError(f"{source}: the model spec names no architecture ('name')")
    if not isinstance(spec.kwargs, dict):
        raise CheckpointError(f"{source}: model spec kwargs must be an object")
    if spec.name not in _spec_architectures():
        raise CheckpointError(
            f"{source}: model spec names {spec.name[:80]!r}, not a known Vision Transformer "
            f"architecture of timm ({', '.join(SPEC_ARCH_MODULES)})")
    refused = sorted(k for k in spec.kwargs if k not in SPEC_KWARGS)
    if refused:
        raise CheckpointError(
            f"{source}: model spec argument(s) {[k[:40] for k in refused[:5]]} are not "
            f"allowed (file paths and other options are refused); allowed: "
            f"{', '.join(sorted(SPEC_KWARGS))}")
    for key, value in spec.kwargs.items():
        if key in _INT_KWARGS:
            lo, hi = _INT_KWARGS[key]
            if key == "img_size" and isinstance(value, list):
                if len(value) != 2:
                    raise CheckpointError(f"{source}: model spec img_size must be an integer "
                                          "or [height, width]")
                for v in value:
                    _bounded_int(source, key, v, lo, hi)
            else:
                _bounded_int(source, key, value, lo, hi)
        elif key in _FLOAT_KWARGS:
            lo_f, hi_f = _FLOAT_KWARGS[key]
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not lo_f <= float(value) <= hi_f:
                raise CheckpointError(f"{source}: model spec {key}={value!r:.60} is not a "
                                      f"number in [{lo_f}, {hi_f}]")
        elif key in _BOOL_KWARGS:
            if not isinstance(value, bool):
                raise CheckpointError(f"{source}: model spec {key}={value!r:.60} is not a "
                                      "boolean")
        elif not isinstance(value, str) or value not in _CHOICE_KWARGS[key]:
            raise CheckpointError(f"{source}: model spec {key}={value!r:.60} is not one of "
                                  f"{sorted(_CHOICE_KWARGS[key])}")
    _check_size(spec, source)
    names = spec.class_names
    if names is not None and (not isinstance(names, list) or len(names) > MAX_CLASS_NAMES
                              or not all(isinstance(n, str) and len(n) <= 256 for n in names)):
        raise CheckpointError(f"{source}: model spec class_names must be a list of at most "
                              f"{MAX_CLASS_NAMES} strings of at most 256 characters")


@functools.lru_cache(maxsize=1)
def _spec_architectures() -> frozenset[str]:
    return frozenset(n for m in SPEC_ARCH_MODULES for n in timm.list_models(module=m))


def _check_size(spec: ModelSpec, source: str) -> None:
    """Build ``spec`` on the meta device (shapes only, no memory) and bound its patch tokens
    and parameters; kwargs are already allow-listed, so this runs no untrusted option."""
    try:
        with torch.device("meta"):
            net = timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f"{source}: the model spec does not build a {spec.name} "
                              f"({type(e).__name__}: {e})") from None
    grid = getattr(getattr(net, "patch_embed", None), "num_patches", None)
    if grid is None:
        raise CheckpointError(f"{source}: {spec.name} has no patch grid; not a ViT vitsem "
                              "can analyse")
    if int(grid) > MAX_SPEC_TOKENS:
        raise CheckpointError(f"{source}: the model spec asks for {int(grid):,} patch tokens "
                              f"per image; at most {MAX_SPEC_TOKENS:,}")
    size = sum(p.numel() for p in net.parameters())
    if size > MAX_SPEC_PARAMETERS:
        raise CheckpointError(f"{source}: the model spec asks for {size:,} parameters; at "
                              f"most {MAX_SPEC_PARAMETERS:,}")


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError` with close matches when timm does not know ``name``."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def create_model(spec: ModelSpec, *, pretrained: bool = False) -> nn.Module:
    """Build ``spec`` with timm, in eval mode. ``pretrained`` fetches timm's weights, which
    needs network access; offline, pass a weights file to :func:`load_model` instead."""
    check_model_name(spec.name)
    try:
        model = timm.create_model(spec.name, pretrained=pretrained, **spec.kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            raise CheckpointError(
                f"pretrained weights for {spec.name!r} could not be loaded ({e}); without "
                "network access, download them elsewhere and pass the file as the checkpoint"
            ) from e
        raise
    return model.eval()


# ---------------------------------------------------------------------------------------------
# State-dict files, by suffix.


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file holds pickled objects beyond tensors, and loading it "
            "could run arbitrary code. Re-save only the state_dict (torch.save(model."
            "state_dict(), ...)) or convert it to safetensors"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not contain a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


STATE_DICT_READERS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    ".safetensors": _read_safetensors,
    ".pt": _read_torch,
    ".pth": _read_torch,
    ".bin": _read_torch,
}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely (see :data:`STATE_DICT_READERS` for the formats)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    reader = STATE_DICT_READERS.get(p.suffix.lower())
    if reader is None:
        raise CheckpointError(
            f"{p}: unknown checkpoint format {p.suffix!r}; use one of {sorted(STATE_DICT_READERS)}"
        )
    return reader(p)


def apply_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` strictly, adapting original-format timm checkpoints with the
    model family's ``checkpoint_filter_fn`` (e.g. position-embedding resize). Weights with
    NaN or infinite values are refused (:class:`CheckpointError`), not loaded silently."""
    family = sys.modules.get(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as e:  # a foreign checkpoint can break the filter anywhere
            raise CheckpointError(f"{source}: does not fit {type(model).__name__} ({e})") from e
    bad = [k for k, v in state_dict.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{source}: refused: {len(bad)} weight tensor(s) hold NaN or infinite values "
            f"({', '.join(bad[:4])}); the model would output NaN. Re-export the weights from a "
            "healthy training run")
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:4])})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:4])})")
        raise CheckpointError(
            f"{source}: weights do not fit the model: {'; '.join(parts)}. Check the model name "
            "and its arguments (num_classes, img_size, patch_size, depth)"
        )
    model.load_state_dict(state_dict, strict=True)


def save_checkpoint(model: nn.Module, spec: ModelSpec, path: str | Path) -> Path:
    """Write ``model``'s weights and ``spec`` to a safetensors file (atomically)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors_file(tensors, str(tmp), metadata={SPEC_METADATA_KEY: spec.to_json()})
    tmp.replace(out)
    return out


def read_checkpoint_spec(path: str | Path) -> ModelSpec | None:
    """The :class:`ModelSpec` stored in a vitsem checkpoint, or None for other files."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e
    text = meta.get(SPEC_METADATA_KEY)
    return ModelSpec.from_json(text, str(p)) if text else None


def model_checksum(spec: ModelSpec, checkpoint: str | Path | None) -> str:
    """sha256 (hex) of the spec's JSON and the weights file's bytes: the identity of a model
    across runs, files and registry versions."""
    h = hashlib.sha256(spec.to_json().encode())
    if checkpoint is not None:
        with open(checkpoint, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_model(model: str | None = None, checkpoint: str | Path | None = None, *,
               pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, ModelSpec]:
    """Build a model, the obvious way round:

    - ``load_model("vit_small_patch16_224", pretrained=True)``: timm's weights (network);
    - ``load_model(checkpoint="tiny.safetensors")``: a vitsem checkpoint rebuilds itself;
    - ``load_model("vit_small_patch16_224", checkpoint="w.pth")``: any weights file for a
      named architecture, read safely; ``kwargs`` go to ``timm.create_model``.
    """
    spec = read_checkpoint_spec(checkpoint) if checkpoint is not None else None
    if spec is None:
        if model is None:
            raise CheckpointError(
                f"{checkpoint}: carries no vitsem model spec; name the architecture too "
                "(--model NAME)" if checkpoint else "name a model or a checkpoint"
            )
        spec = ModelSpec(model, dict(kwargs))
    elif model is not None and model != spec.name:
        raise CheckpointError(f"{checkpoint}: holds a {spec.name!r}, not a {model!r}")
    net = create_model(spec, pretrained=pretrained and checkpoint is None)
    if checkpoint is not None:
        apply_state_dict(net, read_state_dict(checkpoint), str(checkpoint))
    return net.eval(), spec


def resolve_device(device: str) -> str:
    """``auto`` is ``cuda`` when a CUDA device is present, else ``cpu``; any other value must
    be a device torch knows (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    return device
