"""Create timm models by name and load weights safely.

Weights are only ever read with ``safetensors`` or ``torch.load(..., weights_only=True)``:
a checkpoint that needs arbitrary code to unpickle is refused, never executed.
vitsem's own checkpoints are safetensors files whose metadata carry a :class:`ModelSpec`,
so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import difflib
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

from vitsem.errors import CheckpointError, UnknownModelError

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
    def from_json(cls, text: str) -> ModelSpec:
        d = json.loads(text)
        return cls(name=d["name"], kwargs=d.get("kwargs", {}), class_names=d.get("class_names"))


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
    model family's ``checkpoint_filter_fn`` (e.g. position-embedding resize)."""
    family = sys.modules.get(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as e:  # a foreign checkpoint can break the filter anywhere
            raise CheckpointError(f"{source}: does not fit {type(model).__name__} ({e})") from e
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
    return ModelSpec.from_json(text) if text else None


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
