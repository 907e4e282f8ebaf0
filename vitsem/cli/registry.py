"""Commands on the MLflow model registry: register a checkpoint, compare a model's audits,
promote a challenger through the audit gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vitsem.cli.app import app, command
from vitsem.cli.console import console

model_app = typer.Typer(help="Registered models: register, promote, hold.", no_args_is_help=True)
app.add_typer(model_app, name="model")

NameArg = Annotated[str, typer.Argument(help="Registered model name.")]


def _client() -> object:
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import client_for

    return client_for(Settings())


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}"


@command(model_app, "register")
def register(
    checkpoint: Annotated[Path, typer.Argument(help="A vitsem .safetensors checkpoint.")],
    name: Annotated[str, typer.Option(help="Registered model name.")],
    alias: Annotated[str, typer.Option(help="Alias given to the new version.")] = "challenger",
) -> None:
    """Register a checkpoint as a new version of NAME (weights only, safetensors) and point
    ALIAS at it; the version is tagged with the weights' checksum, so audits of the file
    name the version."""
    from vitsem.errors import CheckpointError
    from vitsem.platform.registry import parse_model_uri
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import register_checkpoint

    parse_model_uri(f"models:/{name}@{alias}")  # validates both names
    if checkpoint.suffix.lower() != ".safetensors" or not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: not a .safetensors file; register vitsem "
                              "checkpoints (`vitsem train` writes them)")
    run_id, version = register_checkpoint(Settings(), checkpoint, name, alias,
                                          {"checkpoint": checkpoint.name}, {})
    console.print(f"registered {escape(name)} version {version} (run {run_id}); "
                  f"models:/{escape(name)}@{escape(alias)} resolves to it")


@command(model_app, "promote")
def promote(
    name: NameArg,
    challenger: Annotated[str, typer.Option(help="Alias of the candidate version.")] = "challenger",
    champion: Annotated[str, typer.Option(help="Alias the scheduled audit follows.")] = "champion",
    max_unreviewed: Annotated[int, typer.Option(
        min=0, help="Unreviewed (or reviewed-shortcut) patterns allowed.")] = 0,
    max_worst_group_drop: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Allowed fall of worst-group accuracy below the champion's.")
    ] = 0.0,
) -> None:
    """Promote CHALLENGER to CHAMPION when its latest audit confirms no unreviewed shortcut
    and its worst-group accuracy is not below the champion's; exit code 1 when refused."""
    from vitsem.platform.history import GateRule
    from vitsem.platform.history import promote as gate

    decision = gate(_client(), name, GateRule(max_unreviewed, max_worst_group_drop),
                    challenger, champion)
    verb = "[green]promoted[/]" if decision.promote else "[red]not promoted[/]"
    console.print(f"{escape(name)}@{escape(challenger)} {verb} to @{escape(champion)}")
    for reason in decision.reasons:
        console.print(f"  - {escape(reason)}")
    if not decision.promote:
        raise typer.Exit(code=1)


@command(model_app, "hold")
def hold(
    name: NameArg,
    reason: Annotated[str | None, typer.Option(help="Why promotions are held.")] = None,
    release: Annotated[bool, typer.Option(help="Release the hold.")] = False,
) -> None:
    """Hold promotions of NAME (what the audit-event automation does), or release the hold."""
    from vitsem.errors import ConfigError
    from vitsem.platform.history import set_hold

    if release == (reason is not None):
        raise ConfigError("give either --reason TEXT (hold) or --release")
    set_hold(_client(), name, None if release else reason)
    console.print(f"{escape(name)}: " + ("hold released" if release
                                         else f"promotions on hold ({escape(str(reason))})"))


@command()
def compare(
    name: NameArg,
    last: Annotated[int, typer.Option(min=1, max=200, help="How many audits.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Rows as JSON lines.")] = False,
) -> None:
    """The last audits of a registered model, newest first, with the change since the audit
    before each: worst-group accuracy, relied-on patterns, patterns that appeared or went."""
    from vitsem.platform.history import audit_history, changes

    rows = changes(audit_history(_client(), name, last))
    if not rows:
        console.print(f"no finished audit of registered model {escape(name)!r} yet; run "
                      f"`vitsem audit --checkpoint models:/{escape(name)}@champion`")
        return
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    table = Table(title=f"audits of {escape(name)} (newest first; MLflow runs "
                        f"{', '.join(r['run_id'][:8] for r in rows)})")
    for col in ("started (UTC)", "version", "data", "worst group", "change", "relied on",
                "unreviewed", "ABPC", "appeared", "gone"):
        table.add_column(col)
    for r in rows:
        wga = r["worst_group_accuracy"]
        table.add_row(
            r["started"], r["version"], r["data"], "" if wga is None else f"{wga:.3f}",
            _signed(r["worst_group_change"]),
            "" if r["relied_on"] is None else f"{r['relied_on']:.0f}",
            "" if r["unreviewed"] is None else f"{r['unreviewed']:.0f}",
            "" if r["abpc"] is None else f"{r['abpc']:.3f}",
            " ".join(r["appeared"]) or "-", " ".join(r["gone"]) or "-")
    console.print(table)
