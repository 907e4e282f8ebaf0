"""Commands that run the library on this machine, with no service: the benchmark, training,
SIFT and the analysis into a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from vitsem.cli.app import command, data_app, home
from vitsem.cli.console import console, print_profile, print_rejected, print_train_result, progress
from vitsem.method.concentration import Weighting

ModelOpt = Annotated[str | None, typer.Option(
    help="timm model name; with --checkpoint, the architecture of a plain weights file.")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    help="Weights: a vitsem .safetensors checkpoint, or a state_dict (.safetensors/.pt/.pth).")]
PretrainedOpt = Annotated[bool, typer.Option(help="Fetch timm's pretrained weights (network).")]
InputsArg = Annotated[list[Path] | None, typer.Argument(
    help="Image files or folders (default: the shipped benchmark's test split).")]
SplitOpt = Annotated[str, typer.Option(help="Benchmark split for benchmark folders.")]
WeightingOpt = Annotated[Weighting, typer.Option(help="Keypoint concentration per patch.")]


def default_model() -> tuple[Path, Path]:
    """The shipped benchmark and its tiny ViT under $VITSEM_HOME, made (with progress) once."""
    from vitsem.data.defaults import ensure_default_model

    bar = progress()
    task: list[Any] = []

    def on_train(ckpt: Path) -> Any:
        console.print(f"training the default tiny ViT (cached at {ckpt}) ...")
        bar.start()
        task.append(bar.add_task("training", total=None))

        def report(epoch: int, total: int, rec: dict[str, float]) -> None:
            bar.update(task[0], completed=epoch, total=total, description=(
                f"training: loss {rec['loss']:.3f}, test acc {rec['test_accuracy']:.3f}"))
        return report

    def on_trained(result: Any) -> None:
        bar.stop()
        print_train_result(result)
        console.print(f"trained in {result.seconds:.0f} s")

    return ensure_default_model(
        home(), on_generate=lambda d: console.print(f"generating the shortcut benchmark in {d}"),
        on_train=on_train, on_trained=on_trained)


def load(model: str | None, checkpoint: Path | None, pretrained: bool) -> Any:
    from vitsem.method.models import load_model

    if model is None and checkpoint is None:
        _, checkpoint = default_model()
    return load_model(model, checkpoint, pretrained=pretrained)


def inputs_of(inputs: list[Path] | None, split: str) -> Any:
    from vitsem.data.inputs import resolve_inputs

    if not inputs:
        inputs = [default_model()[0]]
    return resolve_inputs(inputs, split)


@command(data_app, "make")
def data_make(
    out: Annotated[Path, typer.Option(help="Folder to write the benchmark into.")],
    classes: Annotated[int, typer.Option(help="Number of object classes (2-6).")] = 3,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    n_train: Annotated[int, typer.Option(help="Training images.")] = 1500,
    n_test: Annotated[int, typer.Option(help="Test images.")] = 600,
    rho: Annotated[float, typer.Option(help="Shortcut-label agreement in training.")] = 0.95,
    glyph: Annotated[str, typer.Option(help="Shortcut glyph: checker, text, bullseye, none.")
                     ] = "checker",
    position: Annotated[Literal["fixed", "random"], typer.Option(help="Glyph position.")
                        ] = "fixed",
    test_mode: Annotated[Literal["decorrelated", "reversed"], typer.Option(
        help="How the test split treats the shortcut.")] = "decorrelated",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Generate the shortcut benchmark (images, masks, manifest.jsonl, dataset.json)."""
    from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset

    spec = ShortcutSpec(num_classes=classes, image_size=image_size, n_train=n_train,
                        n_test=n_test, rho=rho, glyph=glyph, position=position,
                        test_mode=test_mode, seed=seed)
    spec.validate()
    with console.status("rendering images"):
        root = make_shortcut_dataset(out, spec)
    console.print(f"wrote {n_train + n_test} images to [bold]{escape(str(root))}[/]")


@command()
def train(
    data: Annotated[Path, typer.Option(help="Benchmark folder from `vitsem data make`.")],
    out: Annotated[Path, typer.Option(help="Checkpoint to write (.safetensors).")],
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 8,
    depth: Annotated[int, typer.Option(help="Transformer blocks.")] = 6,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the tiny ViT (vit_tiny family, 64 px, 8 px patches) on the CPU."""
    from vitsem.data.train import TrainConfig, train_classifier

    with progress() as bar:
        task = bar.add_task("training", total=epochs)

        def report(epoch: int, total: int, rec: dict[str, float]) -> None:
            bar.update(task, completed=epoch, description=(
                f"training: loss {rec['loss']:.3f}, test acc {rec['test_accuracy']:.3f}"))

        result = train_classifier(data, out, TrainConfig(epochs=epochs, depth=depth, seed=seed),
                                  progress=report)
    print_train_result(result)
    console.print(f"checkpoint: [bold]{escape(str(out))}[/]")


@command()
def sift(
    inputs: InputsArg = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/sift"),
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    weighting: WeightingOpt = "count",
    split: SplitOpt = "test",
    workers: Annotated[int | None, typer.Option(help="Processes (default: all cores).")] = None,
) -> None:
    """SIFT keypoints on each image as the model sees it, and their patch concentration.

    Writes keypoints.parquet (one row per keypoint), images.parquet (per-image patch
    concentration) and rejected.jsonl (files skipped, with the reason)."""
    from vitsem.method.attention import token_layout
    from vitsem.method.keypoints import Rejected, sift_files
    from vitsem.method.view import ModelView
    from vitsem.render.files import KeypointTableWriter, write_rejected

    net, _spec = load(model, checkpoint, pretrained)
    found = inputs_of(inputs, split)
    files = found.paths
    view = ModelView.from_model(net)
    grid = token_layout(net, view.hw).grid
    out.mkdir(parents=True, exist_ok=True)
    writer = KeypointTableWriter(out, grid, weighting)
    rejected = list(found.rejected)
    with progress() as bar:
        task = bar.add_task("SIFT", total=len(files))
        for item in sift_files(files, view, workers=workers):
            bar.advance(task)
            if isinstance(item, Rejected):
                rejected.append(item)
            else:
                writer.add(item)
    writer.close()
    write_rejected(out / "rejected.jsonl", rejected)
    n, kps = writer.images, writer.keypoints
    console.print(f"{n} images, {kps} keypoints ({kps / max(n, 1):.1f} per image), "
                  f"{len(rejected)} rejected; grid {grid.grid_hw[0]}x{grid.grid_hw[1]} -> "
                  f"[bold]{escape(str(out))}[/]")
    print_rejected(rejected)


@command()
def analyze(
    inputs: InputsArg = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/analyze"),
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    weighting: WeightingOpt = "count",
    levels: Annotated[int, typer.Option(help="Concentration levels K.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Images per model batch.")] = 32,
    workers: Annotated[int | None, typer.Option(help="SIFT processes (default: all cores).")
                       ] = None,
    examples: Annotated[int, typer.Option(help="Images drawn as attention pictures.")] = 4,
    split: SplitOpt = "test",
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")
                      ] = "auto",
) -> None:
    """Weighted patch interrelation analysis of every layer and head.

    With no arguments: the shipped benchmark and a tiny ViT trained on it (made once, cached
    under $VITSEM_HOME, default ./vitsem-work). Writes stats.json, per_image.parquet,
    rejected.jsonl and PNG pictures to --out, and prints the semantic layer profile."""
    from vitsem.method.concentration import SemanticConfig
    from vitsem.method.models import resolve_device
    from vitsem.method.pipeline import AnalysisConfig, analyze_images
    from vitsem.paths import path_text
    from vitsem.render.files import PerImageWriter, stats_document, write_pictures, write_rejected

    cfg = AnalysisConfig(semantic=SemanticConfig(weighting=weighting, levels=levels),
                         batch_size=batch_size, workers=workers, num_examples=examples,
                         device=resolve_device(device))
    cfg.validate()
    net, spec = load(model, checkpoint, pretrained)
    found = inputs_of(inputs, split)
    names = spec.class_names or found.class_names
    out.mkdir(parents=True, exist_ok=True)
    writer = PerImageWriter(out / "per_image.parquet")
    with progress() as bar:
        task = bar.add_task("SIFT + attention analysis", total=len(found.items))
        result = analyze_images(net, found.paths, cfg, on_rows=writer,
                                progress=lambda n: bar.update(task, completed=n))
    writer.close()
    result.rejected = [*found.rejected, *result.rejected]  # entries that are not image files
    meta = {"model": spec.name, "model_kwargs": spec.kwargs,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "inputs": [path_text(p) for p in (inputs or [])]}
    (out / "stats.json").write_text(json.dumps(stats_document(result, meta), indent=1))
    write_rejected(out / "rejected.jsonl", result.rejected)
    pictures = write_pictures(result, out, names) if result.num_images else []
    print_profile(result.layer_profile())
    console.print(f"{result.num_images} images analysed, {len(result.rejected)} rejected; "
                  f"{result.num_layers} layers x {result.num_heads} heads; grid "
                  f"{result.layout.grid.grid_hw[0]}x{result.layout.grid.grid_hw[1]}")
    print_rejected(result.rejected)
    console.print(f"results in [bold]{escape(str(out))}[/]: stats.json, per_image.parquet, "
                  "rejected.jsonl, "
                  f"{len(pictures)} pictures")
