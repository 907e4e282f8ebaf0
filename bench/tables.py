"""Tables of ``bench_audit.py`` rows: every figure with a 95% interval (Wilson for shares,
normal approximation for means over runs), met or not against the issue's targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

RELIES = 0.1
Row = dict[str, Any]


def wilson(k: int, n: int) -> str:
    if n == 0:
        return "n/a (0 runs)"
    p = k / n
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{k}/{n} = {p:.2f} [{centre - half:.2f}, {centre + half:.2f}]"


def mean_ci(values: list[Any]) -> str:
    v = np.array([float(x) for x in values if x is not None and x == x])
    if not len(v):
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.3f} (1 run)"
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.3f} [{v.mean() - half:.3f}, {v.mean() + half:.3f}] (n={len(v)})"


def _select(rows: list[Row], **kw: Any) -> list[Row]:
    return [r for r in rows if all(r["setting"].get(k) == v for k, v in kw.items())]


def _relies(r: Row) -> bool:
    return r["reliance_gap"] >= RELIES


def print_runs(rows: list[Row]) -> None:
    print(f"{'family':10s} {'cue':22s} {'rho':>5s} {'seed':>4s} {'clean acc':>9s} "
          f"{'test acc':>8s} {'gap':>6s} {'sem top1':>8s} {'patches':>11s} {'wg none':>7s} "
          f"{'wg pseudo':>9s} {'wg oracle':>9s} {'closed':>7s} {'min':>5s}")
    for r in rows:
        s, sp = r["setting"], r["spec"]
        cue = ("control" if s["control"] else s.get("kind") or (
            f"{sp['glyph']} {sp['glyph_size']} {sp['position']}" if sp["family"] == "glyph"
            else "background"))
        sem = r["maps"]["semantic"]
        rep = r["repairs"]

        def wg(k: str, rep: dict[str, Any] = rep) -> str:
            return f"{rep[k]['worst_group_accuracy']:.2f}" if k in rep else "-"

        closed = rep.get("dfr:pseudo", {}).get("gap_closed")
        patches = (f"{sem['top1_seed_patches'] or 0:.1f}->{sem['top1_patches']:.1f}"
                   if sem["top1_patches"] is not None else "-")
        print(f"{s['family']:10s} {cue:22s} {s['rho']:5.2f} {s['seed']:4d} "
              f"{r['clean_accuracy'] or float('nan'):9.3f} {r['test_accuracy']:8.3f} "
              f"{r['reliance_gap']:+6.2f} {sem['top1_planted']!s:>8s} {patches:>11s} "
              f"{wg('none'):>7s} {wg('dfr:pseudo'):>9s} {wg('dfr:oracle'):>9s} "
              f"{'-' if closed is None or closed != closed else f'{closed:.2f}':>7s} "
              f"{(r['train_seconds'] + r['audit_seconds']) / 60:5.1f}")


def print_detection(rows: list[Row]) -> None:
    planted = [r for r in rows if not r["setting"]["control"]]
    relied = [r for r in planted if _relies(r)]
    control = [r for r in rows if r["setting"]["control"]]
    maps = list(rows[0]["maps"])
    print(f"\nDetection: {len(planted)} planted runs, {len(relied)} whose model relies on the "
          f"cue (gap >= {RELIES}); {len(control)} control runs")
    print(f"{'map':10s} {'top-1 relied-on finding = planted cue':>40s} "
          f"{'control: no off-object finding':>34s} {'control: no finding':>26s}")
    for m in maps:
        k = sum(r["maps"][m]["top1_planted"] for r in relied)
        c_off = sum(not r["maps"][m]["top1_off_object"] for r in control)
        c_none = sum(r["maps"][m]["relied_on"] == 0 for r in control)
        print(f"{m:10s} {wilson(k, len(relied)):>40s} {wilson(c_off, len(control)):>34s} "
              f"{wilson(c_none, len(control)):>26s}")
    for fam in ("glyph", "background", "foreign"):
        sel = [r for r in relied if r["setting"]["family"] == fam]
        if sel:
            k = sum(r["maps"]["semantic"]["top1_planted"] for r in sel)
            print(f"  semantic, {fam} family: {wilson(k, len(sel))}")


def _per_map(rows: list[Row], key: str) -> None:
    if not rows:
        print("  n/a (no run)")
        return
    for m in rows[0]["maps"]:
        print(f"  {m:10s} {mean_ci([r['maps'][m][key] for r in rows])}")


def print_faithfulness(rows: list[Row]) -> None:
    print(f"\nFaithfulness over all {len(rows)} runs: ABPC (mean over runs, 95% interval)")
    _per_map(rows, "abpc")
    relied = [r for r in rows if not r["setting"]["control"] and _relies(r)]
    print(f"\nLocalisation of the planted cue over {len(relied)} runs relying on it: "
          "AUROC per image vs the cue's patches")
    _per_map(relied, "loc_auroc")
    print("Pointing game (top patch on the cue)")
    _per_map(relied, "pointing")


def print_repair(rows: list[Row]) -> None:
    print("\nRepair (last layer, group-balanced on the held-out val split) and prompting, "
          "runs relying on the cue; worst-group accuracy on the decorrelated test split")
    for rho in sorted({r["setting"]["rho"] for r in rows}):
        sel = [r for r in rows if r["setting"]["rho"] == rho and not r["setting"]["control"]
               and _relies(r) and "dfr:pseudo" in r["repairs"]]
        print(f"\nrho = {rho}: {len(sel)} runs with a repair")
        if not sel:
            continue
        get: dict[str, Callable[[Row], Any]] = {
            "floor (none)": lambda r: r["repairs"]["none"],
            "dfr:pseudo": lambda r: r["repairs"]["dfr:pseudo"],
            "dfr:oracle": lambda r: r["repairs"].get("dfr:oracle"),
            "dfr:class": lambda r: r["repairs"].get("dfr:class"),
            "prompt drop:semantic": lambda r: r["prompts"]["drop:semantic"],
        }
        for name, fn in get.items():
            vals = [fn(r) for r in sel if fn(r) is not None]
            print(f"  {name:22s} acc {mean_ci([v['accuracy'] for v in vals])}; worst group "
                  f"{mean_ci([v['worst_group_accuracy'] for v in vals])}")
        closed = [r["repairs"]["dfr:pseudo"]["gap_closed"] for r in sel]
        cost = [r["repairs"]["none"]["accuracy"] - r["repairs"]["dfr:pseudo"]["accuracy"]
                for r in sel]
        undefined = sum(c is None or c != c for c in closed)
        print(f"  gap closed by dfr:pseudo {mean_ci(closed)}" + (
            f"; undefined in {undefined} (the oracle no better than the floor)"
            if undefined else ""))
        print(f"  accuracy cost of dfr:pseudo (none - pseudo) {mean_ci(cost)}")


def print_tables(rows: list[Row]) -> None:
    if not rows:
        print("no rows yet")
        return
    print_runs(rows)
    print("\nCore learned (accuracy on shortcut-free test images >= 0.85):")
    for fam in ("glyph", "background", "foreign"):
        for rho in sorted({r["setting"]["rho"] for r in rows}):
            sel = [r for r in rows if r["setting"]["family"] == fam
                   and r["setting"]["rho"] == rho and not r["setting"]["control"]]
            if sel:
                ok = sum((r["clean_accuracy"] or 0) >= 0.85 for r in sel)
                print(f"  {fam:10s} rho {rho}: clean accuracy "
                      f"{mean_ci([r['clean_accuracy'] for r in sel])}; >= 0.85 in "
                      f"{wilson(ok, len(sel))}")
        ctl = [r for r in rows if r["setting"]["family"] == fam and r["setting"]["control"]]
        if ctl:
            acc = mean_ci([r["test_accuracy"] for r in ctl])
            print(f"  {fam:10s} control: test accuracy {acc}")
    print_detection(rows)
    print_faithfulness(rows)
    print_repair(rows)
    secs = [r["train_seconds"] + r["audit_seconds"] for r in rows]
    print(f"\nper run: {np.mean([r['train_seconds'] for r in rows]):.0f} s data+training, "
          f"{np.mean([r['audit_seconds'] for r in rows]):.0f} s audit; total "
          f"{sum(secs) / 60:.1f} min over {len(rows)} runs")
    cpu = [r for r in rows if "train_cpu_seconds" in r]
    if cpu:  # wall time on a shared machine counts other jobs' time; CPU time does not
        print(f"per run, CPU time of the bench process: "
              f"{np.mean([r['train_cpu_seconds'] for r in cpu]):.0f} s training, "
              f"{np.mean([r['audit_cpu_seconds'] for r in cpu]):.0f} s audit (SIFT workers "
              f"not counted; {len(cpu)} runs)")


def plot(rows: list[Row], path: Any) -> None:
    """Left: ABPC per map over all runs (mean, 95% interval). Right: worst-group accuracy of
    the floor, the repairs and prompting per rho, runs relying on the cue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stats(v: list[Any]) -> tuple[float, float]:
        a = np.array([float(x) for x in v if x is not None and x == x])
        if not len(a):
            return float("nan"), 0.0
        return float(a.mean()), float(1.96 * a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 \
            else 0.0

    maps = list(rows[0]["maps"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 3.8))
    ms = [stats([r["maps"][m]["abpc"] for r in rows]) for m in maps]
    ax.bar(range(len(maps)), [m for m, _ in ms], yerr=[e for _, e in ms])
    ax.set_xticks(range(len(maps)), maps, rotation=20, fontsize=8)
    ax.set_ylabel("ABPC")
    ax.set_title(f"Faithfulness, {len(rows)} runs (mean, 95% interval)", fontsize=9)
    methods = [("none", "floor"), ("dfr:pseudo", "dfr:pseudo"), ("dfr:oracle", "oracle"),
               ("dfr:class", "class-balanced"), ("prompt", "prompt drop:semantic")]
    rhos = sorted({r["setting"]["rho"] for r in rows})
    width = 0.8 / len(methods)
    for k, (key, label) in enumerate(methods):
        vals = []
        for rho in rhos:
            sel = [r for r in rows if r["setting"]["rho"] == rho and not r["setting"]["control"]
                   and _relies(r) and "dfr:pseudo" in r["repairs"]]
            src = [r["prompts"]["drop:semantic"] if key == "prompt" else r["repairs"].get(key)
                   for r in sel]
            vals.append(stats([s["worst_group_accuracy"] for s in src if s is not None]))
        bx.bar(np.arange(len(rhos)) + (k - len(methods) / 2 + 0.5) * width,
               [v for v, _ in vals], width, yerr=[e for _, e in vals], label=label)
    bx.set_xticks(range(len(rhos)), [f"rho {r}" for r in rhos])
    bx.set_ylim(0, 1)
    bx.set_ylabel("worst-group accuracy")
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    bx.set_title("Repair vs prompting (runs relying on the cue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
