"""Commands that run through the platform: the Prefect flows on the configured services (the
embedded defaults otherwise), deployments, the database and the settings."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.markup import escape

from vitsem.audit.maps import MAPS
from vitsem.cli.app import command, db_app
from vitsem.cli.console import (
    console,
    print_audit,
    print_pretrain,
    print_profile,
    print_rejected,
)
from vitsem.cli.local import ModelOpt, SplitOpt, default_model
from vitsem.pretrain.maskers import MASKERS

if TYPE_CHECKING:
    from flows.runners import RunnerParams

AUDIT_CRON = "0 3 * * *"
DEMO_MODEL = "vitsem-tiny-vit"

CheckpointOpt = Annotated[str | None, typer.Option(
    help="Weights: a registered version models:/<name>@<alias> (or models:/<name>/<version>), "
         "a vitsem .safetensors checkpoint, or a state_dict (.safetensors/.pt/.pth).")]

RunnerOpt = Annotated[Literal["thread", "dask"] | None, typer.Option(
    help="Where the flow's tasks run: thread, or dask (a LocalCluster the run starts, or "
         "--dask-address). Default: VITSEM_TASK_RUNNER.")]
DaskAddressOpt = Annotated[str | None, typer.Option(
    help="Scheduler of a running Dask cluster, tcp://host:8786 (implies --runner dask).")]


def runner_params(runner: Literal["thread", "dask"] | None, dask_address: str | None
                  ) -> RunnerParams | None:
    """The flow's ``runner`` parameter from the command's options (None: the settings')."""
    from flows.runners import RunnerParams
    from vitsem.errors import ConfigError

    if dask_address and runner == "thread":
        raise ConfigError("--dask-address needs --runner dask (or no --runner), not thread")
    if runner is None and dask_address is None:
        return None
    return RunnerParams(kind="dask" if dask_address else runner, address=dask_address)


def data_and_model(data: Path | None, checkpoint: str | Path | None, model: str | None
                   ) -> dict[str, Any]:
    """Flow parameters naming the data and the model (the shipped default for what is not
    given); a ``models:/`` reference is kept for the flow to resolve through the registry."""
    from vitsem.platform.registry import is_model_uri, parse_model_uri

    if data is None or (checkpoint is None and model is None):
        d, c = default_model()
        data, checkpoint = data or d, checkpoint or (c if model is None else None)
    if checkpoint is not None and is_model_uri(str(checkpoint)):
        parse_model_uri(str(checkpoint))  # a malformed reference fails here, not in the flow
        weights: str | None = str(checkpoint)
    else:
        weights = str(Path(checkpoint).resolve()) if checkpoint else None
    return {"data": str(Path(data).resolve()), "model": model, "checkpoint": weights}


@command()
def audit(
    data: Annotated[Path | None, typer.Argument(
        help="Benchmark folder, or a folder with one sub-folder per class.")] = None,
    out: Annotated[Path, typer.Option(help="Folder to copy the report into.")] = Path(
        "runs/audit"),
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    split: SplitOpt = "test",
    top_fraction: Annotated[float, typer.Option(help="Share of patches counted as most "
                                                     "attended, in (0, 1].")] = 0.1,
    repair_holdout: Annotated[float, typer.Option(help=(
        "Share of each group's images held out to repair the last layer from the findings "
        "(registered in MLflow as a new model version); 0: no repair."))] = 0.0,
    family: Annotated[str | None, typer.Option(help=(
        "Model family whose review decisions carry (default: the model's name)."))] = None,
    maps: Annotated[list[str] | None, typer.Option("--map", help=(
        "Attribution map to audit with, repeatable: " + ", ".join(MAPS) + " (default: "
        "every map but occlusion)."))] = None,
    runner: RunnerOpt = None,
    dask_address: DaskAddressOpt = None,
) -> None:
    """Spurious-correlation audit: candidate shortcuts, causal check, prompting.

    Runs the `spurious_audit` flow (stores, MLflow, Prefect artifacts on the configured
    services; embedded defaults otherwise) and copies report.html, its PNGs and the JSON
    results into --out. With no data: the shipped benchmark and its tiny ViT."""
    from flows.spurious_audit import AuditParams, spurious_audit
    from vitsem.method.keypoints import Rejected
    from vitsem.paths import path_from_text
    from vitsem.platform.services.audit import REPORT_PREFIX, copy_report
    from vitsem.platform.services.context import context
    from vitsem.platform.settings import Settings
    from vitsem.render.files import write_rejected

    params = AuditParams(**data_and_model(data, checkpoint, model), split=split,
                         top_fraction=top_fraction, repair_holdout=repair_holdout,
                         family=family, maps=maps or None)
    result = spurious_audit(params, runner=runner_params(runner, dask_address))
    print_audit(result)
    copy_report(context(Settings()).store, f"{REPORT_PREFIX}/{result['audit_digest']}", out)
    rejected = [Rejected(path_from_text(r["path"]), r["reason"], r["detail"])
                for r in result["rejected_files"]]
    write_rejected(out / "rejected.jsonl", rejected)
    print_rejected(rejected)
    console.print(f"{result['images']} images audited, {result['rejected']} rejected; "
                  f"report: [bold]{escape(str(out / 'report.html'))}[/] "
                  f"(stored at {escape(result['report_uri'])})")


@command()
def pretrain(
    data: Annotated[Path | None, typer.Argument(
        help="Benchmark folder (train split to pre-train on, test split for the probes).")
    ] = None,
    masker: Annotated[str, typer.Option(help=", ".join(MASKERS) + ".")] = "sift",
    alpha: Annotated[float, typer.Option(help="sift exponent (< 0 keeps semantic patches "
                                              "visible).")] = 1.0,
    mask_ratio: Annotated[float, typer.Option(help="Share of patches masked.")] = 0.75,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 10,
    limit: Annotated[int | None, typer.Option(help="Training images at most.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")
                      ] = "auto",
    runner: RunnerOpt = None,
    dask_address: DaskAddressOpt = None,
) -> None:
    """Keypoint-guided MAE pre-training (the `guided_pretrain` flow).

    Per-epoch loss, linear-probe and k-NN accuracy to MLflow, a checkpoint per epoch in the
    artifact store (a rerun resumes from the last one), the encoder registered in MLflow.
    With no data: the shipped benchmark."""
    from flows.guided_pretrain import PretrainParams, guided_pretrain

    params = PretrainParams(data=str(Path(data or default_model()[0]).resolve()),
                            masker=masker, alpha=alpha,  # type: ignore[arg-type]
                            mask_ratio=mask_ratio, epochs=epochs, limit=limit, seed=seed,
                            device=device)
    result = guided_pretrain(params, runner=runner_params(runner, dask_address))
    print_pretrain(masker, result["history"])
    console.print(f"resumed from epoch {result['resumed_from_epoch']}; encoder registered as "
                  f"{result['registered']}; checkpoints under {result['checkpoints']}")


@command(db_app, "upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head"
               ) -> None:
    """Apply the schema migrations to VITSEM_DATABASE_URL (default: SQLite under home)."""
    from vitsem.platform.settings import Settings
    from vitsem.platform.storage.db import upgrade

    settings = Settings()
    upgrade(settings.resolved_database_url(), revision)
    console.print(f"database at {settings.public_dict()['database_url']} is at {revision}")


@command(db_app, "housekeeping")
def db_housekeeping(
    stale_after: Annotated[float, typer.Option(
        help="Seconds without a heartbeat after which a running run is taken for crashed.")
    ] = 600.0,
    older_than: Annotated[float, typer.Option(
        help="Seconds after which a temporary file of an unfinished write is removed.")
    ] = 3600.0,
) -> None:
    """Mark runs whose process died (SIGKILL, out of memory) as crashed and remove the
    temporary files killed writes left behind."""
    from vitsem.platform.housekeeping import housekeeping
    from vitsem.platform.settings import Settings

    done = housekeeping(Settings(), stale_after, older_than)
    ids = f" ({', '.join(map(str, done.crashed_runs))})" if done.crashed_runs else ""
    console.print(f"{len(done.crashed_runs)} run(s) marked crashed{ids}; "
                  f"{len(done.removed)} stale temporary file(s) removed")


@command(name="settings")
def show_settings() -> None:
    """Show the resolved settings (secrets redacted)."""
    from vitsem.platform.settings import Settings

    for key, value in Settings().public_dict().items():
        console.print(f"{key:22s} {value}")


@command()
def serve(
    data: Annotated[Path | None, typer.Option(help="Data set the deployments run on.")] = None,
    checkpoint: CheckpointOpt = None,
    model: ModelOpt = None,
    cron: Annotated[str | None, typer.Option(
        help="Schedule of the scheduled audit; default: prefect.yaml's.")] = None,
) -> None:
    """Serve the deployments of prefect.yaml without a work pool (local development).

    prefect.yaml is the one source of the deployments (`prefect deploy --all` for
    production workers): the scheduled `model_audit/scheduled-audit` and the on-demand
    `sift_extraction/sift-on-demand`, `attention_analysis/analysis-on-demand`,
    `spurious_audit/audit-on-demand`, `guided_pretrain/pretrain-on-demand`, to trigger from
    the Prefect UI or `prefect deployment run`, with --data/--model/--checkpoint replacing
    the file's paths. Needs PREFECT_API_URL (a Prefect server)."""
    from flows.deployments import runner_deployments

    serve_until_terminated(runner_deployments(data_and_model(data, checkpoint, model), cron))


SERVE_GRACE_SECONDS = 8.0
"""How long `vitsem serve` may take to stop after SIGTERM (its flow runs get
``SHUTDOWN_GRACE_SECONDS`` of it): under 10 s, also while the Prefect API is unreachable."""


def serve_until_terminated(deployments: list[Any]) -> None:
    """Serve ``deployments`` with Prefect's runner until SIGTERM or Ctrl-C. On SIGTERM the
    runner's own graceful stop (cancel runs, pause schedules: API calls) is bounded: the
    flow-run processes are told to stop at once and the process exits after
    ``SERVE_GRACE_SECONDS`` whatever is still waiting on the API."""
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    from vitsem.platform.shutdown import exit_within, terminate_children

    class BoundedRunner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            exit_within(SERVE_GRACE_SECONDS)
            terminate_children()
            super().handle_sigterm(*args, **kwargs)

    runner = BoundedRunner(pause_on_shutdown=True)
    for deployment in deployments:
        runner.add_deployment(deployment)
    console.print("Serving " + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments))
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as e:
        console.print(f"{type(e).__name__}: stopped")


@command()
def demo(runner: RunnerOpt = None, dask_address: DaskAddressOpt = None) -> None:
    """Run the whole pipeline through the flows on the embedded defaults.

    Benchmark data, a tiny ViT (trained once, registered in MLflow), SIFT extraction,
    attention analysis and the spurious-correlation audit; ends by printing where everything is."""
    from flows.model_audit import ModelAuditParams, model_audit
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import register_checkpoint

    t0 = time.perf_counter()
    settings = Settings()
    data_dir, ckpt = default_model()
    marker = ckpt.with_suffix(".registered-champion")
    if not marker.exists():
        run_id, version = register_checkpoint(
            settings, ckpt, DEMO_MODEL, "champion", {"checkpoint": ckpt.name}, {})
        marker.write_text(f"{run_id} {version}\n")
    result = model_audit(ModelAuditParams(data=str(data_dir.resolve()),
                                          checkpoint=f"models:/{DEMO_MODEL}@champion"),
                         runner=runner_params(runner, dask_address))
    analysis = result["attention_analysis"]
    print_profile(analysis["layer_profile"])
    if result.get("spurious_audit"):
        print_audit(result["spurious_audit"])
    pub = settings.public_dict()
    sift = result["sift_extraction"]
    console.print(f"\nSIFT: {sift['computed']} images computed, {sift['cached']} found in the "
                  f"store, {sift['rejected']} rejected. Analysis: {analysis['images']} images.")
    console.print(f"finished in {time.perf_counter() - t0:.0f} s\n")
    console.print(f"artifacts  {pub['artifact_uri']}")
    console.print(f"metadata   {pub['database_url']}")
    console.print(f"MLflow     {pub['mlflow_tracking_uri']} (run {analysis['mlflow_run_id']})")
    if result.get("spurious_audit"):
        console.print(f"audit      {result['spurious_audit']['report_uri']}")
    console.print(f"  open it: mlflow ui --backend-store-uri {pub['mlflow_tracking_uri']}")
    console.print(f"  compare: vitsem compare {DEMO_MODEL}")
    api = os.environ.get("PREFECT_API_URL")
    if api:
        console.print(f"Prefect    {api} (flow runs model_audit, sift_extraction, "
                      "attention_analysis, spurious_audit)")
    else:
        console.print("Prefect    runs used an ephemeral API; to keep and browse them:")
        console.print("  prefect server start   # then, in another shell:")
        console.print("  export PREFECT_API_URL=http://127.0.0.1:4200/api && vitsem demo")
    console.print("  vitsem serve           # scheduled audit + deployments to trigger in the UI")
