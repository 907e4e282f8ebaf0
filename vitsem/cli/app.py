"""The ``vitsem`` command line: thin over the library."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vitsem.errors import VitsemError

# Prefect's ephemeral server writes telemetry to its SQLite file while flows start, which
# races with the flow's own writes ("database is locked" noise); the CLI needs none of it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral API starts a server process; on a busy 2-core machine it can need more than
# Prefect's default 20 s to answer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(help="Explain and audit Vision Transformers through SIFT keypoints.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="The shipped shortcut benchmark.", no_args_is_help=True)
app.add_typer(data_app, name="data")
db_app = typer.Typer(help="The metadata database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console()


def _home() -> Path:
    return Path(os.environ.get("VITSEM_HOME", "vitsem-work"))


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _fail(e: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {e}")
    return typer.Exit(code=2)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------


@data_app.command("make")
def data_make(
    out: Annotated[Path, typer.Option(help="Folder to write the benchmark into.")],
    classes: Annotated[int, typer.Option(help="Number of object classes (2-6).")] = 3,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    n_train: Annotated[int, typer.Option(help="Training images.")] = 1500,
    n_test: Annotated[int, typer.Option(help="Test images.")] = 600,
    rho: Annotated[float, typer.Option(help="Shortcut-label agreement in training.")] = 0.95,
    glyph: Annotated[str, typer.Option(help="Shortcut glyph: checker, text, bullseye, none.")
                     ] = "checker",
    position: Annotated[str, typer.Option(help="Glyph position: fixed or random.")] = "fixed",
    test_mode: Annotated[str, typer.Option(help="decorrelated or reversed.")] = "decorrelated",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Generate the shortcut benchmark (images, masks, manifest.jsonl, dataset.json)."""
    from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset

    spec = ShortcutSpec(num_classes=classes, image_size=image_size, n_train=n_train,
                        n_test=n_test, rho=rho, glyph=glyph, position=position,  # type: ignore[arg-type]
                        test_mode=test_mode, seed=seed)  # type: ignore[arg-type]
    try:
        with console.status("rendering images"):
            root = make_shortcut_dataset(out, spec)
    except (ValueError, VitsemError) as e:
        raise _fail(e) from e
    console.print(f"wrote {n_train + n_test} images to [bold]{root}[/]")


def ensure_default_model(home: Path | None = None) -> tuple[Path, Path]:
    """The embedded default: the shipped benchmark and a tiny ViT trained on it, both cached
    under ``$VITSEM_HOME`` by the hash of their settings, so each is made only once."""
    from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset
    from vitsem.data.train import TrainConfig

    home = home or _home()
    spec, cfg = ShortcutSpec(), TrainConfig()
    data_dir = home / "data" / f"shortcut-{_digest(asdict(spec))}"
    ckpt = home / "models" / f"tiny-vit-{_digest([asdict(spec), asdict(cfg)])}.safetensors"
    if not (data_dir / "dataset.json").is_file():
        with console.status(f"generating the shortcut benchmark in {data_dir}"):
            make_shortcut_dataset(data_dir, spec)
    if not ckpt.is_file():
        console.print(f"training the default tiny ViT (cached at {ckpt}) ...")
        result = _train_with_progress(data_dir, ckpt, cfg)
        console.print(f"trained in {result.seconds:.0f} s")
    return data_dir, ckpt


def _train_with_progress(data: Path, out: Path, cfg: Any) -> Any:
    from vitsem.data.train import train_classifier

    with _progress() as bar:
        task = bar.add_task("training", total=cfg.epochs)

        def report(epoch: int, total: int, rec: dict[str, float]) -> None:
            bar.update(task, completed=epoch, description=(
                f"training: loss {rec['loss']:.3f}, test acc {rec['test_accuracy']:.3f}"))

        result = train_classifier(data, out, cfg, progress=report)
    table = Table(title="tiny ViT on the shortcut benchmark")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("train accuracy", f"{result.train_accuracy:.3f}")
    table.add_row("test accuracy (decorrelated shortcut)", f"{result.test_accuracy:.3f}")
    table.add_row("test worst-group accuracy", f"{result.test_worst_group_accuracy:.3f}")
    for g, acc in result.test_group_accuracy.items():
        table.add_row(f"  group {g}", f"{acc:.3f}")
    console.print(table)
    return result


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Benchmark folder from `vitsem data make`.")],
    out: Annotated[Path, typer.Option(help="Checkpoint to write (.safetensors).")],
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 8,
    depth: Annotated[int, typer.Option(help="Transformer blocks.")] = 6,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the tiny ViT (vit_tiny family, 64 px, 8 px patches) on the CPU."""
    from vitsem.data.train import TrainConfig

    try:
        _train_with_progress(data, out, TrainConfig(epochs=epochs, depth=depth, seed=seed))
    except VitsemError as e:
        raise _fail(e) from e
    console.print(f"checkpoint: [bold]{out}[/]")


def _load(model: str | None, checkpoint: Path | None, pretrained: bool) -> Any:
    from vitsem.method.models import load_model

    if model is None and checkpoint is None:
        _, checkpoint = ensure_default_model()
    return load_model(model, checkpoint, pretrained=pretrained)


def _inputs(inputs: list[Path] | None, split: str) -> tuple[list[Path], list[str] | None]:
    """Files to analyse: folders expand to their images (a benchmark folder to its ``split``)."""
    from vitsem.data.shortcut import DATASET_INFO, ShortcutDataset
    from vitsem.method.images import list_images

    if not inputs:
        data_dir, _ = ensure_default_model()
        inputs = [data_dir]
    files: list[Path] = []
    names = None
    for p in inputs:
        if p.is_dir() and (p / DATASET_INFO).is_file():
            ds = ShortcutDataset.load(p)
            files.extend(ds.paths(split))
            names = ds.class_names
        elif p.is_dir():
            files.extend(list_images(p))
        elif p.exists():
            files.append(p)
        else:
            raise VitsemError(f"{p}: no such file or folder")
    return files, names


ModelOpt = Annotated[str | None, typer.Option(
    help="timm model name; with --checkpoint, the architecture of a plain weights file.")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    help="Weights: a vitsem .safetensors checkpoint, or a state_dict (.safetensors/.pt/.pth).")]
PretrainedOpt = Annotated[bool, typer.Option(help="Fetch timm's pretrained weights (network).")]
InputsArg = Annotated[list[Path] | None, typer.Argument(
    help="Image files or folders (default: the shipped benchmark's test split).")]


@app.command()
def sift(
    inputs: InputsArg = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/sift"),
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    weighting: Annotated[str, typer.Option(help="count, response or scale.")] = "count",
    split: Annotated[str, typer.Option(help="Benchmark split for benchmark folders.")] = "test",
    workers: Annotated[int | None, typer.Option(help="Processes (default: all cores).")] = None,
) -> None:
    """SIFT keypoints on each image as the model sees it, and their patch concentration.

    Writes keypoints.parquet (one row per keypoint), images.parquet (per-image patch
    concentration) and rejected.jsonl (files skipped, with the reason)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitsem.method.attention import token_layout
    from vitsem.method.concentration import concentration
    from vitsem.method.keypoints import Rejected, sift_files
    from vitsem.method.view import ModelView
    from vitsem.render.files import write_rejected

    try:
        net, _spec = _load(model, checkpoint, pretrained)
        files, _ = _inputs(inputs, split)
        view = ModelView.from_model(net)
        grid = token_layout(net, view.hw).grid
        out.mkdir(parents=True, exist_ok=True)
        kp_cols: dict[str, list[Any]] = {k: [] for k in
                                         ("path", "x", "y", "size", "angle", "response", "octave")}
        img_rows, rejected = [], []
        with _progress() as bar:
            task = bar.add_task("SIFT", total=len(files))
            for item in sift_files(files, view, workers=workers):
                bar.advance(task)
                if isinstance(item, Rejected):
                    rejected.append(item)
                    continue
                k = item.keypoints
                kp_cols["path"].append(np.full(len(k), item.path, dtype=object))
                kp_cols["x"].append(k.xy[:, 0])
                kp_cols["y"].append(k.xy[:, 1])
                for f in ("size", "angle", "response", "octave"):
                    kp_cols[f].append(getattr(k, f))
                c = concentration(k, grid, weighting)
                img_rows.append({"path": item.path, "num_keypoints": len(k),
                                 "semantic_patches": int((c > 0).sum()),
                                 "concentration": c.tolist()})
        table = pa.table({k: pa.array(np.concatenate(v) if v else []) for k, v in kp_cols.items()})
        pq.write_table(table, out / "keypoints.parquet")
        pq.write_table(pa.Table.from_pylist(img_rows) if img_rows else pa.table({}),
                       out / "images.parquet")
        write_rejected(out / "rejected.jsonl", rejected)
    except VitsemError as e:
        raise _fail(e) from e
    n = len(img_rows)
    kps = sum(r["num_keypoints"] for r in img_rows)
    console.print(f"{n} images, {kps} keypoints ({kps / max(n, 1):.1f} per image), "
                  f"{len(rejected)} rejected; grid {grid.grid_hw[0]}x{grid.grid_hw[1]} -> "
                  f"[bold]{out}[/]")
    for r in rejected:
        console.print(f"  [yellow]skipped[/] {r.path}: {r.reason}: {r.detail}")


def print_profile(rows: list[dict[str, float]]) -> None:
    table = Table(title="semantic layer profile (1 = uniform attention)")
    for col in ("layer", "lift", "lift 95% CI", "CLS focus", "focus 95% CI", "heads' lift",
                "n"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            f"{int(r['layer'])}",
            f"{r['semantic_lift']:.3f}",
            f"{r['semantic_lift_ci_low']:.3f}-{r['semantic_lift_ci_high']:.3f}",
            f"{r['cls_focus']:.3f}",
            f"{r['cls_focus_ci_low']:.3f}-{r['cls_focus_ci_high']:.3f}",
            f"{r['lift_min_head']:.2f}-{r['lift_max_head']:.2f}",
            f"{int(r['images'])}",
        )
    console.print(table)


@app.command()
def analyze(
    inputs: InputsArg = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/analyze"),
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    weighting: Annotated[str, typer.Option(help="count, response or scale.")] = "count",
    levels: Annotated[int, typer.Option(help="Concentration levels K.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Images per model batch.")] = 32,
    workers: Annotated[int | None, typer.Option(help="SIFT processes (default: all cores).")
                       ] = None,
    examples: Annotated[int, typer.Option(help="Images drawn as attention pictures.")] = 4,
    split: Annotated[str, typer.Option(help="Benchmark split for benchmark folders.")] = "test",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Weighted patch interrelation analysis of every layer and head.

    With no arguments: the shipped benchmark and a tiny ViT trained on it (made once, cached
    under $VITSEM_HOME, default ./vitsem-work). Writes stats.json, per_image.parquet,
    rejected.jsonl and PNG pictures to --out, and prints the semantic layer profile."""
    from vitsem.method.pipeline import AnalysisConfig, analyze_images
    from vitsem.render.files import PerImageWriter, stats_document, write_pictures, write_rejected

    try:
        net, spec = _load(model, checkpoint, pretrained)
        files, names = _inputs(inputs, split)
        names = spec.class_names or names
        out.mkdir(parents=True, exist_ok=True)
        cfg = AnalysisConfig(weighting=weighting, num_levels=levels, batch_size=batch_size,
                             workers=workers, num_examples=examples, device=device)
        writer = PerImageWriter(out / "per_image.parquet")
        with _progress() as bar:
            task = bar.add_task("SIFT + attention analysis", total=len(files))
            result = analyze_images(net, files, cfg, on_rows=writer,
                                    progress=lambda n: bar.update(task, completed=n))
        writer.close()
        meta = {"model": spec.name, "model_kwargs": spec.kwargs,
                "checkpoint": str(checkpoint) if checkpoint else None,
                "inputs": [str(p) for p in (inputs or [])]}
        (out / "stats.json").write_text(json.dumps(stats_document(result, meta), indent=1))
        write_rejected(out / "rejected.jsonl", result.rejected)
        pictures = write_pictures(result, out, names) if result.num_images else []
    except VitsemError as e:
        raise _fail(e) from e
    print_profile(result.layer_profile())
    console.print(f"{result.num_images} images analysed, {len(result.rejected)} rejected; "
                  f"{result.num_layers} layers x {result.num_heads} heads; grid "
                  f"{result.layout.grid.grid_hw[0]}x{result.layout.grid.grid_hw[1]}")
    for r in result.rejected:
        console.print(f"  [yellow]skipped[/] {r.path}: {r.reason}: {r.detail}")
    console.print(f"results in [bold]{out}[/]: stats.json, per_image.parquet, rejected.jsonl, "
                  f"{len(pictures)} pictures")


def print_audit(result: dict[str, Any]) -> None:
    """The audit's candidates and prompting outcomes as two tables."""
    table = Table(title="Candidate shortcuts (semantic map)")
    for col in ("rank", "class", "recurrence", "others", "effect", "random", "p", "verdict"):
        table.add_column(col, justify="right" if col not in ("class", "verdict") else "left")
    for f in result["findings"].get("semantic", []):
        verdict = "[bold red]shortcut[/]" if f["shortcut"] else (
            "object" if f["confirmed"] else "unconfirmed")
        table.add_row(str(f["rank"]), f["class_name"], f"{f['recurrence']:.2f}",
                      f"{f['other_rate']:.2f}", f"{f['effect']:.3f}",
                      f"{f['random_effect']:.3f}", f"{f['p_value']:.2g}", verdict)
    console.print(table)
    prompts = Table(title="Prompting (tokens removed at inference)")
    for col in ("prompt", "accuracy", "worst group", "worst-group acc", "shortcut-free acc"):
        prompts.add_column(col, justify="left" if col in ("prompt", "worst group") else "right")
    for name, o in result["prompts"].items():
        clean = "n/a" if o["clean_accuracy"] is None else f"{o['clean_accuracy']:.3f}"
        prompts.add_row(name, f"{o['accuracy']:.3f}", o["worst_group"],
                        f"{o['worst_group_accuracy']:.3f}", clean)
    console.print(prompts)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}")


@app.command()
def audit(
    data: Annotated[Path | None, typer.Argument(
        help="Benchmark folder, or a folder with one sub-folder per class.")] = None,
    out: Annotated[Path, typer.Option(help="Folder to copy the report into.")] = Path(
        "runs/audit"),
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    split: Annotated[str, typer.Option(help="Benchmark split for benchmark folders.")] = "test",
    top_fraction: Annotated[float, typer.Option(help="Share of patches counted as most "
                                                     "attended.")] = 0.1,
) -> None:
    """Spurious-correlation audit: candidate shortcuts, causal check, prompting.

    Runs the `spurious_audit` flow (stores, MLflow, Prefect artifacts on the configured
    services; embedded defaults otherwise) and copies report.html, its PNGs and the JSON
    results into --out. With no data: the shipped benchmark and its tiny ViT."""
    from flows.spurious_audit import AuditParams, spurious_audit

    try:
        params = audit_parameters(data, checkpoint, model)["params"]
        result = spurious_audit(AuditParams(**params, split=split, top_fraction=top_fraction))
    except VitsemError as e:
        raise _fail(e) from e
    print_audit(result)
    from vitsem.platform import jobs
    from vitsem.platform.settings import Settings

    store = jobs.context(Settings()).store
    prefix = f"reports/spurious_audit/{result['audit_digest']}"
    out.mkdir(parents=True, exist_ok=True)
    for name in json.loads(store.get(f"{prefix}/files.json")):
        (out / name).write_bytes(store.get(f"{prefix}/{name}"))
    console.print(f"{result['images']} images audited, {result['rejected']} rejected; "
                  f"report: [bold]{out / 'report.html'}[/] (stored at {result['report_uri']})")


@app.command()
def pretrain(
    data: Annotated[Path | None, typer.Argument(
        help="Benchmark folder (train split to pre-train on, test split for the probes).")
    ] = None,
    masker: Annotated[str, typer.Option(help="random, sift, sift-hint or kamim.")] = "sift",
    alpha: Annotated[float, typer.Option(help="sift exponent (< 0 keeps semantic patches "
                                              "visible).")] = 1.0,
    mask_ratio: Annotated[float, typer.Option(help="Share of patches masked.")] = 0.75,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 10,
    limit: Annotated[int | None, typer.Option(help="Training images at most.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Keypoint-guided MAE pre-training (the `guided_pretrain` flow).

    Per-epoch loss, linear-probe and k-NN accuracy to MLflow, a checkpoint per epoch in the
    artifact store (a rerun resumes from the last one), the encoder registered in MLflow.
    With no data: the shipped benchmark."""
    from flows.guided_pretrain import PretrainParams, guided_pretrain

    try:
        if data is None:
            data, _ = ensure_default_model()
        result = guided_pretrain(PretrainParams(
            data=str(Path(data).resolve()), masker=masker, alpha=alpha, mask_ratio=mask_ratio,
            epochs=epochs, limit=limit, seed=seed, device=device))
    except (VitsemError, ValueError) as e:
        raise _fail(e) from e
    table = Table(title=f"Pre-training ({masker})")
    for col in ("epoch", "loss", "linear probe", "k-NN", "seconds"):
        table.add_column(col, justify="right")
    for r in result["history"]:
        table.add_row(str(int(r["epoch"])), f"{r['loss']:.4f}",
                      f"{r.get('linear_probe', float('nan')):.3f}",
                      f"{r.get('knn', float('nan')):.3f}", f"{r['epoch_seconds']:.1f}")
    console.print(table)
    console.print(f"resumed from epoch {result['resumed_from_epoch']}; encoder registered as "
                  f"{result['registered']}; checkpoints under {result['checkpoints']}")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head"
               ) -> None:
    """Apply the schema migrations to VITSEM_DATABASE_URL (default: SQLite under home)."""
    from vitsem.platform.settings import Settings
    from vitsem.platform.storage.db import upgrade

    settings = Settings()
    try:
        upgrade(settings.resolved_database_url(), revision)
    except VitsemError as e:
        raise _fail(e) from e
    console.print(f"database at {settings.public_dict()['database_url']} is at {revision}")


@app.command("settings")
def show_settings() -> None:
    """Show the resolved settings (secrets redacted)."""
    from vitsem.platform.settings import Settings

    for key, value in Settings().public_dict().items():
        console.print(f"{key:22s} {value}")


AUDIT_CRON = "0 3 * * *"


def audit_parameters(data: Path | None, checkpoint: Path | None, model: str | None
                     ) -> dict[str, Any]:
    if data is None or (checkpoint is None and model is None):
        d, c = ensure_default_model()
        data, checkpoint = data or d, checkpoint or (c if model is None else None)
    return {"params": {"data": str(Path(data).resolve()), "model": model,
                       "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None}}


@app.command()
def serve(
    data: Annotated[Path | None, typer.Option(help="Data set the audit runs on.")] = None,
    checkpoint: CheckpointOpt = None,
    model: ModelOpt = None,
    cron: Annotated[str, typer.Option(help="Schedule of the model audit.")] = AUDIT_CRON,
) -> None:
    """Serve the flows as Prefect deployments (scheduled audit and on-demand runs).

    Serves `model_audit/scheduled-audit` on a cron schedule, plus `sift_extraction/on-demand`,
    `attention_analysis/on-demand`, `spurious_audit/on-demand` and
    `guided_pretrain/on-demand` to trigger from the Prefect UI or
    `prefect deployment run`. Needs PREFECT_API_URL (a Prefect server)."""
    from prefect import serve as prefect_serve

    from flows.attention_analysis import attention_analysis
    from flows.guided_pretrain import guided_pretrain
    from flows.model_audit import model_audit
    from flows.sift_extraction import sift_extraction
    from flows.spurious_audit import spurious_audit

    params = audit_parameters(data, checkpoint, model)
    deployments: list[Any] = [
        guided_pretrain.to_deployment(name="on-demand", parameters={
            "params": {"data": params["params"]["data"]}}),
        spurious_audit.to_deployment(name="on-demand", parameters=params),
        model_audit.to_deployment(name="scheduled-audit", cron=cron, parameters=params,
                                  description="Nightly audit of the configured model"),
        sift_extraction.to_deployment(name="on-demand", parameters=params),
        attention_analysis.to_deployment(name="on-demand", parameters=params),
    ]
    prefect_serve(*deployments)


@app.command()
def demo() -> None:
    """Run the whole pipeline through the flows on the embedded defaults.

    Benchmark data, a tiny ViT (trained once, registered in MLflow), SIFT extraction,
    attention analysis and the spurious-correlation audit; ends by printing where everything is."""
    import time

    from flows.attention_analysis import AnalysisParams
    from flows.model_audit import model_audit
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import register_checkpoint

    t0 = time.perf_counter()
    settings = Settings()
    try:
        data_dir, ckpt = ensure_default_model(settings.home)
        marker = ckpt.with_suffix(".registered")
        if not marker.exists():
            run_id, version = register_checkpoint(
                settings, ckpt, "vitsem-tiny-vit", "demo", {"checkpoint": ckpt.name}, {})
            marker.write_text(f"{run_id} {version}\n")
        result = model_audit(AnalysisParams(data=str(data_dir.resolve()),
                                            checkpoint=str(ckpt.resolve())))
    except VitsemError as e:
        raise _fail(e) from e
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
    api = os.environ.get("PREFECT_API_URL")
    if api:
        console.print(f"Prefect    {api} (flow runs model_audit, sift_extraction, "
                      "attention_analysis)")
    else:
        console.print("Prefect    runs used an ephemeral API; to keep and browse them:")
        console.print("  prefect server start   # then, in another shell:")
        console.print("  export PREFECT_API_URL=http://127.0.0.1:4200/api && vitsem demo")
    console.print("  vitsem serve           # scheduled audit + deployments to trigger in the UI")


if __name__ == "__main__":  # pragma: no cover
    app()
