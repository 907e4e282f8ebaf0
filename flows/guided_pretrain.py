"""Guided pre-training flow: MAE with a keypoint-guided masker, per-epoch metrics to MLflow,
a checkpoint per epoch in the artifact store, the final encoder registered in MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from pydantic import Field

from flows.common import (
    RETRYING_TASK,
    FlowParams,
    flow_options,
    publish,
    task_namer,
    tracked,
)
from flows.runners import PerRunTaskRunner, RunnerParams
from vitsem.method.concentration import SemanticConfig, Weighting
from vitsem.method.models import resolve_device
from vitsem.platform import pretrain_tracking, tracking
from vitsem.platform.services import pretrain
from vitsem.platform.services.context import context
from vitsem.platform.settings import Settings
from vitsem.pretrain.loop import PretrainConfig
from vitsem.pretrain.maskers import MaskSpec
from vitsem.render.markdown import pretrain_markdown

MaskerName = Literal["random", "sift", "sift-hint", "kamim", "attmask"]
"""The registry's maskers (:data:`vitsem.pretrain.maskers.MASKERS`), as the form's choices."""


class PretrainParams(FlowParams):
    """What to pre-train on and how."""

    data: str = Field(description="Benchmark folder from `vitsem data make` (train/test).")
    masker: MaskerName = Field(default="sift", description=(
        "Which patches to mask: random (MAE), sift (by keypoint weight^alpha), sift-hint, "
        "kamim (random, keypoint-weighted loss), attmask (the encoder's most attended)."))
    weighting: Weighting = Field(default="count", description="Keypoint concentration.")
    alpha: float = Field(default=1.0, description="sift exponent: > 0 masks semantic "
                                                  "patches first, < 0 keeps them visible.")
    mask_ratio: float = Field(default=0.75, gt=0, lt=1,
                              description="Share of patches masked, in (0, 1).")
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    depth: int = Field(default=4, ge=1)
    limit: int | None = Field(default=None, ge=1, description="Training images at most.")
    seed: int = 0
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda:N.")
    model_name: str = Field(default="vitsem-mae-encoder",
                            description="Registered model name in MLflow.")
    alias: str = Field(default="pretrained", description="Alias of the registered version.")

    def config(self) -> PretrainConfig:
        return PretrainConfig(masker=self.masker, mask=MaskSpec(ratio=self.mask_ratio,
                                                                 alpha=self.alpha),
                              epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                              semantic=SemanticConfig(weighting=self.weighting),
                              depth=self.depth, seed=self.seed,
                              device=resolve_device(self.device))


@task(task_run_name=task_namer("pretrain"), **RETRYING_TASK)
def pretrain_task(settings: Settings, dataset_id: int, params: PretrainParams
                  ) -> pretrain.PretrainRun:
    """All epochs; a retry (or a rerun after a crash) resumes from the last stored epoch."""

    def log(run_id: str | None, record: dict[str, float]) -> str:
        return tracking.log_epoch(settings, run_id, params.model_dump(), record)

    return pretrain.pretrain_run(settings, dataset_id, params.data, params.config(),
                                 limit=params.limit, on_epoch=log)


@task(**RETRYING_TASK)
def register_encoder(settings: Settings, run: pretrain.PretrainRun, params: PretrainParams
                     ) -> tuple[str | None, str, bool]:
    """A rerun of a finished run finds its version by the weights' checksum: no duplicate."""
    return pretrain_tracking.register_encoder_once(settings, run.encoder_path,
                                                   params.model_name, params.alias,
                                                   run.mlflow_run_id)


@task(**RETRYING_TASK)
def log_curves(settings: Settings, run_id: str, run: pretrain.PretrainRun,
               params: PretrainParams) -> str:
    return pretrain_tracking.log_curves(settings, run_id, run.history,
                                        f"{params.masker}, run {run.run_key[:12]}")


@flow(task_runner=PerRunTaskRunner(), **flow_options("guided_pretrain"))
def guided_pretrain(params: PretrainParams, runner: RunnerParams | None = None
                   ) -> dict[str, Any]:
    """Pre-train a ViT encoder as a masked autoencoder with keypoint-guided masking."""
    settings = Settings()
    params.config().validate()  # bad settings fail before any work, and before any record
    with tracked(settings, "guided_pretrain", params) as run:
        data = str(Path(params.data).resolve())
        dataset_id = context(settings).meta.dataset(f"{data}#train", Path(data).name)
        result = pretrain_task(settings, dataset_id, params)
        mlflow_run_id, version, new = register_encoder(settings, result, params)
        run.mlflow_run_id = mlflow_run_id
        if mlflow_run_id is not None:
            log_curves(settings, mlflow_run_id, result, params)
        last = result.history[-1]
        run.summary = {
            "run_key": result.run_key, "epochs": len(result.history),
            "resumed_from_epoch": result.resumed_from, "epochs_run": result.epochs_run,
            "linear_probe": last.get("linear_probe"), "knn": last.get("knn"),
            "loss": last["loss"], "mlflow_run_id": run.mlflow_run_id,
            "registered": f"{params.model_name}@{params.alias} (version {version}"
                          f"{'' if new else ', already registered'})",
            "checkpoints": result.checkpoint_prefix}
        publish("guided-pretrain-summary", pretrain_markdown(params.model_dump(), run.summary,
                                                              result.history))
    return run.summary | {"history": result.history}
