"""Recompute the cue localisation (AUROC, pointing game) of finished bench rows from their
saved models and data, for every map but leave-one-out occlusion (N forwards per image;
its continuous values rarely tie, so its figures stand).

Why: rows written before the pointing game broke ties by their share on the pattern scored
a flat map (Grad-CAM is all zero on many images) by raster order, which favours a cue in
the top-left corner. Writes ``rescored.json`` beside the results: {setting: {map: {...}}}.

    .venv/bin/python bench/rescore.py --out runs/bench-audit-realistic
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from foreign import cue_masks

from vitsem.audit.benchmark import load_benchmark, view_mask
from vitsem.audit.faithfulness import pattern_localisation
from vitsem.audit.maps import MAPS
from vitsem.audit.scores import patch_coverage
from vitsem.method.attention import token_layout
from vitsem.method.concentration import concentration, patch_weights
from vitsem.method.models import load_model
from vitsem.method.view import ModelView


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [json.loads(line) for f in sorted(args.out.glob("results-*.jsonl"))
            for line in f.read_text().splitlines()]
    path = args.out / "rescored.json"
    out: dict[str, dict[str, dict[str, float | None]]] = (
        json.loads(path.read_text()) if path.exists() else {})
    for r in rows:
        s = r["setting"]
        if json.dumps(s, sort_keys=True) in out:
            continue
        root = args.out / "work" / "-".join(str(v) for v in s.values())
        net, _ = load_model(None, root / "model.safetensors")
        view = ModelView.from_model(net)
        grid = token_layout(net, view.hw).grid
        test = load_benchmark(root, "test", view, grid, workers=1)
        truth = test.truth
        if s["family"] == "foreign":
            masks = cue_masks(root)
            truth = np.stack([patch_coverage(view_mask(masks[m.file], view), grid)
                              if m.file in masks else np.zeros(grid.num_patches)
                              for m in test.samples])
        x = view.to_tensor(test.data.views)
        w = torch.from_numpy(patch_weights(np.stack([concentration(k, grid, "count")
                                                     for k in test.data.keypoints]))).float()
        key = json.dumps(s, sort_keys=True)
        out[key] = {}
        for name in r["maps"]:
            if name == "occlusion":
                continue
            a = torch.cat([MAPS[name](net, x[i:i + 64], w[i:i + 64]).detach()
                           for i in range(0, len(x), 64)]).numpy()
            auc, hit = pattern_localisation(a, truth >= 0.25)
            out[key][name] = {
                "loc_auroc": float(np.nanmean(auc)) if np.isfinite(auc).any() else None,
                "pointing": float(np.nanmean(hit)) if np.isfinite(hit).any() else None}
        print(s, {k: v["pointing"] for k, v in out[key].items()}, flush=True)
        path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
