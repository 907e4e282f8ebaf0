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
from vitsem.audit.verdicts import BLIND_SPOTS, VERDICTS, Verdict
from vitsem.method.concentration import TokenGrid

# File and class names are drawn as text: "$...$" in a name must not parse as math.
matplotlib.rcParams["text.parse_math"] = False


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


def faithfulness_figure(result: AuditResult) -> Figure:
    """Left: every map's deletion curves (solid: most relevant first, dashed: least
    relevant first). Right: ABPC per map with its 95% interval."""
    names = list(result.faithfulness)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(names):
        f = result.faithfulness[name]
        c = colours[k % len(colours)]
        ax.plot(f.fractions, f.morf, "-", color=c, label=name)
        ax.plot(f.fractions, f.lerf, "--", color=c)
    ax.set_xlabel("share of patch tokens removed")
    ax.set_ylabel("probability of the predicted class")
    ax.set_title("Deletion curves (solid: most relevant first, dashed: least)", fontsize=9)
    ax.legend(fontsize=7)
    abpc = [result.faithfulness[k].abpc for k in names]
    err = np.array([[a - result.faithfulness[k].abpc_ci[0], result.faithfulness[k].abpc_ci[1]
                     - a] for k, a in zip(names, abpc, strict=True)]).T
    bx.bar(np.arange(len(names)), abpc, yerr=np.nan_to_num(err), color=colours[:len(names)])
    bx.set_xticks(np.arange(len(names)), names, fontsize=7, rotation=20)
    bx.set_ylabel("ABPC (higher: more faithful)")
    bx.set_title("Area between the curves, 95% interval", fontsize=9)
    fig.tight_layout()
    return fig


def repair_figure(result: AuditResult) -> Figure:
    """Accuracy and worst-group accuracy of the unrepaired model (floor), each last-layer
    repair, and each prompt, side by side."""
    rows = [(k, v.accuracy, v.worst_group_accuracy) for k, v in result.repairs.items()]
    rows += [(f"prompt {k}", v.accuracy, v.worst_group_accuracy)
             for k, v in result.prompts.items() if k.startswith("drop:")]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.2))
    ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label="accuracy")
    ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label="worst-group accuracy")
    ax.set_xticks(x, [r[0] for r in rows], fontsize=7, rotation=25)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Repair (last layer, group-balanced) and prompting", fontsize=9)
    fig.tight_layout()
    return fig


def faithfulness_rows(result: AuditResult) -> list[dict[str, Any]]:
    return [{"map": k, "abpc": v.abpc, "abpc_low": v.abpc_ci[0], "abpc_high": v.abpc_ci[1],
             "images": v.images} for k, v in result.faithfulness.items()]


def repair_rows(result: AuditResult) -> list[dict[str, Any]]:
    return [{"method": k, "accuracy": v.accuracy, "worst_group": v.worst_group,
             "worst_group_accuracy": v.worst_group_accuracy, "gap_closed": v.gap_closed,
             "fitted_on": ", ".join(f"{g}: {n}" for g, n in v.fit_groups.items()) or "-"}
            for k, v in result.repairs.items()]


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
            "effect", "random_effect", "p_value", "confidence", "seed_patches_per_image",
            "patches_per_image", "verdict_label", "flag")
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
    # Relied-on and reviewed findings (a reviewed one stays visible with its decision).
    shown = ([f for f in method.findings if f.relied_on or f.review is not None]
             or method.findings)[:max_findings] if method else []
    for f in shown:
        png = out / f"finding_{METHOD}_{f.rank}.png"
        fig = finding_figure(result, data, METHOD, f)
        fig.savefig(png, dpi=110)
        plt.close(fig)
        files.append(png)
        c = f.causal
        info = VERDICTS[f.verdict]
        verdict = (f"<b>{html.escape(info.label)}</b>" if info.relied_on
                   else html.escape(info.label))
        sections.append(
            f"<h3>Candidate {f.rank}: class <code>{html.escape(f.class_name)}</code> "
            f"({verdict}, confidence {f.confidence:.3f})</h3>"
            f"<p>Recurs in {f.recurrence:.0%} of the images predicted "
            f"{html.escape(f.class_name)} and in {f.other_rate:.0%} of the others; attention "
            f"on its patches is {f.attention_lift:.2f}x uniform. Removing its tokens lowers the "
            f"class probability by {c.effect:.3f}, removing as many random patches by "
            f"{c.random_effect:.3f} (one-sided Wilcoxon p = {c.p_value:.3g}, "
            f"{c.images} images). It was found on {f._per_image(f.seed_patches):.1f} keypoint "
            f"patches per image and grown to {f._per_image(f.patches):.1f} "
            f"({f.growth_levels} growth steps) to cover what the model uses. Object coverage "
            f"of its patches: {_fmt(f.on_object)}. <em>{html.escape(info.meaning)}</em>."
            f"{_review_text(f)}</p>"
            f"<img src='{png.name}' alt='finding {f.rank}'>")
    png = out / "prompting.png"
    fig = prompting_figure(result)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    files.append(png)
    extra = ""
    if result.faithfulness:
        png = out / "faithfulness.png"
        fig = faithfulness_figure(result)
        fig.savefig(png, dpi=110)
        plt.close(fig)
        files.append(png)
        extra += ("<h2>Faithfulness of each map</h2><p>Patch tokens are removed from the "
                  "sequence in the map's order; ABPC is the mean gap between removing the "
                  "least and the most relevant first.</p><img src='faithfulness.png' "
                  f"alt='faithfulness'>{_table(faithfulness_rows(result))}")
    if result.repairs:
        png = out / "repairs.png"
        fig = repair_figure(result)
        fig.savefig(png, dpi=110)
        plt.close(fig)
        files.append(png)
        extra += ("<h2>Repair</h2><p>The last layer retrained group-balanced on held-out "
                  "images: <code>dfr:pseudo</code> on groups from the audit's findings (no "
                  "annotation), <code>dfr:oracle</code> on the true groups, "
                  "<code>dfr:class</code> class-balanced without groups; gap closed = share "
                  "of the unrepaired -> oracle worst-group gap.</p><img src='repairs.png' "
                  f"alt='repairs'>{_table(repair_rows(result))}{_reaudit_text(result)}")
    blind = "".join(f"<li>{html.escape(b)}</li>" for b in BLIND_SPOTS)
    extra += f"<h2>What this method cannot see</h2><ul>{blind}</ul>"
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
{extra}
<h2>Per class</h2>{_table(result.class_table())}
<h2>All candidates, every map</h2>{_table(finding_rows(result))}
</body></html>"""
    (out / "report.html").write_text(page)
    files.append(out / "report.html")
    return files


def _review_text(f: Finding) -> str:
    """The carried review decision and the flag of a finding, as a sentence."""
    parts = []
    if f.review is not None:
        r = f.review
        parts.append(f" Reviewed as <b>{html.escape(r.decision.value)}</b> by "
                     f"{html.escape(r.reviewer)} ({html.escape(r.decided_at[:10])}"
                     f"{': ' + html.escape(r.note) if r.note else ''}).")
    if f.flag == "new":
        parts.append(" <b>Flagged: new</b> (never reviewed).")
    elif f.flag == "regressed":
        parts.append(" <b>Flagged: regressed</b> (relied on more than when reviewed).")
    return "".join(parts)


def _reaudit_text(result: AuditResult) -> str:
    """The repaired model audited again: its accuracy and what it still relies on."""
    r = result.reaudit
    if not r:
        return ""
    none = r["prompts"]["none"]
    relied = [f for f in r["findings"] if VERDICTS[Verdict(f["verdict"])].relied_on]
    found = "; ".join(f"class {f['class_name']}: removal -{f['effect']:.3f} vs random "
                      f"-{f['random_effect']:.3f}" for f in relied) or "no confirmed pattern"
    return (f"<p>Re-audit of <code>{html.escape(r['method'])}</code> ({html.escape(r['map'])}"
            f" map): accuracy {none['accuracy']:.3f}, worst-group accuracy "
            f"{none['worst_group_accuracy']:.3f} ({html.escape(none['worst_group'])}); "
            f"relied on: {html.escape(found)}.</p>")


def _group_rows(result: AuditResult) -> list[dict[str, Any]]:
    groups = sorted(result.prompts["none"].group_accuracy)
    return [{"group": g, **{k: v.group_accuracy.get(g) for k, v in result.prompts.items()}}
            for g in groups]


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v))
