"""Spurious-correlation audit on realistic shortcuts (issue 10): detection, faithfulness,
prompting and the annotation-free repair, the method's semantic map against the baselines
in one harness.

Families: ``glyph`` (a planted glyph; the kind, size and position change with the seed:
checker 20% top-left, text 16% random place, bullseye 25% bottom-right) and ``background``
(Waterbirds-style: a background family per class). Both on the digit core of
:mod:`vitsem.data.composed`, at rho {0.9, 0.95, 0.99}, 3 seeds, plus a no-cue control per
family and seed. ``--foreign`` adds held-back runs with stamps the generator never makes
(``bench/foreign.py``). Per run: generate, train a tiny ViT on the CPU, audit the
decorrelated test split WITHOUT object masks (as a user would), with the held-out ``val``
split for the repair; then score against the ground truth (cue pixels, groups, masks),
which the audit never saw. Rows are appended to ``results.jsonl`` as they finish.

    nice -n 10 .venv/bin/python bench/bench_audit.py --out runs/bench-audit
    .venv/bin/python bench/bench_audit.py --out runs/bench-audit --table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from foreign import FOREIGN, cue_masks, make_foreign_dataset

from vitsem.audit.benchmark import auroc, is_planted_cue, load_benchmark, view_mask
from vitsem.audit.faithfulness import pattern_localisation
from vitsem.audit.pipeline import AuditConfig, AuditData, audit
from vitsem.audit.scores import patch_coverage
from vitsem.data.composed import ComposedSpec, make_composed_dataset
from vitsem.data.train import TrainConfig, train_classifier
from vitsem.method.attention import token_layout
from vitsem.method.models import load_model
from vitsem.method.view import ModelView

MAPS = ("semantic", "cls_last", "rollout", "gradcam", "gae", "occlusion", "random")
GLYPH_BY_SEED = [{"glyph": "checker", "glyph_size": 0.2, "position": "fixed", "corner": 0},
                 {"glyph": "text", "glyph_size": 0.16, "position": "random", "corner": 0},
                 {"glyph": "bullseye", "glyph_size": 0.25, "position": "fixed", "corner": 3}]
RELIES = 0.1
"""A model relies on the cue when the cue raises predictions of its class by >= 10 points
on images of other classes (decorrelated test split, so the label does not explain it)."""


def settings(rhos: list[float], seeds: int, foreign: list[str], first_seed: int = 0,
             families: tuple[str, ...] = ("glyph", "background"), controls: bool = True
             ) -> list[dict[str, Any]]:
    """Seeds ``first_seed`` .. ``first_seed + seeds - 1`` outermost (every setting gets its
    first seed before any gets a second); the held-back foreign stamps after seed 0."""
    out: list[dict[str, Any]] = []
    for seed in range(first_seed, first_seed + seeds):
        for fam in families:
            for rho in rhos:
                out.append({"family": fam, "rho": rho, "seed": seed, "control": False})
            if controls:
                out.append({"family": fam, "rho": 0.95, "seed": seed, "control": True})
        if seed == 0:
            out += [{"family": "foreign", "kind": k, "rho": 0.95, "seed": 0, "control": False}
                    for k in foreign]
    return out


def _spec(s: dict[str, Any], args: argparse.Namespace) -> ComposedSpec:
    base = ComposedSpec(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                        image_size=args.image_size, rho=s["rho"], seed=s["seed"],
                        control=s["control"])
    if s["family"] == "background":
        return replace(base, family="background")
    return replace(base, family="glyph", **GLYPH_BY_SEED[s["seed"] % len(GLYPH_BY_SEED)])


def reliance_gap(pred: np.ndarray, labels: np.ndarray, cue: np.ndarray) -> float:
    """Mean over cue classes c of P(pred = c | cue -> c, label != c) - P(pred = c | no
    cue, label != c)."""
    gaps = []
    for c in np.unique(cue[cue >= 0]):
        with_cue = (cue == c) & (labels != c)
        without = (cue < 0) & (labels != c)
        if with_cue.any() and without.any():
            gaps.append(float((pred[with_cue] == c).mean() - (pred[without] == c).mean()))
    return float(np.mean(gaps)) if gaps else 0.0


def run_one(s: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    name = "-".join(str(v) for v in s.values())
    root = work / name
    spec = _spec(s, args)
    extra = {"embed_dim": args.embed_dim, "num_heads": 3} if args.embed_dim != 192 else {}
    config = TrainConfig(img_size=args.image_size, epochs=args.epochs, depth=args.depth,
                         seed=s["seed"], lr=args.lr, batch_size=args.batch_size,
                         label_smoothing=args.label_smoothing,
                         warmup_epochs=args.warmup_epochs, augment=args.augment, extra=extra)
    t0 = time.perf_counter()
    if s["family"] == "foreign":
        make_foreign_dataset(root, s["kind"], spec)
    else:
        make_composed_dataset(root, spec, workers=2)
    trained = train_classifier(root, root / "model.safetensors", config)
    t_train = time.perf_counter() - t0
    net, _ = load_model(None, root / "model.safetensors")
    view = ModelView.from_model(net)
    grid = token_layout(net, view.hw).grid
    test = load_benchmark(root, "test", view, grid, workers=2)
    val = load_benchmark(root, "val", view, grid, workers=2)
    truth = test.truth
    if s["family"] == "foreign":
        masks = cue_masks(root)
        truth = np.stack([patch_coverage(view_mask(masks[smp.file], view), grid)
                          if smp.file in masks else np.zeros(grid.num_patches)
                          for smp in test.samples])
    # As a user would: no object masks. Groups stay: they only score prompting/repair.
    d = test.data
    data = AuditData(d.views, d.keypoints, d.labels, d.class_names, d.groups, None, d.clean,
                     d.names)
    t1, c1 = time.perf_counter(), time.process_time()
    cfg = AuditConfig(maps=MAPS, seed=s["seed"], faithfulness_images=args.faithfulness_images)
    result = audit(net, view, data, cfg, heldout=val.data)
    t_audit, c_audit = time.perf_counter() - t1, time.process_time() - c1
    coverage = np.stack([patch_coverage(m > 0, grid) for m in d.masks]) if d.masks is not None \
        else None
    pattern = truth >= 0.25
    row: dict[str, Any] = {
        "setting": s, "spec": asdict(spec), "train": asdict(config),
        "train_seconds": t_train, "audit_seconds": t_audit,
        "train_cpu_seconds": trained.cpu_seconds, "audit_cpu_seconds": c_audit,
        "train_accuracy": trained.train_accuracy, "test_accuracy": trained.test_accuracy,
        "clean_accuracy": trained.test_clean_accuracy,
        "reliance_gap": reliance_gap(result.predicted, d.labels, test.cue_class),
        "maps": {}, "prompts": {}, "repairs": {k: v.summary() for k, v in
                                              result.repairs.items()},
        "notes": result.notes}
    for map_name, m in result.maps.items():
        top = m.relied[0] if m.relied else None
        on_object = float(coverage[top.patches].mean()) if top is not None and \
            coverage is not None else float("nan")
        f = result.faithfulness.get(map_name)
        auc, hit = pattern_localisation(m.attribution, pattern)
        row["maps"][map_name] = {
            "top1_planted": bool(top is not None and is_planted_cue(top, truth,
                                                                    test.cue_class)),
            "relied_on": len(m.relied),
            # With the ground-truth masks, would the top finding be a shortcut (off the object)?
            "top1_off_object": bool(top is not None and on_object < 0.5),
            "top1_patches": float(top.patches.sum(1)[top.patches.any(1)].mean())
            if top is not None else None,
            "top1_seed_patches": float(top.seed_patches.sum(1)[top.seed_patches.any(1)].mean())
            if top is not None and top.seed_patches.any() else None,
            "top1_effect_excess": top.causal.effect - top.causal.random_effect
            if top is not None else None,
            "reliance_auroc": auroc(m.reliance, test.cue_class >= 0)
            if (test.cue_class >= 0).any() and (test.cue_class < 0).any() else None,
            "abpc": f.abpc if f is not None else None,
            "loc_auroc": float(np.nanmean(auc)) if np.isfinite(auc).any() else None,
            "pointing": float(np.nanmean(hit)) if np.isfinite(hit).any() else None,
        }
    for prompt, o in result.prompts.items():
        row["prompts"][prompt] = {"accuracy": o.accuracy,
                                  "worst_group_accuracy": o.worst_group_accuracy,
                                  "clean_accuracy": o.clean_accuracy}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-audit-realistic"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="More seeds of a finished bench: e.g. --first-seed 3 --seeds 3.")
    ap.add_argument("--families", nargs="+", choices=("glyph", "background"),
                    default=["glyph", "background"])
    ap.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                    help="The no-cue control per family and seed.")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    ap.add_argument("--foreign", nargs="*", default=list(FOREIGN))
    # The recipe (issue 10 item 1, measured in bench/results/audit-realistic-table-cpu-
    # 2026-12-04.txt): 4x the images and warm-up + cosine decay with label smoothing; the
    # 600-image, 7-epoch recipe left the core unlearned (clean accuracy 0.66-0.79).
    ap.add_argument("--n-train", type=int, default=2400)
    # 720 held-out images: with 240, a rho-0.95 split holds 1-4 images of some minority
    # groups and the repair refused 2 of 4 relied-on runs (bench/results/audit-rho095-*).
    ap.add_argument("--n-val", type=int, default=720)
    ap.add_argument("--n-test", type=int, default=150)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--embed-dim", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--augment", default="jitter", help="jitter (keeps the cue in place) or "
                    "shift (translations: the core is learned better, but the fixed cue is "
                    "then barely relied on)")
    ap.add_argument("--faithfulness-images", type=int, default=48)
    ap.add_argument("--shard", default="0/1", help="i/k: run every k-th setting from i "
                    "(parallel workers, each with its own results file).")
    ap.add_argument("--budget-min", type=float, default=90.0,
                    help="Stop starting new runs after this many minutes.")
    ap.add_argument("--table", action="store_true", help="Only print the table of --out.")
    ap.add_argument("--plot", type=Path, default=None, help="Also write the figure here.")
    args = ap.parse_args()
    # One thread: on a shared, oversubscribed CPU two threads ran 8x slower than one.
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    shard, shards = (int(v) for v in args.shard.split("/"))
    results = args.out / f"results-{shard}.jsonl"
    done = [json.loads(line) for f in sorted(args.out.glob("results-*.jsonl"))
            for line in f.read_text().splitlines()]
    if not args.table:
        seen = {json.dumps(r["setting"], sort_keys=True) for r in done}
        t_start = time.perf_counter()
        for i, s in enumerate(settings(args.rhos, args.seeds, args.foreign, args.first_seed,
                                         tuple(args.families), args.controls)):
            if i % shards != shard or json.dumps(s, sort_keys=True) in seen:
                continue
            if time.perf_counter() - t_start > 60 * args.budget_min:
                print(f"budget of {args.budget_min} min spent; stopping before {s}")
                break
            try:
                row = run_one(s, args.out / "work", args)
            except Exception:  # one broken run must not end the shard: say so, go on
                import traceback

                print(f"{s}: FAILED\n{traceback.format_exc()}", flush=True)
                continue
            done.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            sem = row["maps"]["semantic"]
            print(f"{s}: clean acc {row['clean_accuracy']}, gap {row['reliance_gap']:+.2f}, "
                  f"top-1 planted {sem['top1_planted']} ({sem['top1_seed_patches']} -> "
                  f"{sem['top1_patches']} patches), ABPC {sem['abpc']:.3f}, repair "
                  f"{row['repairs'].get('dfr:pseudo', {}).get('gap_closed')} "
                  f"({row['train_seconds']:.0f}+{row['audit_seconds']:.0f} s wall, "
                  f"{row['train_cpu_seconds']:.0f}+{row['audit_cpu_seconds']:.0f} s CPU)",
                  flush=True)
    from tables import plot, print_tables

    rescored = args.out / "rescored.json"  # see bench/rescore.py
    if rescored.exists():
        fixed = json.loads(rescored.read_text())
        for r in done:
            for m, v in fixed.get(json.dumps(r["setting"], sort_keys=True), {}).items():
                r["maps"][m].update(v)
        print(f"localisation of {len(fixed)} rows from {rescored}")
    print_tables(done)
    if args.plot is not None and done:
        plot(done, args.plot)


if __name__ == "__main__":
    main()
