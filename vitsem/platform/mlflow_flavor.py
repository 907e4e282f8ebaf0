"""A vitsem checkpoint as an MLflow model: the ``python_function`` flavour through a loader
module (this one), so ``mlflow.pyfunc.load_model("models:/<name>@<alias>")`` rebuilds the
network from its safetensors file without unpickling anything.

The model folder holds ``MLmodel``, the environment files and ``data/<checkpoint>``;
loading needs vitsem installed (the loader module is imported by name).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitsem.errors import CheckpointError
from vitsem.method.models import load_model
from vitsem.method.view import ModelView

# What the folder needs besides vitsem itself (vitsem ships from source, not PyPI).
_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pillow")


class VitsemPyfunc:
    """The loaded model: ``predict`` maps images to class probabilities.

    Input: (B, H, W, 3) uint8 RGB images of any size (resized and cropped as the model's
    eval transform does) or (B, 3, H, W) float32 tensors already normalised at the model's
    input size. Output: (B, C) float32 softmax probabilities."""

    def __init__(self, checkpoint: Path) -> None:
        self.model, self.spec = load_model(checkpoint=checkpoint)
        self.view = ModelView.from_model(self.model)

    def _batch(self, model_input: Any) -> torch.Tensor:
        arr = np.asarray(model_input)
        if arr.ndim == 4 and arr.dtype == np.uint8 and arr.shape[-1] == 3:
            views = np.stack([self.view.geometry_array(Image.fromarray(a)) for a in arr])
            return self.view.to_tensor(views)
        if arr.ndim == 4 and arr.shape[1] == 3 and arr.shape[2:] == self.view.hw:
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        raise CheckpointError(
            f"{self.spec.name}: predict takes (B, H, W, 3) uint8 images or (B, 3, "
            f"{self.view.hw[0]}, {self.view.hw[1]}) normalised float32 tensors, got an array "
            f"of shape {arr.shape} and dtype {arr.dtype}")

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(self._batch(model_input))
        return logits.softmax(-1).float().numpy()


def _load_pyfunc(data_path: str) -> VitsemPyfunc:
    """MLflow's entry point for ``loader_module``: ``data_path`` is the copied checkpoint."""
    path = Path(data_path)
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{data_path}: expected one .safetensors checkpoint, "
                              f"found {len(files)}")
    return VitsemPyfunc(files[0])


def _requirements() -> list[str]:
    pins = []
    for dist in _REQUIREMENTS:
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def save_pyfunc(checkpoint: Path, path: Path, model_id: str | None = None) -> Path:
    """Write ``checkpoint`` as an MLflow ``python_function`` model folder at ``path``
    (which must not exist); ``model_id`` ties the folder to an MLflow logged model."""
    import mlflow.pyfunc
    from mlflow.models import Model

    meta = Model(model_id=model_id) if model_id else None
    mlflow.pyfunc.save_model(str(path), loader_module=__name__, data_path=str(checkpoint),
                             pip_requirements=_requirements(), mlflow_model=meta)
    return path
