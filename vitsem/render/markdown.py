"""Markdown summaries for Prefect artifacts. Every user-controlled string (file names, class
names, paths) is escaped, so it shows as text and cannot break a table or inject markup."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vitsem.audit.verdicts import relied_on

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>])")


def md_text(value: Any, limit: int = 200) -> str:
    """``value`` as inert Markdown text: HTML escaped, Markdown punctuation backslashed,
    newlines flattened, cut to ``limit`` characters."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def md_code(value: Any) -> str:
    """``value`` as inline code (backticks in it cannot close the span)."""
    text = " ".join(str(value).split()).replace("`", "'")
    return f"`{html.escape(text, quote=False)}`"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table; cells are escaped unless they are already formatted numbers."""
    lines = ["| " + " | ".join(md_text(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, _Raw) else md_text(c) for c in row) + " |"
              for row in rows]
    return lines


class _Raw(str):
    """A cell already in Markdown (numbers we formatted, bold verdicts)."""


def raw(text: str) -> _Raw:
    return _Raw(text)


def summary_markdown(title: str, counts: Mapping[str, Any],
                     rejected: Sequence[Mapping[str, str]], extra: str = "") -> str:
    """A run's counts and the files it rejected (first 50), then ``extra``."""
    lines = [f"# {md_text(title)}", ""]
    lines += md_table(["", ""], [(k, v) for k, v in counts.items()])
    if rejected:
        lines += ["", "## Rejected images", ""]
        lines += md_table(["file", "reason", "detail"],
                          [(Path(r["path"]).name, r["reason"], r["detail"][:120])
                           for r in rejected[:50]])
    return "\n".join(lines) + ("\n\n" + extra if extra else "")


def profile_markdown(profile: Sequence[Mapping[str, float]]) -> str:
    """The semantic layer profile as a table (1 = uniform attention)."""
    lines = ["## Semantic layer profile", ""]
    lines += md_table(["layer", "lift", "95% CI", "CLS focus"], [(
        raw(str(int(r["layer"]))), raw(f"{r['semantic_lift']:.3f}"),
        raw(f"{r['semantic_lift_ci_low']:.3f}-{r['semantic_lift_ci_high']:.3f}"),
        raw(f"{r['cls_focus']:.3f}")) for r in profile])
    return "\n".join(lines)


def findings_markdown(summary: Mapping[str, Any], report_uri: str, links: Sequence[str]
                      ) -> str:
    """The semantic map's candidates with their verdicts, the prompting outcomes, the
    audit's notes and where the report is."""
    lines = ["## Candidate shortcuts (semantic map)", ""]
    found = summary["findings"].get("semantic", [])
    if found:
        lines += md_table(
            ["rank", "class", "recurrence", "other classes", "removal effect", "random", "p",
             "verdict", "flag"],
            [(raw(str(f["rank"])), f["class_name"], raw(f"{f['recurrence']:.2f}"),
              raw(f"{f['other_rate']:.2f}"), raw(f"{f['effect']:.3f}"),
              raw(f"{f['random_effect']:.3f}"), raw(f"{f['p_value']:.2g}"),
              raw(f"**{md_text(f['verdict_label'])}**") if relied_on(f) else f["verdict_label"],
              f.get("flag") or "")
             for f in found])
    else:
        lines.append("No candidate found.")
    lines += ["", "## Prompting", ""]
    lines += md_table(["prompt", "accuracy", "worst group", "worst-group accuracy"], [
        (k, raw(f"{v['accuracy']:.3f}"), v["worst_group"], raw(f"{v['worst_group_accuracy']:.3f}"))
        for k, v in summary["prompts"].items()])
    if summary.get("repairs"):
        lines += ["", "## Repair (last layer, group-balanced)", ""]
        lines += md_table(["method", "accuracy", "worst-group accuracy", "gap closed"], [
            (k, raw(f"{v['accuracy']:.3f}"), raw(f"{v['worst_group_accuracy']:.3f}"),
             raw(_share(v.get("gap_closed")))) for k, v in summary["repairs"].items()])
    lines += [""] + [f"- {md_text(n, 400)}" for n in summary["notes"]]
    lines += [f"- cannot see: {md_text(b, 400)}" for b in summary.get("cannot_see", [])]
    lines += [f"- report: {md_code(report_uri)}"] + [f"- {line}" for line in links]
    return "\n".join(lines)


def _share(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{v:.2f}"


def model_audit_markdown(params: Mapping[str, Any], sift: Mapping[str, Any],
                         analysis: Mapping[str, Any], audit: Mapping[str, Any] | None) -> str:
    """The model audit in a few lines: what ran on what, and what each step found."""
    lift = [round(r["semantic_lift"], 3) for r in analysis["layer_profile"]]
    if audit is not None:
        audit_line = (f"- shortcut audit: {audit['shortcuts']} confirmed shortcut(s), "
                      f"{audit.get('flagged', 0)} flagged (new or regressed since review), "
                      f"status {md_text(audit['status'])}; report {md_code(audit['report_uri'])}")
    else:
        audit_line = ("- shortcut audit: skipped, the data carry no labels (use a benchmark "
                      "folder or one sub-folder per class)")
    return "\n".join([
        "# Model audit",
        f"- model: {md_code(params.get('checkpoint') or params.get('model'))}",
        f"- data: {md_code(params['data'])} (split {md_text(params.get('split'))})",
        f"- SIFT: {sift['computed']} computed, {sift['cached']} from the store, "
        f"{sift['rejected']} rejected",
        f"- analysis: {analysis['images']} images, MLflow run {md_code(analysis['mlflow_run_id'])}",
        f"- semantic lift by layer: {lift}",
        audit_line,
    ])


def pretrain_markdown(params: Mapping[str, Any], summary: Mapping[str, Any],
                      history: Sequence[Mapping[str, float]]) -> str:
    """A pre-training run: its settings, the per-epoch curve and where the encoder went."""
    nan = float("nan")
    lines = ["# Guided pre-training", "",
             f"masker {md_code(params['masker'])} (alpha {params['alpha']}), "
             f"{params['epochs']} epochs, resumed from epoch {summary['resumed_from_epoch']}", ""]
    lines += md_table(["epoch", "loss", "linear probe", "k-NN", "seconds"], [(
        raw(str(int(r["epoch"]))), raw(f"{r['loss']:.4f}"),
        raw(f"{r.get('linear_probe', nan):.3f}"), raw(f"{r.get('knn', nan):.3f}"),
        raw(f"{r['epoch_seconds']:.1f}")) for r in history])
    lines += ["", f"Encoder registered as {md_code(summary['registered'])}; MLflow run "
              f"{md_code(summary['mlflow_run_id'])}."]
    return "\n".join(lines)
