"""Guided pre-training on a benchmark folder, resumable: a complete state in the artifact
store after every epoch, keypoint weights from the keypoint store."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitsem.data.shortcut import ShortcutDataset
from vitsem.digests import json_digest
from vitsem.errors import PretrainInputError
from vitsem.method.concentration import TokenGrid
from vitsem.method.models import save_checkpoint
from vitsem.method.view import ModelView
from vitsem.platform.services.context import Context, context
from vitsem.platform.services.keypoints import KeypointStore
from vitsem.platform.settings import Settings
from vitsem.pretrain.data import encoder_view, semantic_weights
from vitsem.pretrain.loop import PretrainConfig, PretrainData, PretrainState, pretrain, save_state


@dataclass
class PretrainRun:
    """A finished pre-training run: its key, history, where its checkpoints and final
    encoder are, and how many epochs this call ran (the rest were resumed)."""

    run_key: str
    history: list[dict[str, float]]
    checkpoint_prefix: str
    encoder_path: Path
    epochs_run: int
    resumed_from: int
    mlflow_run_id: str | None


def pretrain_weights(ctx: Context, dataset_id: int, paths: Sequence[str], view: ModelView,
                     grid: TokenGrid) -> tuple[list[str], np.ndarray, torch.Tensor, list[str]]:
    """The usable paths, their views (M, H, W, 3), keypoint weights (M, N) on the encoder's
    grid from the keypoint store (computed and stored for images it lacks) and image hashes;
    bad files are rejected and left out."""
    store = KeypointStore(ctx, dataset_id, view, paths)
    items = store.get_many(paths)
    if not items:
        raise PretrainInputError(f"all {len(paths)} images were rejected; nothing to train on")
    views = np.stack([it.view for it in items])
    return ([it.path for it in items], views,
            semantic_weights([it.keypoints for it in items], grid), store.report.image_sha256)


EpochLogger = Callable[[str | None, dict[str, float]], str | None]
"""Called after each epoch with (MLflow run id or None, the epoch's record); returns the run id."""


def pretrain_run(settings: Settings, dataset_id: int, data_root: str, cfg: PretrainConfig,
                 *, limit: int | None = None, stop_after: int | None = None,
                 on_epoch: EpochLogger | None = None) -> PretrainRun:
    """Pre-train on a benchmark folder's ``train`` split (probes on train -> test), saving a
    complete state to the artifact store after every epoch and resuming from the last one
    when the same run (config + images) was interrupted."""
    ctx = context(settings)
    ds = ShortcutDataset.load(data_root)
    view, grid = encoder_view(cfg)
    labels = {str(ds.root / s.file): s.label for s in ds.samples}
    train = [str(ds.root / s.file) for s in ds.split("train")][:limit]
    test = [str(ds.root / s.file) for s in ds.split("test")]
    tr_paths, tr_views, weights, hashes = pretrain_weights(ctx, dataset_id, train, view, grid)
    te_paths, te_views, _, _ = pretrain_weights(ctx, dataset_id, test, view, grid)
    x_tr, x_te = view.to_tensor(tr_views), view.to_tensor(te_views)
    y_tr = torch.tensor([labels[p] for p in tr_paths])
    y_te = torch.tensor([labels[p] for p in te_paths])
    data = PretrainData(x_tr, weights, (x_tr, y_tr, x_te, y_te))
    run_key = json_digest({"cfg": cfg.to_dict(), "images": hashes})
    prefix = f"pretrain/{run_key}"
    latest_key = f"{prefix}/latest.json"
    resume, start, mlflow_run = None, 0, None
    if ctx.store.exists(latest_key):
        latest = json.loads(ctx.store.get(latest_key))
        resume = ctx.store.get(latest["checkpoint"])
        start, mlflow_run = int(latest["epoch"]), latest.get("mlflow_run_id")

    def save(state: PretrainState, record: dict[str, float]) -> None:
        nonlocal mlflow_run
        key = f"{prefix}/epoch-{state.epoch:04d}.pt"
        ctx.store.replace(key, save_state(state))  # a resumed run may write it again
        if on_epoch is not None:
            mlflow_run = on_epoch(mlflow_run, record) or mlflow_run
        # The pointer goes last: a run killed before it resumes from the previous epoch.
        ctx.store.replace(latest_key, json.dumps({"epoch": state.epoch, "checkpoint": key,
                                                  "mlflow_run_id": mlflow_run}).encode())

    state = pretrain(cfg, data, resume=resume, on_epoch=save, stop_after=stop_after)
    out = Path(tempfile.mkdtemp(prefix="vitsem-pretrain-")) / f"encoder-{run_key[:12]}.safetensors"
    save_checkpoint(state.model.encoder, cfg.encoder_spec(), out)
    return PretrainRun(run_key, state.history, prefix, out, state.epoch - start, start,
                       mlflow_run)


