"""Guided pre-training flow: MAE with a keypoint-guided masker, per-epoch metrics to MLflow,
a checkpoint per epoch in the artifact store, the final encoder registered in MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from flows.common import RETRYING_TASK, finish_run, make_task_runner, start_run
from vitsem.platform import jobs, tracking
from vitsem.platform.settings import Settings
from vitsem.pretrain.loop import PretrainConfig
from vitsem.pretrain.maskers import MaskSpec


class PretrainParams(BaseModel):
    """What to pre-train on and how."""

    data: str = Field(description="Benchmark folder from `vitsem data make` (train/test).")
    masker: str = Field(default="sift", description="random, sift, sift-hint or kamim.")
    alpha: float = Field(default=1.0, description="sift exponent: > 0 masks semantic "
                                                  "patches first, < 0 keeps them visible.")
    mask_ratio: float = Field(default=0.75, description="Share of patches masked, in (0, 1).")
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    depth: int = Field(default=4, ge=1)
    limit: int | None = Field(default=None, ge=1, description="Training images at most.")
    seed: int = 0
    device: str = "cpu"
    model_name: str = Field(default="vitsem-mae-encoder",
                            description="Registered model name in MLflow.")
    alias: str = Field(default="pretrained", description="Alias of the registered version.")

    def config(self) -> PretrainConfig:
        return PretrainConfig(masker=self.masker, mask=MaskSpec(ratio=self.mask_ratio,
                                                                 alpha=self.alpha),
                              epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                              depth=self.depth, seed=self.seed, device=self.device)


@task(**RETRYING_TASK)
def pretrain_task(settings: Settings, dataset_id: int, params: PretrainParams) -> jobs.PretrainRun:
    """All epochs; a retry (or a rerun after a crash) resumes from the last stored epoch."""
    cfg = params.config()
    cfg.validate()

    def log(run_id: str | None, record: dict[str, float]) -> str:
        return tracking.log_epoch(settings, run_id, params.model_dump(), record)

    return jobs.pretrain_run(settings, dataset_id, params.data, cfg, limit=params.limit,
                             on_epoch=log)


@flow(name="guided_pretrain", task_runner=make_task_runner())
def guided_pretrain(params: PretrainParams) -> dict[str, Any]:
    """Pre-train a ViT encoder as a masked autoencoder with keypoint-guided masking."""
    settings = Settings()
    params.config().validate()  # bad settings fail before any work
    run_id = start_run(settings, "guided_pretrain", params.model_dump())
    try:
        ctx = jobs.context(settings)
        dataset_id = ctx.meta.dataset(f"{params.data}#train", params.data)
        run = pretrain_task(settings, dataset_id, params)
        last = run.history[-1]
        mlflow_run, version = tracking.register_checkpoint(
            settings, run.encoder_path, params.model_name, params.alias, {}, {},
            run_id=run.mlflow_run_id)
    except BaseException:
        finish_run(settings, run_id, {}, status="failed")
        raise
    summary = {"run_key": run.run_key, "epochs": len(run.history),
               "resumed_from_epoch": run.resumed_from, "epochs_run": run.epochs_run,
               "linear_probe": last.get("linear_probe"), "knn": last.get("knn"),
               "loss": last["loss"], "mlflow_run_id": mlflow_run,
               "registered": f"{params.model_name}@{params.alias} (version {version})",
               "checkpoints": run.checkpoint_prefix}
    lines = ["# Guided pre-training", "", f"masker `{params.masker}` (alpha {params.alpha}), "
             f"{params.epochs} epochs, resumed from epoch {run.resumed_from}", "",
             "| epoch | loss | linear probe | k-NN | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {int(r['epoch'])} | {r['loss']:.4f} | {r.get('linear_probe', float('nan')):.3f}"
              f" | {r.get('knn', float('nan')):.3f} | {r['epoch_seconds']:.1f} |"
              for r in run.history]
    lines += ["", f"Encoder registered as `{summary['registered']}`; MLflow run `{mlflow_run}`."]
    create_markdown_artifact(key="guided-pretrain-summary", markdown="\n".join(lines))
    finish_run(settings, run_id, summary, mlflow_run)
    return summary | {"history": run.history}
