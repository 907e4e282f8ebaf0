"""Orchestration timings, each against its baseline measured side by side in one run.

    .venv/bin/python bench/bench_flows.py overhead [--images 1000] [--model vit_small_patch16_224]
    .venv/bin/python bench/bench_flows.py model-audit [--before 1c10dfa] [--after REV] [--repeats 2]

``overhead`` (issue 3): the SIFT + analysis flow against the bare library call on the same
images, model, batch size and machine. The flow run (``attention_analysis``, thread runner)
starts from an empty store and database, so it computes everything; on top of the library's
work it hashes and stores keypoints and statistics, indexes images and keypoint sets in SQL,
writes the report and logs to MLflow. Prefect's API is started before timing.

``model-audit`` (issue 9): the whole ``model_audit`` flow (SIFT extraction, attention analysis,
spurious audit) on the demo's 600 test images and tiny ViT, run by the code of commit
``--before`` and by this checkout, alternately, each in a fresh process and a fresh home
(empty stores, so everything is computed), timed around the flow call after a warm-up flow
has started Prefect's API: wall time, and the CPU time of the flow's process (less sensitive
to other load on a shared machine), alone and with its finished children (the SIFT worker
processes; the Prefect server's own process is not counted). Prints
each run, the ratios after / before of the medians, and the keypoint sets and images indexed
in SQL by each.
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

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]

MODEL_AUDIT_CHILD = """
import json, resource, sqlite3, sys, time
from prefect import flow
import flows.model_audit as m

@flow
def warm_up() -> None:
    return None

warm_up()
params = getattr(m, "ModelAuditParams", None)
if params is None:  # before the architecture issue the flow took the analysis parameters
    from flows.attention_analysis import AnalysisParams as params
def children() -> float:  # finished children: the SIFT worker processes, reaped with the pool
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
t, cpu, kids = time.perf_counter(), time.process_time(), children()
out = m.model_audit(params(data=sys.argv[1], checkpoint=sys.argv[2]))
seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
cpu_seconds_all = cpu_seconds + children() - kids
db = sqlite3.connect(sys.argv[3])
count = lambda q: db.execute(q).fetchone()[0]
print("RESULT " + json.dumps({
    "seconds": seconds, "cpu_seconds": cpu_seconds, "cpu_seconds_all": cpu_seconds_all,
    "images": count("SELECT count(DISTINCT sha256) FROM images WHERE status = 'ok'"),
    "keypoint_sets": count("SELECT count(*) FROM keypoint_sets"),
    "running": count("SELECT count(*) FROM flow_runs WHERE status = 'running'"),
    "shortcuts": (out.get("spurious_audit") or {}).get("shortcuts"),
    "analysed": out["attention_analysis"]["images"]}))
"""


def _overhead(args: argparse.Namespace) -> None:
    import timm

    from flows.attention_analysis import AnalysisParams, attention_analysis
    from vitsem.data.shortcut import ShortcutDataset, ShortcutSpec, make_shortcut_dataset
    from vitsem.method.models import ModelSpec, load_model, save_checkpoint
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


DEFAULT_MODEL_CHILD = """
import pathlib, sys
try:
    from vitsem.data.defaults import ensure_default_model
except ImportError:  # before the architecture issue
    from vitsem.cli import ensure_default_model
data, ckpt = ensure_default_model(pathlib.Path(sys.argv[1]))
print("RESULT", data, ckpt)
"""


def _default_model(code: Path, home: Path) -> tuple[Path, Path]:
    """The demo's benchmark and tiny ViT as made by the code in ``code`` (the baseline's: a
    later generator writes manifest fields an earlier reader refuses)."""
    proc = subprocess.run([sys.executable, "-c", DEFAULT_MODEL_CHILD, str(home)], cwd=code,
                          env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the default model in {code} failed:\n{proc.stderr[-3000:]}")
    data, ckpt = lines[-1].split()[1:]
    return Path(data), Path(ckpt)


def _checkout(commit: str, dest: Path) -> Path:
    """The tree of ``commit`` exported into ``dest`` (no git state is changed)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _model_audit_once(code: Path, data: Path, ckpt: Path, home: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code), "VITSEM_HOME": str(home),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI",
                "PREFECT_API_URL"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", MODEL_AUDIT_CHILD, str(data), str(ckpt),
                           str(home / "vitsem.db")], env=env, cwd=code, capture_output=True,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"model_audit in {code} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def _model_audit(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vitsem-bench-audit-"))
    cache = Path(args.cache) if args.cache else tmp / "default"
    trees = {"before": _checkout(args.before, tmp / "before"),
             "after": _checkout(args.after, tmp / "after") if args.after else ROOT}
    data, ckpt = _default_model(trees["before"], cache)  # the demo's benchmark and tiny ViT
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(args.repeats):
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
            r = _model_audit_once(trees[name], data.resolve(), ckpt.resolve(),
                                  tmp / f"home-{name}-{i}")
            runs[name].append(r)
            print(f"run {i + 1} {name:6s}: {r['seconds']:7.1f} s wall, {r['cpu_seconds']:7.1f} s "
                  f"CPU in the flow's process, {r['cpu_seconds_all']:7.1f} s with its SIFT "
                  f"workers; images {r['images']:.0f}, "
                  f"keypoint sets {r['keypoint_sets']:.0f}, flow_runs left running "
                  f"{r['running']:.0f}, confirmed shortcuts {r['shortcuts']}", flush=True)
    print(f"model_audit on {runs['after'][0]['analysed']:.0f} images, {os.cpu_count()} cores, "
          f"{args.repeats} runs each (medians); before = {args.before}")
    for key, what in (("seconds", "wall"), ("cpu_seconds", "CPU (the flow's process)"),
                      ("cpu_seconds_all", "CPU (+ SIFT workers)")):
        med = {k: statistics.median(r[key] for r in v) for k, v in runs.items()}
        print(f"{what:25s}: before {med['before']:7.1f} s, after {med['after']:7.1f} s, "
              f"ratio after / before {med['after'] / med['before']:.3f}   (issue 9 expects <= 0.8)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="bench", required=True)
    over = sub.add_parser("overhead", help="attention_analysis flow vs the bare library call")
    over.add_argument("--images", type=int, default=1000)
    over.add_argument("--model", default="vit_small_patch16_224")
    audit = sub.add_parser("model-audit", help="model_audit: a past commit vs this checkout")
    audit.add_argument("--before", default="1c10dfa", help="commit to compare against")
    audit.add_argument("--after", help="commit to measure instead of this working tree")
    audit.add_argument("--repeats", type=int, default=2)
    audit.add_argument("--cache", help="home with the default benchmark and model (made once)")
    args = ap.parse_args()
    {"overhead": _overhead, "model-audit": _model_audit}[args.bench](args)


if __name__ == "__main__":
    main()
