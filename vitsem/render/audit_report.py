"""The audit report a person reads: PNG figures and one HTML page that links them."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vitsem.audit.pipeline import METHOD, AuditData, AuditResult, Finding
from vitsem.method.concentration import TokenGrid


def _outline(ax: Any, patches: np.ndarray, grid: TokenGrid, colour: str) -> None:
    _gh, gw = grid.grid_hw
    ph, pw = grid.patch_hw
    for idx in np.flatnonzero(patches):
        r, c = divmod(int(idx), gw)
        ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False,
                               edgecolor=colour, linewidth=1.4))


def finding_figure(result: AuditResult, data: AuditData, map_name: str, finding: Finding,
                   columns: int = 6) -> Figure:
    """Top row: the images that hold the finding most strongly, its patches outlined in red.
    Bottom row: the map's attribution over the same images."""
    m = result.maps[map_name]
    strength = (m.attribution * finding.patches).sum(1)
    order = [int(i) for i in np.argsort(-strength) if finding.patches[i].any()][:columns]
    cols = max(1, len(order))
    fig, axes = plt.subplots(2, cols, figsize=(1.8 * cols, 4.0), squeeze=False)
    gh, gw = result.grid.grid_hw
    ph, pw = result.grid.patch_hw
    for j, i in enumerate(order):
        ax = axes[0, j]
        ax.imshow(data.views[i])
        _outline(ax, finding.patches[i], result.grid, "#ff2020")
        ax.set_title(f"{result.class_names[int(result.labels[i])]} -> "
                     f"{result.class_names[int(result.predicted[i])]}", fontsize=7)
        heat = np.kron(m.attribution[i].reshape(gh, gw), np.ones((ph, pw)))
        axes[1, j].imshow(data.views[i])
        axes[1, j].imshow(heat, cmap="inferno", alpha=0.6)
        _outline(axes[1, j], finding.patches[i], result.grid, "#20ff60")
    for ax in axes.ravel():
        ax.axis("off")
    c = finding.causal
    fig.suptitle(
        f"{map_name} #{finding.rank}: class {finding.class_name}, in {finding.recurrence:.0%} "
        f"of its images, {finding.other_rate:.0%} of others; removal -{c.effect:.3f} vs "
        f"random -{c.random_effect:.3f} (p={c.p_value:.2g})", fontsize=8)
    fig.tight_layout()
    return fig


def prompting_figure(result: AuditResult) -> Figure:
    names = list(result.prompts)
    acc = [result.prompts[k].accuracy for k in names]
    worst = [result.prompts[k].worst_group_accuracy for k in names]
    clean = [result.prompts[k].clean_accuracy for k in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.2))
    ax.bar(x - 0.27, acc, 0.27, label="accuracy")
    ax.bar(x, worst, 0.27, label="worst-group accuracy")
    if all(c is not None for c in clean):
        ax.bar(x + 0.27, [float(c or 0) for c in clean], 0.27, label="shortcut-free images")
    ax.set_xticks(x, names, fontsize=7, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Prompting: accuracy with tokens removed", fontsize=9)
    fig.tight_layout()
    return fig


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    if v is None:
        return "n/a"
    return str(v)


def prompt_rows(result: AuditResult) -> list[dict[str, Any]]:
    return [{"prompt": k, "accuracy": v.accuracy, "worst_group": v.worst_group,
             "worst_group_accuracy": v.worst_group_accuracy,
             "shortcut_free_accuracy": v.clean_accuracy,
             "patches_removed_per_image": v.removed_per_image, "changed": v.changed}
            for k, v in result.prompts.items()]


def finding_rows(result: AuditResult) -> list[dict[str, Any]]:
    keys = ("rank", "class_name", "recurrence", "other_rate", "attention_lift", "on_object",
            "effect", "random_effect", "p_value", "confidence", "confirmed", "shortcut")
    return [{"map": name, **{k: f.summary()[k] for k in keys}}
            for name, m in result.maps.items() for f in m.findings]


def write_report(result: AuditResult, data: AuditData, out: Path, meta: dict[str, Any],
                 max_findings: int = 3) -> list[Path]:
    """Write ``audit.json``, ``images.jsonl``, PNG figures and ``report.html`` into ``out``;
    returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    doc = {"meta": meta, **result.summary()}
    (out / "audit.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    with (out / "images.jsonl").open("w") as fh:
        for row in result.image_rows(data.names):
            fh.write(json.dumps(row, default=_json_default) + "\n")
    files += [out / "audit.json", out / "images.jsonl"]
    sections: list[str] = []
    method = result.maps.get(METHOD)
    shown = (method.shortcuts or method.findings)[:max_findings] if method else []
    for f in shown:
        png = out / f"finding_{METHOD}_{f.rank}.png"
        fig = finding_figure(result, data, METHOD, f)
        fig.savefig(png, dpi=110)
        plt.close(fig)
        files.append(png)
        c = f.causal
        verdict = ("<b>confirmed shortcut</b>" if f.shortcut else "confirmed, on the object"
                   if c.confirmed else "not confirmed")
        sections.append(
            f"<h3>Candidate {f.rank}: class <code>{html.escape(f.class_name)}</code> "
            f"({verdict}, confidence {f.confidence:.3f})</h3>"
            f"<p>Recurs in {f.recurrence:.0%} of the images predicted "
            f"{html.escape(f.class_name)} and in {f.other_rate:.0%} of the others; attention "
            f"on its patches is {f.attention_lift:.2f}x uniform. Removing its tokens lowers the "
            f"class probability by {c.effect:.3f}, removing as many random patches by "
            f"{c.random_effect:.3f} (one-sided Wilcoxon p = {c.p_value:.3g}, "
            f"{c.images} images). Object coverage of its patches: {_fmt(f.on_object)}.</p>"
            f"<img src='{png.name}' alt='finding {f.rank}'>")
    png = out / "prompting.png"
    fig = prompting_figure(result)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    files.append(png)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    head = "".join(f"<li>{html.escape(str(k))}: <code>{html.escape(str(v))}</code></li>"
                   for k, v in meta.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vitsem audit</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:
collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px}}img{{max-width:100%}}
</style></head><body>
<h1>Spurious-correlation audit</h1>
<p>Status: <b>{html.escape(result.status)}</b>, {result.num_images} images.</p>
<ul>{head}</ul>{f"<ul>{notes}</ul>" if notes else ""}
<h2>Candidates of the semantic map</h2>{"".join(sections) or "<p>No candidate found.</p>"}
<h2>Prompting</h2><img src="prompting.png" alt="prompting">{_table(prompt_rows(result))}
<h2>Group accuracy with and without prompting</h2>{_table(_group_rows(result))}
<h2>Per class</h2>{_table(result.class_table())}
<h2>All candidates, every map</h2>{_table(finding_rows(result))}
</body></html>"""
    (out / "report.html").write_text(page)
    files.append(out / "report.html")
    return files


def _group_rows(result: AuditResult) -> list[dict[str, Any]]:
    groups = sorted(result.prompts["none"].group_accuracy)
    return [{"group": g, **{k: v.group_accuracy.get(g) for k, v in result.prompts.items()}}
            for g in groups]


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v))
