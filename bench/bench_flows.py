"""Orchestration overhead (issue 3): the SIFT + analysis flow against the bare library call
on the same images, model, batch size and machine, measured side by side in one run.

    .venv/bin/python bench/bench_flows.py [--images 1000] [--model vit_small_patch16_224]

The flow run (``attention_analysis``, thread runner: SIFT for every image, then the analysis,
shard by shard) starts from an empty artifact store and database, so it computes everything;
on top of the library's work it hashes and stores keypoints and statistics, indexes images
and keypoint sets in SQL, writes the report and logs to MLflow. Prefect's API is started
before timing (a warm service, as in production).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--model", default="vit_small_patch16_224")
    args = ap.parse_args()

    import timm

    from vitsem.data.shortcut import ShortcutDataset, ShortcutSpec, make_shortcut_dataset
    from vitsem.method.models import ModelSpec, save_checkpoint
    from vitsem.method.pipeline import AnalysisConfig, analyze_images

    tmp = Path(tempfile.mkdtemp(prefix="vitsem-bench-"))
    os.environ["VITSEM_HOME"] = str(tmp / "home")
    data = make_shortcut_dataset(tmp / "data", ShortcutSpec(image_size=224, n_train=0,
                                                           n_test=args.images))
    spec = ModelSpec(args.model, {"num_classes": 3})
    ckpt = save_checkpoint(timm.create_model(args.model, num_classes=3).eval(), spec,
                           tmp / "model.safetensors")
    paths = list(ShortcutDataset.load(data).paths("test"))

    from prefect import flow

    from flows.attention_analysis import AnalysisParams, attention_analysis
    from vitsem.method.models import load_model

    @flow
    def warm_up() -> None:
        return None

    warm_up()  # start the API before timing

    t = time.perf_counter()
    model, _ = load_model(checkpoint=ckpt)
    lib = analyze_images(model, paths, AnalysisConfig(batch_size=32, num_examples=0))
    bare = time.perf_counter() - t
    assert lib.num_images == args.images

    t = time.perf_counter()
    out = attention_analysis(AnalysisParams(data=str(data), checkpoint=str(ckpt), examples=0))
    flowed = time.perf_counter() - t
    assert out["images"] == args.images and out["computed"] == args.images

    print(f"images                      : {args.images} ({args.model}, 224 px, CPU, "
          f"{os.cpu_count()} cores)")
    print(f"bare library call           : {bare:8.1f} s  ({args.images / bare:.1f} img/s)")
    print(f"attention_analysis flow     : {flowed:8.1f} s  ({args.images / flowed:.1f} img/s)")
    print(f"overhead ratio flow / bare  : {flowed / bare:8.3f}   target <= 1.15")


if __name__ == "__main__":
    main()
