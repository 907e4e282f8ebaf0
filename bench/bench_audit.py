"""Spurious-correlation audit benchmark (issue 4): detection and prompting on the shipped
shortcut benchmark, the method's semantic map against the baselines in one harness.

For each setting (rho x glyph x position, plus a no-glyph control) and seed: generate the
data, train a tiny ViT on the CPU, audit its decorrelated test split with every map, and
score the findings against the planted glyph. Rows are appended to a JSONL file as they
finish (so a long run can be stopped and its table printed); the table is printed at the
end, aggregated over seeds.

    .venv/bin/python bench/bench_audit.py --out runs/bench-audit            # full grid
    .venv/bin/python bench/bench_audit.py --out runs/bench-audit --table    # table only
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitsem.audit.benchmark import auroc, is_planted, load_benchmark
from vitsem.audit.pipeline import AuditConfig, audit
from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset
from vitsem.data.train import TrainConfig, train_classifier
from vitsem.method.attention import token_layout
from vitsem.method.models import load_model
from vitsem.method.view import ModelView


def settings(rhos: list[float], glyphs: list[str], positions: list[str]
             ) -> list[dict[str, Any]]:
    grid = [{"rho": r, "glyph": g, "position": p}
            for r, g, p in itertools.product(rhos, glyphs, positions)]
    return [*grid, {"rho": 0.95, "glyph": "none", "position": "fixed"}]


def run_one(setting: dict[str, Any], seed: int, work: Path, args: argparse.Namespace
            ) -> dict[str, Any]:
    name = f"{setting['glyph']}-{setting['position']}-{setting['rho']}-s{seed}"
    root = work / name
    spec = ShortcutSpec(n_train=args.n_train, n_test=args.n_test, seed=seed, **setting)
    t0 = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, depth=args.depth, seed=seed)
    stamp = root / "trained.json"  # a model trained earlier with the same data and config
    key = json.dumps({"spec": spec.__dict__, "train": config.__dict__}, sort_keys=True)
    if stamp.exists() and json.loads(stamp.read_text())["key"] == key:
        train_accuracy = json.loads(stamp.read_text())["train_accuracy"]
    else:
        make_shortcut_dataset(root, spec, workers=2)
        trained = train_classifier(root, root / "model.safetensors", config)
        train_accuracy = trained.train_accuracy
        stamp.write_text(json.dumps({"key": key, "train_accuracy": train_accuracy}))
    t_train = time.perf_counter() - t0
    net, _ = load_model(None, root / "model.safetensors")
    view = ModelView.from_model(net)
    grid = token_layout(net, view.hw).grid
    bench = load_benchmark(root, "test", view, grid, workers=2)
    t1 = time.perf_counter()
    result = audit(net, view, bench.data, AuditConfig(seed=seed))
    t_audit = time.perf_counter() - t1
    present = ~bench.data.clean
    # Does the model use the glyph at all? The rise in "shortcut class" predictions when the
    # glyph is present (decorrelated test split, so the label does not explain it).
    to_target = result.predicted == spec.shortcut_class
    gap = float(to_target[present].mean() - to_target[~present].mean()) if present.any() \
        else 0.0
    row: dict[str, Any] = {"setting": setting, "seed": seed, "train_seconds": t_train,
                           "audit_seconds": t_audit, "train_accuracy": train_accuracy,
                           "shortcut_gap": gap, "status": result.status, "maps": {},
                           "prompts": {}}
    for map_name, m in result.maps.items():
        top = m.top
        row["maps"][map_name] = {
            "top1_planted": bool(top is not None and is_planted(top, bench.truth,
                                                                 spec.shortcut_class)),
            "top1_confirmed": bool(top is not None and top.shortcut),
            "confirmed_shortcuts": len(m.shortcuts),
            "auroc": auroc(m.reliance, present) if setting["glyph"] != "none" else None,
        }
    for prompt, o in result.prompts.items():
        glyph_groups = [v for g, v in o.group_accuracy.items() if g.endswith("|glyph")]
        row["prompts"][prompt] = {
            "accuracy": o.accuracy, "worst_group_accuracy": o.worst_group_accuracy,
            "worst_glyph_group_accuracy": min(glyph_groups) if glyph_groups else None,
            "clean_accuracy": o.clean_accuracy}
    return row


def _diff(after: float | None, before: float | None) -> float:
    return float("nan") if after is None or before is None else after - before


def _mean(values: list[Any]) -> float:
    vals = [float(v) for v in values if v is not None and v == v]
    return float(np.mean(vals)) if vals else float("nan")


RELIES = 0.1
"""A model relies on the glyph when it raises shortcut-class predictions by >= 10 points."""


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no rows yet")
        return
    every_planted = [r for r in rows if r["setting"]["glyph"] != "none"]
    relied = [r for r in every_planted if r["shortcut_gap"] >= RELIES]
    print(f"\n{len(rows)} runs ({len(every_planted)} with a planted glyph, of which "
          f"{len(relied)} trained a model that relies on it: shortcut gap >= {RELIES})")
    for r in every_planted:
        s = r["setting"]
        print(f"  {s['glyph']:9s} {s['position']:7s} rho={s['rho']:<5} seed {r['seed']}: gap "
              f"{r['shortcut_gap']:+.2f}, semantic top-1 planted "
              f"{r['maps'].get('semantic', {}).get('top1_planted')}")
    print_detection(rows, every_planted, "all planted runs")
    print_detection(rows, relied, "runs whose model relies on the glyph")
    print_prompting(rows, relied)


def print_detection(rows: list[dict[str, Any]], planted: list[dict[str, Any]], title: str
                    ) -> None:
    maps = list(rows[0]["maps"]) or ["semantic"]
    control = [r for r in rows if r["setting"]["glyph"] == "none"]
    print(f"\nDetection over {title} ({len(planted)}); control = {len(control)} no-glyph runs")
    print(f"{'map':10s} {'top-1 planted':>14s} {'top-1 confirmed':>16s} {'AUROC mean':>11s} "
          f"{'AUROC min':>10s} {'control: no confirmed':>22s}")
    for m in maps:
        top1 = [r["maps"].get(m, {}).get("top1_planted", False) for r in planted]
        conf = [r["maps"].get(m, {}).get("top1_planted", False)
                and r["maps"].get(m, {}).get("top1_confirmed", False) for r in planted]
        aucs = [r["maps"].get(m, {}).get("auroc") for r in planted]
        clean = [r["maps"].get(m, {}).get("confirmed_shortcuts", 0) == 0 for r in control]
        vals = [a for a in aucs if a is not None and a == a]
        print(f"{m:10s} {np.mean(top1) if top1 else float('nan'):14.2f} "
              f"{np.mean(conf) if conf else float('nan'):16.2f} {_mean(aucs):11.3f} "
              f"{min(vals) if vals else float('nan'):10.3f} "
              f"{np.mean(clean) if clean else float('nan'):22.2f}")


def print_prompting(rows: list[dict[str, Any]], planted: list[dict[str, Any]]) -> None:
    control = [r for r in rows if r["setting"]["glyph"] == "none"]
    print("\nPrompting over runs whose model relies on the glyph (mean; worst glyph group = "
          "worst group holding the glyph)")
    for rho in sorted({r["setting"]["rho"] for r in planted}):
        sel = [r for r in planted if r["setting"]["rho"] == rho]
        print(f"\nrho = {rho} ({len(sel)} runs)")
        print(f"{'prompt':15s} {'accuracy':>9s} {'worst group':>12s} {'worst glyph grp':>16s} "
              f"{'shortcut-free':>14s}")
        for p in sel[0]["prompts"]:
            vals = [r["prompts"][p] for r in sel]
            print(f"{p:15s} {_mean([v['accuracy'] for v in vals]):9.3f} "
                  f"{_mean([v['worst_group_accuracy'] for v in vals]):12.3f} "
                  f"{_mean([v['worst_glyph_group_accuracy'] for v in vals]):16.3f} "
                  f"{_mean([v['clean_accuracy'] for v in vals]):14.3f}")
        for p in ("drop:semantic", "random"):
            d = {k: _mean([_diff(r["prompts"][p][k], r["prompts"]["none"][k]) for r in sel])
                 for k in ("accuracy", "worst_group_accuracy", "worst_glyph_group_accuracy",
                           "clean_accuracy")}
            print(f"{'  change ' + p:15s} {d['accuracy']:+9.3f} {d['worst_group_accuracy']:+12.3f}"
                  f" {d['worst_glyph_group_accuracy']:+16.3f} {d['clean_accuracy']:+14.3f}")
    if control:
        print(f"\ncontrol ({len(control)} runs): accuracy "
              f"{_mean([r['prompts']['none']['accuracy'] for r in control]):.3f} -> "
              f"{_mean([r['prompts']['drop:semantic']['accuracy'] for r in control]):.3f} "
              "after drop:semantic")
    secs = [r["train_seconds"] + r["audit_seconds"] for r in rows]
    print(f"\nper run: {np.mean([r['train_seconds'] for r in rows]):.0f} s data+training, "
          f"{np.mean([r['audit_seconds'] for r in rows]):.0f} s audit; total {sum(secs):.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-audit"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    ap.add_argument("--glyphs", nargs="+", default=["checker", "text", "bullseye"])
    ap.add_argument("--positions", nargs="+", default=["fixed", "random"])
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=240)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--table", action="store_true", help="Only print the table of --out.")
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.exists() else []
    if not args.table:
        seen = {(json.dumps(r["setting"], sort_keys=True), r["seed"]) for r in done}
        # Seeds outermost: every setting gets its first seed before any gets a second. The
        # random-position settings' later seeds come last (on the CPU budget their models
        # rarely learn the glyph, so they say least).
        todo = [(seed, setting) for seed in range(args.seeds)
                for setting in settings(args.rhos, args.glyphs, args.positions)]
        todo.sort(key=lambda t: (t[1]["position"] == "random" and t[0] > 0, t[0]))
        for seed, setting in todo:
            if (json.dumps(setting, sort_keys=True), seed) in seen:
                continue
            row = run_one(setting, seed, args.out / "work", args)
            done.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            sem = row["maps"].get("semantic", {})
            print(f"{setting} seed {seed}: top-1 planted {sem.get('top1_planted')}, "
                  f"AUROC {sem.get('auroc')}, acc {row['prompts']['none']['accuracy']:.3f}"
                  f" -> {row['prompts']['drop:semantic']['accuracy']:.3f} "
                  f"({row['train_seconds']:.0f}+{row['audit_seconds']:.0f} s)", flush=True)
    print_table(done)


if __name__ == "__main__":
    main()
