"""Pre-training data from a benchmark folder: images as the encoder sees them, keypoint
weights on the encoder's grid, and the labelled splits for the probes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vitsem.data.shortcut import ShortcutDataset
from vitsem.errors import PretrainInputError
from vitsem.method.attention import token_layout
from vitsem.method.concentration import SemanticConfig, TokenGrid, concentration, patch_weights
from vitsem.method.keypoints import Keypoints, SiftParams, ViewedKeypoints, sift_files
from vitsem.method.models import create_model
from vitsem.method.view import ModelView
from vitsem.pretrain.loop import PretrainConfig, PretrainData


def encoder_view(cfg: PretrainConfig) -> tuple[ModelView, TokenGrid]:
    """The encoder's eval view and its patch grid (the encoder is built once for both)."""
    enc = create_model(cfg.encoder_spec())
    view = ModelView.from_model(enc)
    return view, token_layout(enc, view.hw).grid


def semantic_weights(keypoints: Sequence[Keypoints], grid: TokenGrid,
                     semantic: SemanticConfig = SemanticConfig()) -> torch.Tensor:
    """(M, N) patch weights w of each image's keypoints on the encoder's ``grid``."""
    c = (np.stack([concentration(k, grid, semantic.weighting) for k in keypoints]) if keypoints
         else np.zeros((0, grid.num_patches)))
    return torch.from_numpy(patch_weights(c)).float()


def benchmark_splits(root: str | Path, limit: int | None = None
                     ) -> tuple[list[str], list[str], dict[str, int]]:
    """A benchmark folder's train paths (``limit`` at most), test paths and label by path."""
    ds = ShortcutDataset.load(root)
    labels = {str(ds.root / s.file): s.label for s in ds.samples}
    return ([str(p) for p in ds.paths("train")][:limit], [str(p) for p in ds.paths("test")],
            labels)


def assemble_pretrain_data(train: Sequence[ViewedKeypoints], test: Sequence[ViewedKeypoints],
                           labels: dict[str, int], view: ModelView, grid: TokenGrid,
                           semantic: SemanticConfig) -> PretrainData:
    """Pre-train on ``train``, probe with its labels and evaluate on ``test``."""
    if not train or not test:
        raise PretrainInputError(f"{len(train)} training and {len(test)} test images are "
                                 "usable; both splits need at least one")
    x_tr = view.to_tensor(np.stack([v.view for v in train]))
    x_te = view.to_tensor(np.stack([v.view for v in test]))
    y_tr = torch.tensor([labels[v.path] for v in train])
    y_te = torch.tensor([labels[v.path] for v in test])
    return PretrainData(x_tr, semantic_weights([v.keypoints for v in train], grid, semantic),
                        (x_tr, y_tr, x_te, y_te))


def _viewed(paths: list[str], view: ModelView, workers: int) -> list[ViewedKeypoints]:
    out = []
    for item in sift_files(paths, view, SiftParams(), workers=workers):
        if not isinstance(item, ViewedKeypoints):
            raise PretrainInputError(f"{item.path}: {item.reason}: {item.detail}")
        out.append(item)
    return out


def benchmark_pretrain_data(root: str | Path, cfg: PretrainConfig, workers: int = 1,
                            limit: int | None = None) -> PretrainData:
    """Pre-training data from a benchmark folder without the platform: SIFT runs here, once,
    before any training."""
    view, grid = encoder_view(cfg)
    train, test, labels = benchmark_splits(root, limit)
    return assemble_pretrain_data(_viewed(train, view, workers), _viewed(test, view, workers),
                                  labels, view, grid, cfg.semantic)
