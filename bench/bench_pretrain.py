"""Guided pre-training benchmark (issue 5): linear-probe and k-NN accuracy against epoch for
each masker, epochs to reach the random masker's best accuracy, the speed-up, and the
per-epoch wall-time overhead of guided masking, over seeds, in one process.

    .venv/bin/python bench/bench_pretrain.py --out runs/bench-pretrain

Writes results.jsonl (one row per masker and seed), curves.png (accuracy against epoch) and
masks.png (masks on scikit-image's photographs) under --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch

from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset
from vitsem.pretrain.data import benchmark_pretrain_data
from vitsem.pretrain.loop import PretrainConfig, pretrain
from vitsem.pretrain.maskers import MaskSpec
from vitsem.pretrain.probe import epochs_to_target

MASKERS: dict[str, tuple[str, MaskSpec]] = {
    "random": ("random", MaskSpec()),
    "sift a=+1": ("sift", MaskSpec(alpha=1.0)),
    "sift a=-1": ("sift", MaskSpec(alpha=-1.0)),
    "sift-hint": ("sift-hint", MaskSpec(alpha=1.0, hint_ratio=0.1)),
    "kamim": ("kamim", MaskSpec(kamim=1.0)),
}


def bootstrap_interval(values: np.ndarray, rng: np.random.Generator, n: int = 2000
                       ) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (NaN-free values)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    means = rng.choice(values, size=(n, len(values)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mask_pictures(out: Path) -> None:
    """Masks of each masker on scikit-image's photographs (224 px, 16 px patches)."""
    from skimage import data as skdata

    from vitsem.method.concentration import TokenGrid, concentration, patch_weights
    from vitsem.method.keypoints import detect_sift
    from vitsem.pretrain.maskers import make_mask

    photos = {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(),
              "chelsea": skdata.chelsea()}
    grid = TokenGrid((16, 16), (14, 14))
    fig, axes = plt.subplots(len(photos), len(MASKERS) + 1, figsize=(2.2 * (len(MASKERS) + 1),
                                                                      2.3 * len(photos)))
    for row, (name, img) in enumerate(photos.items()):
        import cv2

        view = cv2.resize(np.ascontiguousarray(img[..., :3]), (224, 224),
                          interpolation=cv2.INTER_AREA)
        w = torch.from_numpy(patch_weights(concentration(detect_sift(view), grid))).float()[None]
        axes[row, 0].imshow(view)
        axes[row, 0].set_title(f"{name}", fontsize=8)
        for col, (label, (masker, spec)) in enumerate(MASKERS.items(), 1):
            mask = make_mask(masker, w, spec, torch.Generator().manual_seed(0))[0]
            shown = view.copy()
            m = np.kron(mask.reshape(14, 14).numpy(), np.ones((16, 16), bool))
            shown[m] = (shown[m] * 0.25).astype(np.uint8)
            axes[row, col].imshow(shown)
            axes[row, col].set_title(f"{label}", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("Masked patches (dark), ratio 0.75", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "masks.png", dpi=90)
    plt.close(fig)


def curves_figure(rows: list[dict[str, Any]], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for label in MASKERS:
        mine = [r for r in rows if r["masker"] == label]
        if not mine:
            continue
        for ax, key in zip(axes, ("linear_probe", "knn"), strict=True):
            curves = np.array([[h[key] for h in r["history"]] for r in mine])
            epochs = np.arange(1, curves.shape[1] + 1)
            ax.plot(epochs, curves.mean(0), marker="o", ms=3, label=label)
            ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{key.replace('_', ' ')} accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy against epoch (mean over seeds; band: min-max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]]) -> None:
    rng = np.random.default_rng(0)
    seeds = sorted({r["seed"] for r in rows})
    print(f"\n{len(rows)} runs, seeds {seeds}, {rows[0]['epochs']} epochs each")
    for key in ("linear_probe", "knn"):
        random_rows = {r["seed"]: r for r in rows if r["masker"] == "random"}
        # The target: the random masker's best accuracy within the budget (mean over seeds).
        target = float(np.mean([max(h[key] for h in r["history"])
                                for r in random_rows.values()]))
        print(f"\n{key}: target = random's best within the budget = {target:.3f}")
        print(f"{'masker':11s} {'final':>7s} {'best':>7s} {'epochs to target (per seed)':>30s} "
              f"{'speed-up (95% CI)':>24s} {'s/epoch':>8s} {'overhead':>9s}")
        base_secs = np.mean([h["epoch_seconds"] for r in random_rows.values()
                             for h in r["history"]])
        for label in MASKERS:
            mine = sorted((r for r in rows if r["masker"] == label), key=lambda r: r["seed"])
            if not mine:
                continue
            final = np.mean([r["history"][-1][key] for r in mine])
            best = np.mean([max(h[key] for h in r["history"]) for r in mine])
            ett = [epochs_to_target([h[key] for h in r["history"]], target) for r in mine]
            rnd = [epochs_to_target([h[key] for h in random_rows[r["seed"]]["history"]], target)
                   if r["seed"] in random_rows else float("nan") for r in mine]
            # Seeds that never reach the target count as the budget + 1 (a lower bound).
            budget = mine[0]["epochs"]
            ratio = np.array([(rr if rr == rr else budget + 1) / (e if e == e else budget + 1)
                              for rr, e in zip(rnd, ett, strict=True)])
            lo, hi = bootstrap_interval(ratio, rng)
            secs = np.mean([h["epoch_seconds"] for r in mine for h in r["history"]])
            ett_s = ",".join("-" if e != e else str(int(e)) for e in ett)
            print(f"{label:11s} {final:7.3f} {best:7.3f} {ett_s:>30s} "
                  f"{ratio.mean():8.2f} ({lo:.2f}-{hi:.2f}){'':6s} {secs:8.2f} "
                  f"{secs / base_secs - 1:+9.1%}")
    mask_share = {label: np.mean([h["mask_seconds"] / h["epoch_seconds"] for r in rows
                                  if r["masker"] == label for h in r["history"]])
                  for label in MASKERS if any(r["masker"] == label for r in rows)}
    print("\nmasking's share of epoch time: " + ", ".join(f"{k} {v:.2%}"
                                                        for k, v in mask_share.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-pretrain"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--table", action="store_true", help="Only print the table of --out.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    if not args.table:
        torch.set_num_threads(2)
        root = args.out / "data"
        if not (root / "dataset.json").exists():
            # The control data (no glyph): classes differ by shape and texture only.
            make_shortcut_dataset(root, ShortcutSpec(glyph="none", n_train=args.n_train,
                                                     n_test=args.n_test, seed=11), workers=2)
        base = PretrainConfig(epochs=args.epochs, device=args.device)
        data = benchmark_pretrain_data(root, base, workers=2)
        done = {(r["masker"], r["seed"]) for r in rows}
        for seed in range(args.seeds):
            for label, (masker, spec) in MASKERS.items():
                if (label, seed) in done:
                    continue
                cfg = replace(base, masker=masker, mask=spec, seed=seed)
                t0 = time.perf_counter()
                state = pretrain(cfg, data)
                row = {"masker": label, "seed": seed, "epochs": args.epochs,
                       "device": args.device, "seconds": time.perf_counter() - t0,
                       "history": state.history}
                rows.append(row)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                last = state.history[-1]
                print(f"{label} seed {seed}: probe {last['linear_probe']:.3f}, "
                      f"k-NN {last['knn']:.3f} ({row['seconds']:.0f} s)", flush=True)
        mask_pictures(args.out)
    curves_figure(rows, args.out)
    print_table(rows)


if __name__ == "__main__":
    main()
