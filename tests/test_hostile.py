"""Hostile input, as an attacker would send it: checkpoints whose embedded spec asks for too
much or for files, poisoned weights, a folder of over 60 hostile entries (injection names,
names that are not UTF-8, links out of the folder, loops, FIFOs, truncated and oversized
images) mixed with good images through ``sift``, ``analyze`` and ``audit``, and every
user-controlled string checked where it is shown (Prefect artifacts, the HTML report)."""

from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tests.hostile import HOSTILE_NAMES, HostileFolder, make_hostile_folder
from vitsem.cli import app
from vitsem.data.inputs import resolve_inputs
from vitsem.errors import CheckpointError
from vitsem.method.images import open_image
from vitsem.method.models import (
    SPEC_METADATA_KEY,
    ModelSpec,
    load_model,
    read_checkpoint_spec,
    save_checkpoint,
)
from vitsem.paths import path_from_text, path_text
from vitsem.render.markdown import findings_markdown, summary_markdown

EVIL_CLASSES = ["<img src=x onerror=alert(1)>", "a|b|c", "[x](javascript:alert(1))"]
"""Class names of the hostile checkpoint (also its class folders)."""


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _tiny_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    spec = ModelSpec("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1,
                                              "num_classes": 2}, ["a", "b"])
    net = load_model(spec.name, img_size=32, patch_size=8, depth=1, num_classes=2)[0]
    return json.loads(spec.to_json()), {k: v.contiguous() for k, v in net.state_dict().items()}


def _write(path: Path, state: dict[str, torch.Tensor], spec_text: str) -> Path:
    save_file(state, str(path), metadata={SPEC_METADATA_KEY: spec_text})
    return path


HOSTILE_SPECS: dict[str, tuple[Any, str]] = {
    "depth 10000": ({"kwargs": {"depth": 10000}}, r"depth=10000 is out of bounds \[1, 48\]"),
    "img_size 10**6": ({"kwargs": {"img_size": 10**6}}, r"img_size=1000000 is out of bounds"),
    "checkpoint_path": ({"kwargs": {"checkpoint_path": "/etc/passwd"}},
                        r"\['checkpoint_path'\] are not allowed \(file paths"),
    "pretrained_cfg_overlay": ({"kwargs": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}},
                               r"not allowed"),
    "list kwargs": ({"kwargs": [1, 2]}, r"kwargs must be an object"),
    "list depth": ({"kwargs": {"depth": [1, 2]}}, r"depth=\[1, 2\] is not an integer"),
    "bool depth": ({"kwargs": {"depth": True}}, r"depth=True is not an integer"),
    "too many tokens": ({"kwargs": {"img_size": 1024, "patch_size": 4}},
                        r"65,536 patch tokens per image; at most 16,384"),
    "too many parameters": ({"kwargs": {"depth": 48, "embed_dim": 2048, "num_heads": 16}},
                            r"parameters; at most 1,000,000,000"),
    "not a ViT": ({"name": "resnet50"}, r"'resnet50', not a known Vision Transformer"),
    "no name": ({"name": None}, r"names no architecture"),
    "bad global_pool": ({"kwargs": {"global_pool": "exec"}}, r"global_pool='exec' is not one"),
    "class names": ({"class_names": [{"x": 1}]}, r"class_names must be a list"),
    "extra field": ({"loader": "pickle"}, r"unknown fields \['loader'\]"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SPECS))
def test_hostile_specs_are_refused_before_any_model_is_built(case: str, tmp_path: Path) -> None:
    good, state = _tiny_state()
    change, message = HOSTILE_SPECS[case]
    spec = {**good, **{k: v for k, v in change.items() if k != "kwargs"}}
    if "kwargs" in change:
        kw = change["kwargs"]
        spec["kwargs"] = {**good["kwargs"], **kw} if isinstance(kw, dict) else kw
    path = _write(tmp_path / "h.safetensors", state, json.dumps(spec))
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(checkpoint=path)
    print(f"{case}: {err.value}")
    assert str(path) in str(err.value)
    assert time.perf_counter() - t < 20  # refused from the spec, nothing of that size built


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"vit"', "{" * 5000 + "}" * 5000])
def test_malformed_spec_json_is_a_checkpoint_error(text: str, tmp_path: Path) -> None:
    _, state = _tiny_state()
    with pytest.raises(CheckpointError, match="embedded model spec"):
        read_checkpoint_spec(_write(tmp_path / "m.safetensors", state, text))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_weights_with_nan_or_inf_are_refused(value: float, tmp_path: Path) -> None:
    good, state = _tiny_state()
    state["head.weight"] = state["head.weight"].clone()
    state["head.weight"][0, 0] = value
    path = _write(tmp_path / "w.safetensors", state, json.dumps(good))
    with pytest.raises(CheckpointError, match=r"1 weight tensor\(s\) hold NaN or infinite "
                                              r"values \(head.weight\)"):
        load_model(checkpoint=path)
    state["head.weight"][0, 0] = 0.0
    _write(path, state, json.dumps(good))
    assert load_model(checkpoint=path)[1].class_names == ["a", "b"]


def test_cli_hostile_checkpoint_is_one_line_and_exit_2(tmp_path: Path) -> None:
    good, state = _tiny_state()
    spec = {**good, "kwargs": {**good["kwargs"], "depth": 10000}}
    ckpt = _write(tmp_path / "h.safetensors", state, json.dumps(spec))
    img = tmp_path / "imgs"
    img.mkdir()
    for cmd in ("sift", "analyze"):
        result = CliRunner().invoke(app, [cmd, str(img), "--checkpoint", str(ckpt), "--out",
                                          str(tmp_path / cmd)])
        print(cmd, result.exit_code, result.output)
        assert result.exit_code == 2
        assert "error:" in result.output and "depth=10000 is out of bounds" in result.output
        assert "Traceback" not in result.output


@pytest.mark.usefixtures("prefect_api")
def test_checkpoint_error_in_a_flow_is_attempted_once(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.common import DataParams
    from flows.sift_extraction import sift_extraction

    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    good, state = _tiny_state()
    ckpt = _write(tmp_path / "h.safetensors", state, json.dumps({**good, "name": None}))
    folder = tmp_path / "imgs"
    folder.mkdir()
    state_ = sift_extraction(DataParams(data=str(folder), checkpoint=str(ckpt)),
                             return_state=True)
    assert state_.is_failed()
    with pytest.raises(CheckpointError, match="names no architecture"):
        state_.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state_.state_details.flow_run_id])))
    register = [r for r in runs if r.name.startswith("register_inputs")]
    print({r.name: (r.run_count, r.state_name) for r in runs})
    assert len(register) == 1 and register[0].run_count == 1  # no retry of a bad checkpoint
    assert register[0].state_name == "Failed"


# ---------------------------------------------------------------------------------------------
# Files


def test_path_text_is_reversible_and_valid_utf8() -> None:
    for p in ["/d/a.png", "/d/caf\udce9.png", "/d/\udcff\udcfe", "file:///x", "/d/%41.png",
              "/d/été 🙂.png"]:
        text = path_text(p)
        text.encode("utf-8")  # always valid
        assert path_from_text(text) == p
    assert path_text("/d/caf\udce9.png") == "file:///d/caf%E9.png"
    assert path_text("/d/été.png") == "/d/été.png"  # a valid name is itself


@pytest.fixture(scope="module")
def hostile(small_dataset: Path, small_checkpoint: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[HostileFolder, Path]:
    """The hostile folder (class folders named after the hostile checkpoint's classes) and
    that checkpoint: the small model re-saved with hostile class names."""
    base = tmp_path_factory.mktemp("hostile")
    net, spec = load_model(checkpoint=small_checkpoint)
    evil = ModelSpec(spec.name, spec.kwargs, EVIL_CLASSES)
    ckpt = save_checkpoint(net, evil, base / "evil.safetensors")
    # The data folder's own name is hostile too: it is shown in the report and summaries.
    root = base / "data <i onmouseover=alert(1)>x [y](javascript:alert(1)) |"
    sources = sorted((small_dataset / "images" / "test").glob("*.png"))[:6]
    return make_hostile_folder(root, sources, EVIL_CLASSES, base / "outside"), ckpt


def _rejected_of(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {path_from_text(r["path"]): r["reason"] for r in rows}


def test_every_entry_is_processed_or_rejected_with_a_reason(
        hostile: tuple[HostileFolder, Path]) -> None:
    hf, _ = hostile
    print(f"{len(hf.good)} good images, {len(hf.bad)} bad entries, {hf.hostile} hostile")
    assert hf.hostile >= 60
    found = resolve_inputs(hf.root)
    assert found.labelled and found.class_names == sorted(EVIL_CLASSES)
    entry_level = {r.path: r.reason for r in found.rejected}
    decoder_level = {p: r for p, r in hf.bad.items() if p not in entry_level}
    for p, reason in entry_level.items():
        assert hf.bad.get(p) == reason, (p, reason)
    # The scan passes on the good images and the image files the decoder must refuse.
    assert set(found.paths) == set(hf.good) | set(decoder_level)
    for p, reason in decoder_level.items():
        with pytest.raises(Exception) as err:
            open_image(p)
        assert getattr(err.value, "reason", None) == reason, (p, err.value)
    # The nested image is labelled by its first-level folder; nothing escapes the folder.
    nested = next(it for it in found.items if it.path.endswith("g-nested.png"))
    assert nested.label == EVIL_CLASSES[0]
    assert all(Path(p).resolve().is_relative_to(hf.root.resolve()) for p in found.paths)


def _markdown_is_inert(md: str) -> None:
    assert "<img" not in md and "<script" not in md and "<b>" not in md and "<i " not in md
    assert "](javascript" not in md
    columns, previous = 0, ""
    for line in md.splitlines():
        if line.startswith("|"):  # every row of a table has its header's columns, none more
            cells = len(re.split(r"(?<!\\)\|", line))
            if not previous.startswith("|"):
                columns = cells
            assert cells == columns, line
        previous = line


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


@pytest.mark.usefixtures("prefect_api")
def test_hostile_folder_through_sift_analyze_and_audit(
        hostile: tuple[HostileFolder, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.attention_analysis import AnalysisParams, attention_analysis
    from vitsem.platform.settings import Settings

    hf, ckpt = hostile
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    good = {str(Path(p)) for p in hf.good}
    runner = CliRunner()
    for cmd in ("sift", "analyze", "audit"):
        t = time.perf_counter()
        out = tmp_path / cmd
        extra = [] if cmd == "audit" else ["--workers", "1"]
        result = runner.invoke(app, [cmd, str(hf.root), "--checkpoint", str(ckpt), "--out",
                                     str(out), *extra])
        print(cmd, result.exit_code, f"{time.perf_counter() - t:.0f} s", result.output[-600:])
        assert result.exit_code == 0, result.output
        rejected = _rejected_of(out / "rejected.jsonl")
        assert rejected == hf.bad  # every bad entry, with its reason; no good image
    # Every good image processed, with a name that round-trips (Parquet holds valid text).
    table = pq.read_table(tmp_path / "analyze" / "per_image.parquet").to_pylist()
    assert {path_from_text(r["path"]) for r in table} == good
    sift_table = pq.read_table(tmp_path / "sift" / "images.parquet")
    assert sift_table.column_names == ["path", "num_keypoints", "semantic_patches",
                                       "concentration"]
    assert {path_from_text(p) for p in sift_table.column("path").to_pylist()} == good
    kp_paths = pq.read_table(tmp_path / "sift" / "keypoints.parquet").column("path")
    assert {path_from_text(p) for p in kp_paths.to_pylist()} <= good
    doc = json.loads((tmp_path / "analyze" / "stats.json").read_text())
    assert doc["num_images"] == len(good) and doc["num_rejected"] == len(hf.bad)
    audit_rows = [json.loads(x) for x in (tmp_path / "audit" / "images.jsonl").read_text()
                  .splitlines()]
    assert len(audit_rows) == len(good)
    # The HTML report: hostile folder and class names are text, never markup.
    page = (tmp_path / "audit" / "report.html").read_text()
    parser = _Tags()
    parser.feed(page)
    assert not [t for t, a in parser.tags if t == "script" or any(k.startswith("on") for k in a)]
    assert not [a for t, a in parser.tags if t == "a" and "javascript" in str(a.get("href"))]
    assert "&lt;i onmouseover=alert(1)&gt;x" in page and "<i onmouseover" not in page
    assert not [a for t, a in parser.tags if t == "img" and a.get("src") == "x"]

    # The flows: SQL rows and the Prefect artifacts of a run on the same folder.
    state = attention_analysis(AnalysisParams(data=str(hf.root), checkpoint=str(ckpt),
                                              shard_size=16, examples=2), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert summary["images"] == len(good) and summary["rejected"] == len(hf.bad)
    eng = sa.create_engine(Settings().resolved_database_url())
    with eng.connect() as c:
        rows = dict(c.execute(sa.text("SELECT path, status FROM images")).all())
    eng.dispose()
    assert {path_from_text(p) for p, s in rows.items() if s == "ok"} == good
    assert {path_from_text(p) for p, s in rows.items() if s == "rejected"} == set(hf.bad)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    # keyed per model (``attention-analysis-summary-<model>``), so match the kind
    md = next(a.data for a in artifacts
              if (a.key or "").startswith("attention-analysis-summary"))
    assert isinstance(md, str) and "Rejected images" in md
    _markdown_is_inert(md)
    assert "&lt;" in md  # hostile names are shown, as text


def test_markdown_helpers_escape_hostile_strings() -> None:
    rejected = [{"path": f"/d/{n}.png", "reason": "truncated", "detail": n}
                for n in HOSTILE_NAMES]
    md = summary_markdown("run <b>x</b>", {"data": "[x](javascript:alert(1))", "n": 3},
                          rejected)
    _markdown_is_inert(md)
    finding = {"rank": 1, "class_name": EVIL_CLASSES[0], "recurrence": 0.5, "other_rate": 0.1,
               "effect": 0.2, "random_effect": 0.01, "p_value": 0.001, "shortcut": True,
               "confirmed": True, "confidence": 0.9, "verdict": "shortcut",
               "verdict_label": "shortcut"}
    md = findings_markdown({"findings": {"semantic": [finding]}, "prompts": {
        "none": {"accuracy": 0.5, "worst_group": "a|b|c", "worst_group_accuracy": 0.1}},
        "notes": ["<script>alert(1)</script>"]}, "s3://b/<img src=x>", [])
    _markdown_is_inert(md)
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in md  # the class, as text
