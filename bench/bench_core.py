"""Core benchmark (issue 2): capture overhead, SIFT scaling, analysis memory.

Prints, measured side by side in this one run on the same model, batch and device:
  (a) plain inference throughput with timm's fused attention,
  (b) inference + full attention capture + every interrelation statistic, and (b)/(a);
  (b') the same with the statistics' eager path (VITSEM_FUSED_STATS=0), side by side;
  (c) SIFT images/s on one core and on all cores, and the parallel efficiency;
  (d) peak memory (max RSS) of a 5,000-image analysis against a 500-image one;
  (e) peak memory (max RSS) of DINOv2-S/14 at 518 px (1,370 tokens), batch 16: a plain
      forward against capture + every statistic (a reducing sink), each in a fresh process.
Timings are the median and range (min-max) over the repeats.

    .venv/bin/python bench/bench_core.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset
from vitsem.method.analysis import InterrelationAnalyzer, SemanticBatch
from vitsem.method.attention import token_layout
from vitsem.method.concentration import concentration
from vitsem.method.keypoints import ViewedKeypoints, default_workers, sift_files
from vitsem.method.row_stats import use_fused
from vitsem.method.view import ModelView


def sample_images(folder: Path, n: int) -> list[Path]:
    """Real photographs from scikit-image, written as files and cycled to ``n`` paths."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "immunohistochemistry",
             "hubble_deep_field", "retina"]
    from PIL import Image

    files = []
    for name in names:
        try:
            arr = getattr(data, name)()
        except Exception:  # some images need optional downloads
            continue
        if arr.ndim == 3 and arr.shape[2] == 3:
            p = folder / f"{name}.png"
            Image.fromarray(arr).save(p)
            files.append(p)
    return [files[i % len(files)] for i in range(n)]


def bench_capture(paths: list[Path], batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    view = ModelView.from_model(model)
    layout = token_layout(model, view.hw)
    items = [it for it in sift_files(paths[:batch], view, workers=1)
             if isinstance(it, ViewedKeypoints)]
    c = np.stack([concentration(it.keypoints, layout.grid) for it in items])
    x = view.to_tensor(np.stack([it.view for it in items]))
    sem = SemanticBatch.from_concentrations(c)
    analyzer = InterrelationAnalyzer(model, layout)
    fused_env = os.environ.get("VITSEM_FUSED_STATS")

    def analysis(fused: bool) -> None:
        os.environ["VITSEM_FUSED_STATS"] = "1" if fused else "0"
        analyzer.run(x, sem)

    plain: list[float] = []
    full: list[float] = []
    eager: list[float] = []
    try:
        with torch.inference_mode():
            model(x)
            analysis(True)  # warm-up: allocator, workspaces, the kernel's compilation
            analysis(False)
            for _ in range(repeats):  # interleaved so drift hits all alike
                for times, run in ((plain, lambda: model(x)), (full, lambda: analysis(True)),
                                   (eager, lambda: analysis(False))):
                    t = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t)
    finally:
        if fused_env is None:
            os.environ.pop("VITSEM_FUSED_STATS", None)
        else:
            os.environ["VITSEM_FUSED_STATS"] = fused_env
    a = batch / statistics.median(plain)
    b = batch / statistics.median(full)
    e = batch / statistics.median(eager)
    pairs = [p / f for p, f in zip(plain, full, strict=True)]  # per interleaved pair
    eager_pairs = [p / f for p, f in zip(plain, eager, strict=True)]
    return {"batch": batch, "threads": torch.get_num_threads(), "repeats": repeats,
            "fused": use_fused((batch, 6, 197, 197)),
            "plain_img_s": a, "plain_img_s_min": batch / max(plain),
            "plain_img_s_max": batch / min(plain), "capture_stats_img_s": b,
            "capture_stats_img_s_min": batch / max(full),
            "capture_stats_img_s_max": batch / min(full), "ratio": b / a,
            "ratio_pair_median": statistics.median(pairs), "ratio_pair_min": min(pairs),
            "ratio_pair_max": max(pairs), "eager_img_s": e, "eager_ratio": e / a,
            "eager_ratio_pair_median": statistics.median(eager_pairs),
            "eager_ratio_pair_min": min(eager_pairs), "eager_ratio_pair_max": max(eager_pairs)}


def bench_sift(paths: list[Path], repeats: int) -> dict[str, float]:
    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    view = ModelView.from_model(model)
    n_all = default_workers()

    def run(workers: int) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = list(sift_files(paths, view, workers=workers, chunksize=8))
            times.append(time.perf_counter() - t)
            assert len(out) == len(paths)
        return len(paths) / statistics.median(times)

    run(n_all)  # warm the page cache
    one = run(1)
    many = run(n_all)
    return {"images": len(paths), "cores": n_all, "one_core_img_s": one,
            "all_cores_img_s": many, "parallel_efficiency": many / one / n_all}


MEMORY_CHILD = """
import resource, sys, timm
from vitsem.method.pipeline import AnalysisConfig, analyze_images
from vitsem.data.shortcut import ShortcutDataset
ds = ShortcutDataset.load(sys.argv[1])
paths = [ds.root / s.file for s in ds.samples][: int(sys.argv[2])]
model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=6,
                          num_classes=3).eval()
rows = 0
def count(batch):
    global rows
    rows += len(batch)
r = analyze_images(model, paths, AnalysisConfig(batch_size=32), on_rows=count)
assert r.num_images == len(paths) == rows
import os
rss_now = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss_now)
"""


def bench_memory(small: int, large: int, tmp: Path) -> dict[str, float]:
    root = make_shortcut_dataset(tmp / "mem", ShortcutSpec(n_train=large, n_test=0))

    def peak(n: int) -> float:
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(root), str(n)],
                             capture_output=True, text=True, check=True)
        peak_kib, end_kib = out.stdout.strip().splitlines()[-1].split()
        return int(peak_kib) / 1024, int(end_kib) / 1024  # KiB -> MiB

    def with_time(n: int) -> tuple[float, float, float]:
        t = time.perf_counter()
        mb, end = peak(n)
        return mb, end, time.perf_counter() - t

    small_mb, small_end, small_s = with_time(small)
    large_mb, large_end, large_s = with_time(large)
    return {"small_images": small, "large_images": large, "small_peak_mib": small_mb,
            "large_peak_mib": large_mb, "ratio": large_mb / small_mb,
            "small_end_rss_mib": small_end, "large_end_rss_mib": large_end,
            "small_seconds": small_s, "large_seconds": large_s}


HIGHRES_CHILD = """
import resource, sys, numpy as np, torch, timm
from vitsem.method.analysis import InterrelationAnalyzer, SemanticBatch
from vitsem.method.attention import token_layout
mode, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=size).eval()
layout = token_layout(model, (size, size))
x = torch.randn(batch, 3, size, size)
with torch.inference_mode():
    if mode == "plain":
        model(x)
    else:
        c = np.random.default_rng(0).random((batch, layout.grid.num_patches))
        InterrelationAnalyzer(model, layout).run(x, SemanticBatch.from_concentrations(c))
print(layout.num_tokens, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_highres_memory(size: int = 518, batch: int = 16) -> dict[str, float]:
    """Peak RSS of a plain forward and of capture + statistics, each in a fresh process."""
    def peak(mode: str) -> tuple[int, float, float]:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", HIGHRES_CHILD, mode, str(size), str(batch)],
                             capture_output=True, text=True, check=True)
        tokens, kib = out.stdout.strip().splitlines()[-1].split()
        return int(tokens), int(kib) / 1024, time.perf_counter() - t

    tokens, plain_mb, plain_s = peak("plain")
    _, capture_mb, capture_s = peak("capture")
    return {"size": size, "batch": batch, "tokens": tokens, "plain_peak_mib": plain_mb,
            "capture_peak_mib": capture_mb, "ratio": capture_mb / plain_mb,
            "plain_seconds": plain_s, "capture_seconds": capture_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and images")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--only", choices=["capture", "sift", "memory", "highres"], action="append",
                    help="run only these rows (repeatable); default all")
    ap.add_argument("--repeats", type=int, help="timing repeats (default 3 quick, 7 full)")
    args = ap.parse_args()
    rows = set(args.only or ["capture", "sift", "memory", "highres"])
    figures: dict[str, dict[str, float]] = {}
    repeats = args.repeats or (3 if args.quick else 7)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = sample_images(tmp, 128 if args.quick else 256)
        if "capture" in rows:
            figures["capture"] = cap = bench_capture(paths, batch=32, repeats=repeats)
            print(f"(a) plain inference, fused attention : {cap['plain_img_s']:8.1f} img/s "
                  f"(range {cap['plain_img_s_min']:.1f}-{cap['plain_img_s_max']:.1f}; "
                  f"vit_small_patch16_224, batch {cap['batch']}, CPU, {cap['threads']} threads, "
                  f"{cap['repeats']} repeats)")
            print(f"(b) + capture + all statistics       : {cap['capture_stats_img_s']:8.1f} "
                  f"img/s (range {cap['capture_stats_img_s_min']:.1f}-"
                  f"{cap['capture_stats_img_s_max']:.1f})")
            print(f"    ratio (b)/(a) of the medians     : {cap['ratio']:8.3f}   target >= 0.90")
            print(f"    ratio per interleaved pair       : {cap['ratio_pair_median']:8.3f} "
                  f"median, range {cap['ratio_pair_min']:.3f}-{cap['ratio_pair_max']:.3f}"
                  f" (statistics {'fused' if cap['fused'] else 'eager'})")
            print(f"(b') the same, VITSEM_FUSED_STATS=0  : {cap['eager_img_s']:8.1f} img/s; ratio "
                  f"{cap['eager_ratio']:.3f}, per pair {cap['eager_ratio_pair_median']:.3f} "
                  f"median, range {cap['eager_ratio_pair_min']:.3f}-"
                  f"{cap['eager_ratio_pair_max']:.3f} (the eager reference path)")
        if "highres" in rows:
            figures["highres"] = hr = bench_highres_memory()
            print(f"(e) peak RSS, DINOv2-S/14 {hr['size']} px, batch {hr['batch']} "
                  f"({hr['tokens']} tokens), fresh process each:")
            print(f"    plain forward                    : {hr['plain_peak_mib']:8.1f} MiB "
                  f"({hr['plain_seconds']:.0f} s)")
            print(f"    capture + all statistics         : {hr['capture_peak_mib']:8.1f} MiB "
                  f"({hr['capture_seconds']:.0f} s)")
            print(f"    ratio                            : {hr['ratio']:8.3f}   target <= 1.3")
        if "sift" not in rows and "memory" not in rows:  # (c) and (d) run together
            if args.json:
                args.json.write_text(json.dumps(figures, indent=2))
            return
        sift = bench_sift(paths, repeats=2 if args.quick else 3)
        print(f"(c) SIFT, 1 core                     : {sift['one_core_img_s']:8.1f} img/s "
              f"({sift['images']} images at 224 px)")
        print(f"    SIFT, {sift['cores']} cores                    : "
              f"{sift['all_cores_img_s']:8.1f} img/s")
        print(f"    parallel efficiency              : {sift['parallel_efficiency']:8.3f}   "
              "target >= 0.85")
        mem = bench_memory(500, 1000 if args.quick else 5000, tmp)
        print(f"(d) peak RSS, {mem['small_images']} images             : "
              f"{mem['small_peak_mib']:8.1f} MiB ({mem['small_seconds']:.0f} s; "
              f"RSS at the end {mem['small_end_rss_mib']:.1f} MiB)")
        print(f"    peak RSS, {mem['large_images']} images            : "
              f"{mem['large_peak_mib']:8.1f} MiB ({mem['large_seconds']:.0f} s; "
              f"RSS at the end {mem['large_end_rss_mib']:.1f} MiB)")
        print(f"    ratio                            : {mem['ratio']:8.3f}   target <= 1.2")
    if args.json:
        args.json.write_text(json.dumps(figures | {"sift": sift, "memory": mem}, indent=2))


if __name__ == "__main__":
    main()
