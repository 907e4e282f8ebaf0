"""What the command line prints: progress bars and result tables (rich)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vitsem.audit.verdicts import Verdict
from vitsem.paths import path_text

console = Console()

_VERDICT_STYLE = {Verdict.SHORTCUT: "bold red", Verdict.REVIEWED_SHORTCUT: "bold red",
                  Verdict.REVIEW: "yellow", Verdict.ON_OBJECT: "yellow",
                  Verdict.REVIEWED_LEGITIMATE: "green", Verdict.NOT_CONFIRMED: "dim"}


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def print_train_result(result: Any) -> None:
    table = Table(title="tiny ViT on the shortcut benchmark")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("train accuracy", f"{result.train_accuracy:.3f}")
    table.add_row("test accuracy (decorrelated shortcut)", f"{result.test_accuracy:.3f}")
    table.add_row("test worst-group accuracy", f"{result.test_worst_group_accuracy:.3f}")
    for g, acc in result.test_group_accuracy.items():
        table.add_row(f"  group {escape(g)}", f"{acc:.3f}")
    console.print(table)


def print_profile(rows: Sequence[Mapping[str, float]]) -> None:
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


def print_audit(result: Mapping[str, Any]) -> None:
    """The audit's candidates and prompting outcomes as two tables."""
    table = Table(title="Candidate shortcuts (semantic map)")
    for col in ("rank", "class", "recurrence", "others", "effect", "random", "p", "verdict",
                "flag"):
        table.add_column(col, justify="right" if col not in ("class", "verdict", "flag")
                         else "left")
    for f in result["findings"].get("semantic", []):
        style = _VERDICT_STYLE[Verdict(f["verdict"])]
        table.add_row(str(f["rank"]), escape(f["class_name"]), f"{f['recurrence']:.2f}",
                      f"{f['other_rate']:.2f}", f"{f['effect']:.3f}",
                      f"{f['random_effect']:.3f}", f"{f['p_value']:.2g}",
                      f"[{style}]{escape(f['verdict_label'])}[/]",
                      escape(f.get("flag") or ""))
    console.print(table)
    prompts = Table(title="Prompting (tokens removed at inference)")
    for col in ("prompt", "accuracy", "worst group", "worst-group acc", "shortcut-free acc"):
        prompts.add_column(col, justify="left" if col in ("prompt", "worst group") else "right")
    for name, o in result["prompts"].items():
        clean = "n/a" if o["clean_accuracy"] is None else f"{o['clean_accuracy']:.3f}"
        prompts.add_row(escape(name), f"{o['accuracy']:.3f}", escape(o["worst_group"]),
                        f"{o['worst_group_accuracy']:.3f}", clean)
    console.print(prompts)
    if result.get("repairs"):
        repairs = Table(title="Repair (last layer retrained, group-balanced)")
        for col in ("method", "accuracy", "worst group", "worst-group acc", "gap closed"):
            repairs.add_column(col, justify="left" if col in ("method", "worst group")
                               else "right")
        for name, o in result["repairs"].items():
            gap = o["gap_closed"]
            repairs.add_row(escape(name), f"{o['accuracy']:.3f}", escape(o["worst_group"]),
                            f"{o['worst_group_accuracy']:.3f}",
                            "n/a" if gap is None or gap != gap else f"{gap:.2f}")
        console.print(repairs)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")


def print_pretrain(masker: str, history: Sequence[Mapping[str, float]]) -> None:
    table = Table(title=f"Pre-training ({masker})")
    for col in ("epoch", "loss", "linear probe", "k-NN", "seconds"):
        table.add_column(col, justify="right")
    for r in history:
        table.add_row(str(int(r["epoch"])), f"{r['loss']:.4f}",
                      f"{r.get('linear_probe', float('nan')):.3f}",
                      f"{r.get('knn', float('nan')):.3f}", f"{r['epoch_seconds']:.1f}")
    console.print(table)


def print_rejected(rejected: Sequence[Any], limit: int = 30) -> None:
    """The first ``limit`` skipped files with their reason (all are in rejected.jsonl)."""
    for r in rejected[:limit]:
        console.print(f"  [yellow]skipped[/] {escape(path_text(r.path))}: {escape(r.reason)}: "
                      f"{escape(r.detail)}")
    if len(rejected) > limit:
        console.print(f"  ... and {len(rejected) - limit} more (see rejected.jsonl)")
