"""Train a small ViT classifier on the shipped benchmark, on the CPU, in minutes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitsem.data.shortcut import Sample, ShortcutDataset
from vitsem.errors import ConfigError
from vitsem.method.images import open_image
from vitsem.method.models import ModelSpec, create_model, save_checkpoint
from vitsem.method.training import group_accuracy, predict_labels, warmup_cosine_lr
from vitsem.method.view import ModelView


@dataclass(frozen=True)
class TrainConfig:
    """Trainer settings. The default model is a ``vit_tiny_patch16_224``-family ViT (width
    192, 3 heads) at 64 px with 8 px patches (an 8 x 8 grid) and 6 blocks."""

    model: str = "vit_tiny_patch16_224"
    img_size: int = 64
    patch_size: int = 8
    depth: int = 6
    epochs: int = 8
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    augment: str = "jitter"
    """``jitter`` (brightness only, keeps every pixel where it is) or ``shift`` (also a
    random translation of up to ``max_shift`` pixels, image and cue together: helps a
    small ViT learn a core that sits anywhere)."""
    max_shift: int = 4
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def model_spec(self, class_names: list[str]) -> ModelSpec:
        kwargs = {"img_size": self.img_size, "patch_size": self.patch_size, "depth": self.depth,
                  "num_classes": len(class_names), **self.extra}
        return ModelSpec(self.model, kwargs, class_names)


@dataclass
class TrainResult:
    checkpoint: Path
    train_accuracy: float
    test_accuracy: float
    test_worst_group_accuracy: float
    test_group_accuracy: dict[str, float]
    seconds: float
    test_clean_accuracy: float | None
    history: list[dict[str, float]]
    cpu_seconds: float = float("nan")
    """CPU time of this process while training (on a shared machine, steadier than the
    wall-clock ``seconds``; equal to it for one busy thread on an idle core)."""


def load_split(ds: ShortcutDataset, split: str, view: ModelView
               ) -> tuple[torch.Tensor, torch.Tensor, list[Sample]]:
    """A split as model-ready tensors: (M, 3, H, W) float32 and (M,) labels."""
    samples = ds.split(split)
    views = np.stack([view.geometry_array(open_image(ds.root / s.file)) for s in samples])
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return view.to_tensor(views), labels, samples


def _shift(xb: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], filling
    with the edge pixels (replicate padding, then a crop per image)."""
    if max_shift <= 0:
        return xb
    b, _c, h, w = xb.shape
    padded = F.pad(xb, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (B, W)
    idx_b = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(
        0, 3, 1, 2)


AUGMENTS = ("jitter", "shift")


def train_classifier(data_dir: str | Path, out: str | Path, config: TrainConfig = TrainConfig(),
                     progress: Callable[[int, int, dict[str, float]], None] | None = None
                     ) -> TrainResult:
    """Train on the ``train`` split, evaluate on ``test``, save a vitsem checkpoint at ``out``."""
    t0, c0 = time.perf_counter(), time.process_time()
    if config.augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {AUGMENTS}, got {config.augment!r}")
    torch.manual_seed(config.seed)
    ds = ShortcutDataset.load(data_dir)
    spec = config.model_spec(ds.class_names)
    model = create_model(spec)
    view = ModelView.from_model(model)
    x_tr, y_tr, _ = load_split(ds, "train", view)
    x_te, y_te, te_samples = load_split(ds, "test", view)

    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)

    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        losses = []
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            xb = x_tr[idx]
            # Light augmentation that keeps the glyph where it is: a horizontal flip of the
            # object would move the shortcut too, so only colour jitter.
            xb = xb * (1 + 0.1 * torch.randn(len(idx), 1, 1, 1, generator=gen))
            if config.augment == "shift":
                xb = _shift(xb, config.max_shift, gen)
            for group in opt.param_groups:
                group["lr"] = warmup_cosine_lr(config.lr, step, warmup, total)
            loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        acc = float((predict_labels(model, x_te) == y_te).float().mean())
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "test_accuracy": acc}
        history.append(record)
        if progress is not None:
            progress(epoch + 1, config.epochs, record)
    model.eval()
    pred_te = predict_labels(model, x_te)
    groups = group_accuracy(pred_te.numpy(), y_te.numpy(), [s.group for s in te_samples])
    path = save_checkpoint(model, spec, out)
    clean = torch.tensor([not s.shortcut for s in te_samples])
    return TrainResult(
        checkpoint=path,
        train_accuracy=float((predict_labels(model, x_tr) == y_tr).float().mean()),
        test_accuracy=float((pred_te == y_te).float().mean()),
        test_worst_group_accuracy=min(groups.values()),
        test_group_accuracy=groups,
        seconds=time.perf_counter() - t0,
        test_clean_accuracy=float((pred_te == y_te)[clean].float().mean()) if clean.any()
        else None,
        history=history,
        cpu_seconds=time.process_time() - c0,
    )
