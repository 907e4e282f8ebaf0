"""Guided pre-training on a benchmark folder, resumable: a complete state in the artifact
store after every epoch, keypoint weights from the keypoint store."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vitsem.digests import json_digest
from vitsem.errors import PretrainInputError
from vitsem.method.keypoints import ViewedKeypoints
from vitsem.method.models import save_checkpoint
from vitsem.method.view import ModelView
from vitsem.platform.services.context import Context, context
from vitsem.platform.services.keypoints import KeypointStore
from vitsem.platform.settings import Settings
from vitsem.pretrain.data import assemble_pretrain_data, benchmark_splits, encoder_view
from vitsem.pretrain.loop import PretrainConfig, PretrainState, pretrain, save_state


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


def stored_views(ctx: Context, dataset_id: int, paths: Sequence[str], view: ModelView
                 ) -> tuple[list[ViewedKeypoints], list[str]]:
    """The usable images with their views and keypoints from the keypoint store (computed
    and stored for images it lacks; bad files are rejected and left out) and their hashes."""
    store = KeypointStore(ctx, dataset_id, view, paths)
    items = store.get_many(paths)
    if not items:
        raise PretrainInputError(f"all {len(paths)} images were rejected; nothing to train on")
    return items, store.report.image_sha256


EpochLogger = Callable[[str | None, dict[str, float]], str | None]
"""Called after each epoch with (MLflow run id or None, the epoch's record); returns the run id."""


def pretrain_run(settings: Settings, dataset_id: int, data_root: str, cfg: PretrainConfig,
                 *, limit: int | None = None, stop_after: int | None = None,
                 on_epoch: EpochLogger | None = None) -> PretrainRun:
    """Pre-train on a benchmark folder's ``train`` split (probes on train -> test), saving a
    complete state to the artifact store after every epoch and resuming from the last one
    when the same run (config + images) was interrupted."""
    ctx = context(settings)
    view, grid = encoder_view(cfg)
    train_paths, test_paths, labels = benchmark_splits(data_root, limit)
    train, hashes = stored_views(ctx, dataset_id, train_paths, view)
    test, _ = stored_views(ctx, dataset_id, test_paths, view)
    data = assemble_pretrain_data(train, test, labels, view, grid, cfg.semantic)
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


