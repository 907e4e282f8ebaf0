"""The image exactly as the model sees it, from the model's own timm data config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config


@dataclass(frozen=True)
class ModelView:
    """Geometry (resize, crop) and normalisation of a model's eval transform.

    ``geometry`` maps a PIL image to the model's input size (H, W); ``to_tensor`` turns
    that view into the normalised (3, H, W) float tensor the model takes.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    data_config: dict[str, Any] = field(compare=False, repr=False, hash=False)
    _geometry: Callable[[Image.Image], Image.Image] = field(compare=False, repr=False,
                                                           hash=False)

    @classmethod
    def from_data_config(cls, data_config: dict[str, Any]) -> ModelView:
        cfg = dict(data_config)
        transform = create_transform(**cfg, is_training=False)
        steps = []
        for t in getattr(transform, "transforms", [transform]):
            # Everything before the tensor conversion is geometry (and colour-free).
            if "ToTensor" in type(t).__name__ or "Normalize" in type(t).__name__:
                break
            steps.append(t)

        def geometry(img: Image.Image) -> Image.Image:
            for step in steps:
                img = step(img)
            return img

        return cls(
            input_size=tuple(cfg["input_size"]),
            mean=tuple(float(m) for m in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(s) for s in cfg["std"]),  # type: ignore[arg-type]
            data_config=cfg,
            _geometry=geometry,
        )

    @classmethod
    def from_model(cls, model: torch.nn.Module,
                   input_hw: tuple[int, int] | None = None) -> ModelView:
        """The model's eval view. timm's pretrained config keeps the default input size when
        a model is built with another ``img_size``, so the patch embedding's size wins;
        ``input_hw`` overrides both (for dynamic-size models)."""
        cfg = resolve_data_config({}, model=model)
        pe_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if input_hw is not None:
            cfg["input_size"] = (3, int(input_hw[0]), int(input_hw[1]))
        elif pe_size is not None:
            cfg["input_size"] = (3, int(pe_size[0]), int(pe_size[1]))
        return cls.from_data_config(cfg)

    @property
    def hw(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    def geometry(self, img: Image.Image) -> Image.Image:
        """Resize and crop ``img`` as the model's eval transform does."""
        out = self._geometry(img.convert("RGB"))
        if out.size != (self.input_size[2], self.input_size[1]):
            raise ValueError(
                f"the model's transform produced {out.size[0]}x{out.size[1]}, expected "
                f"{self.input_size[2]}x{self.input_size[1]}"
            )
        return out

    def geometry_array(self, img: Image.Image) -> np.ndarray:
        """:meth:`geometry` as an (H, W, 3) uint8 array."""
        return np.asarray(self.geometry(img), dtype=np.uint8)

    def to_tensor(self, views: np.ndarray) -> torch.Tensor:
        """(H, W, 3) or (B, H, W, 3) uint8 views -> normalised (B, 3, H, W) float32."""
        arr = views[None] if views.ndim == 3 else views
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the data config in worker processes: the transform closure does not pickle.
        return (ModelView.from_data_config, (self.data_config,))
