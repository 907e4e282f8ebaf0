"""``vitsem review``: a person's decisions on the patterns an audit confirmed. ``list`` shows
the last audit's confirmed findings of a model; ``record`` keeps a decision (shortcut /
legitimate) in SQL for the model family, and later audits of the family carry it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vitsem.audit.verdicts import VERDICTS, Decision, Verdict
from vitsem.cli.app import app, command
from vitsem.cli.console import console
from vitsem.cli.local import CheckpointOpt, ModelOpt, default_model

if TYPE_CHECKING:
    from vitsem.platform.storage.db import MetadataStore

review_app = typer.Typer(help="Review decisions on the patterns audits confirmed.",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")


def _meta() -> MetadataStore:
    from vitsem.platform.services.context import context
    from vitsem.platform.settings import Settings

    return context(Settings()).meta


@command(review_app, "list")
def review_list(
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    map_name: Annotated[str, typer.Option("--map", help="Attribution map.")] = "semantic",
) -> None:
    """The confirmed findings of the model's last audit, with the id to record a decision
    on. With no model: the shipped tiny ViT."""
    from vitsem.platform.services.context import load_model_cached
    from vitsem.platform.storage.reviews import last_findings

    if checkpoint is None and model is None:
        checkpoint = default_model()[1]
    loaded = load_model_cached(model, str(Path(checkpoint).resolve()) if checkpoint else None)
    rows = last_findings(_meta(), loaded.checksum, map_name)
    if not rows:
        console.print(f"no confirmed finding of the {escape(map_name)} map in the last audit "
                      f"of {escape(loaded.spec.name)}; run `vitsem audit` first")
        return
    table = Table(title=f"Confirmed findings, last audit of {escape(loaded.spec.name)} "
                        f"({rows[0].audit_digest[:12]})")
    for col in ("id", "rank", "class", "effect", "random", "verdict", "flag", "family"):
        table.add_column(col, justify="right" if col in ("id", "rank", "effect", "random")
                         else "left")
    for r in rows:
        ev = r.evidence
        table.add_row(str(r.id), str(r.rank), escape(r.class_name), f"{r.effect or 0:.3f}",
                      f"{r.random_effect or 0:.3f}",
                      escape(VERDICTS[Verdict(ev.get("verdict", "review"))].label),
                      escape(str(ev.get("flag") or "")), escape(str(ev.get("family", ""))))
    console.print(table)
    console.print("record a decision: vitsem review record ID --decision shortcut|legitimate "
                  "--reviewer NAME --note TEXT")


@command(review_app, "record")
def review_record(
    finding: Annotated[int, typer.Argument(help="Finding id (see `vitsem review list`).")],
    decision: Annotated[Decision, typer.Option(help="shortcut or legitimate.")],
    reviewer: Annotated[str, typer.Option(help="Who decides.")],
    note: Annotated[str, typer.Option(help="Why.")] = "",
    family: Annotated[str | None, typer.Option(
        help="Model family to record it for (default: the one the audit named).")] = None,
) -> None:
    """Record a decision on a confirmed finding; later audits of the family carry it."""
    from vitsem.platform.storage.reviews import record_review

    d = record_review(_meta(), finding, decision, reviewer, note, family)
    console.print(f"recorded: finding {finding} ({escape(d.key.class_name)}, pattern "
                  f"{d.key.signature}) is [bold]{d.decision.value}[/] for model family "
                  f"{escape(d.key.family)}, by {escape(d.reviewer)}")
