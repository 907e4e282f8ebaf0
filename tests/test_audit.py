"""The spurious-correlation audit: scores on hand-built cases, the audit on a model that
provably relies on a planted glyph, the flow end to end on the platform, and bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from vitsem.audit.benchmark import AUDIT_SIFT, auroc, is_planted, load_benchmark
from vitsem.audit.discovery import discover_candidates
from vitsem.audit.pipeline import (
    AuditConfig,
    AuditData,
    assemble,
    audit,
    audit_map,
    maps_to_audit,
    prepare,
)
from vitsem.audit.prompting import keep_top_k, prompt_outcome
from vitsem.audit.verdicts import Verdict
from vitsem.data.inputs import labelled_images
from vitsem.errors import AuditInputError
from vitsem.method.attention import token_layout
from vitsem.method.keypoints import detect_sift
from vitsem.method.models import load_model, save_checkpoint
from vitsem.method.training import group_accuracy, predict_labels
from vitsem.method.view import ModelView
from vitsem.render.audit_report import write_report

# ---------------------------------------------------------------------------------------------
# Scores on hand-built cases


def test_auroc_equals_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    positive = rng.uniform(size=40) < 0.4
    pos, neg = scores[positive], scores[~positive]
    literal = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])
    assert auroc(scores, positive) == pytest.approx(literal)
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([False, False, True, True])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([False, False, True, True])) == 0.0
    assert np.isnan(auroc(np.ones(3), np.ones(3, bool)))


def test_group_accuracy_and_prompt_outcome_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 1, 0])
    groups = ["a|glyph", "a|no", "b|glyph", "b|glyph", "b|no", "a|no"]
    base = np.array([0, 1, 0, 0, 1, 0])
    prompted = np.array([0, 1, 1, 0, 1, 0])
    assert group_accuracy(base, labels, groups) == {"a|glyph": 1.0, "a|no": 0.5,
                                                    "b|glyph": 0.0, "b|no": 1.0}
    clean = np.array([False, True, False, False, True, True])
    removed = np.zeros((6, 4), bool)
    removed[2:4, :2] = True
    out = prompt_outcome(prompted, base, labels, groups, clean, removed)
    assert out.accuracy == pytest.approx(4 / 6)
    assert out.worst_group == "a|no" and out.worst_group_accuracy == 0.5
    assert out.group_accuracy["b|glyph"] == 0.5
    assert out.clean_accuracy == pytest.approx(2 / 3)
    assert out.removed_per_image == pytest.approx(4 / 6)
    assert out.changed == pytest.approx(1 / 6)


def test_keep_top_k_keeps_the_most_semantic_patches() -> None:
    w = np.array([[0.1, 0.5, 0.0, 0.4], [0.0, 0.0, 0.0, 0.0]])
    drop = keep_top_k(w, 2)
    np.testing.assert_array_equal(drop, [[True, False, True, False],
                                         [False, False, False, False]])  # no keypoints: keep all


def _pattern_images(share_in_others: float, seed: int = 0
                    ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """40 images on a 4x4 grid, classes 0/1 alternating. Every class-0 image holds a two-part
    'glyph': descriptor A at patch 0 and descriptor B at the adjacent patch 1, both highly
    attended; ``share_in_others`` of class-1 images hold it too."""
    rng = np.random.default_rng(seed)
    part_a, part_b = rng.normal(0, 5, 128), rng.normal(0, 5, 128)
    predicted = np.array([0, 1] * 20)
    attention = rng.uniform(0.5, 1.0, (40, 16))
    descs, patches = [], []
    others = np.flatnonzero(predicted == 1)[: round(share_in_others * 20)]
    for i in range(40):
        d = rng.normal(0, 5, (6, 128))
        p = rng.integers(4, 16, 6)
        if predicted[i] == 0 or i in others:
            d = np.vstack([d, part_a + rng.normal(0, 0.1, 128), part_b + rng.normal(0, 0.1, 128)])
            p = np.append(p, [0, 1])
            attention[i, :2] = 6.0
        descs.append(d)
        patches.append(p)
    return descs, patches, attention / attention.sum(1, keepdims=True), predicted


def test_parts_of_one_glyph_merge_into_one_candidate() -> None:
    descs, patches, attention, predicted = _pattern_images(share_in_others=0.0)
    cands = discover_candidates(descs, patches, attention, predicted, top_fraction=0.125,
                                grid_hw=(4, 4))
    assert len(cands) == 1
    top = cands[0]
    assert top.cls == 0 and top.recurrence == 1.0 and top.other_rate == 0.0
    assert len(top.centroids) == 2  # parts A and B, merged
    expected = np.zeros((40, 16), bool)
    expected[predicted == 0, :2] = True
    np.testing.assert_array_equal(top.patches, expected)


def test_enrichment_decides_whether_a_shared_pattern_is_a_candidate() -> None:
    # In 25% of the other class (decorrelated test data): 4x enriched, still a candidate.
    descs, patches, attention, predicted = _pattern_images(share_in_others=0.25)
    cands = discover_candidates(descs, patches, attention, predicted, top_fraction=0.125,
                                grid_hw=(4, 4))
    assert cands and cands[0].other_rate == 0.25
    # In 75% of the other class: not class-specific, no candidate of class 0.
    descs, patches, attention, predicted = _pattern_images(share_in_others=0.75)
    cands = discover_candidates(descs, patches, attention, predicted, top_fraction=0.125,
                                grid_hw=(4, 4))
    assert not [c for c in cands if c.cls == 0]


# ---------------------------------------------------------------------------------------------
# The audit on a model that relies on the planted glyph


def test_audit_finds_confirms_and_prompts_away_the_planted_shortcut(
        shortcut_data: Path, shortcut_model: Path, tmp_path: Path) -> None:
    net, _ = load_model(None, shortcut_model)
    view = ModelView.from_model(net)
    bench = load_benchmark(shortcut_data, "test", view, token_layout(net, view.hw).grid)
    result = audit(net, view, bench.data, AuditConfig(maps=("semantic", "cls_last", "random")))
    assert result.status == "ok"
    top = result.maps["semantic"].top
    assert top is not None and top.shortcut and top.class_name == "disc"
    assert is_planted(top, bench.truth, shortcut_class=0)
    assert top.causal.effect - top.causal.random_effect > 0.2 and top.causal.p_value < 1e-3
    assert auroc(result.maps["semantic"].reliance, ~bench.data.clean) > 0.95
    assert not result.maps["random"].shortcuts
    pred = predict_labels(net, view.to_tensor(bench.data.views)).numpy()
    own = (pred == bench.data.labels).mean()
    assert result.prompts["none"].accuracy == pytest.approx(own)  # the model's own accuracy
    # Removing the glyph's tokens helps the glyph groups the shortcut misleads, and leaves
    # glyph-free images alone.
    before, after = result.prompts["none"], result.prompts["drop:semantic"]
    for group in ("square|glyph", "triangle|glyph"):
        assert after.group_accuracy[group] > before.group_accuracy[group] + 0.2
    assert after.accuracy > before.accuracy
    assert after.clean_accuracy == pytest.approx(before.clean_accuracy)
    files = write_report(result, bench.data, tmp_path / "report", {"model": "tiny"})
    names = {f.name for f in files}
    assert {"report.html", "audit.json", "images.jsonl", "prompting.png"} <= names
    assert any(n.startswith("finding_semantic_") for n in names)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<b>shortcut</b>" in html and "finding_semantic_1.png" in html
    assert "What this method cannot see" in html and "faithfulness.png" in html
    doc = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert doc["findings"]["semantic"][0]["shortcut"] is True
    assert doc["findings"]["semantic"][0]["verdict"] == "shortcut"
    assert set(doc["faithfulness"]) == {"semantic", "cls_last", "random"}
    assert doc["repairs"] == {}  # no held-out data given
    # The semantic map ranks the tokens the model uses before the random map does.
    assert doc["faithfulness"]["semantic"]["abpc"] > doc["faithfulness"]["random"]["abpc"]


def test_audit_without_masks_reviews_and_repairs_from_its_findings(
        shortcut_data: Path, shortcut_model: Path, tmp_path: Path) -> None:
    """No object masks: the glyph is 'relied on — review'. Half of the decorrelated split is
    held out for the last-layer repair, whose pseudo-groups come from the finding."""
    net, spec = load_model(None, shortcut_model)
    view = ModelView.from_model(net)
    bench = load_benchmark(shortcut_data, "test", view, token_layout(net, view.hw).grid)
    d = bench.data
    half = len(d) // 2
    part = partial(_unmasked, d)
    cfg = AuditConfig(maps=("semantic",), faithfulness_images=32)
    result = audit(net, view, part(slice(0, half)), cfg, heldout=part(slice(half, None)))
    top = result.maps["semantic"].top
    assert top is not None and top.verdict is Verdict.REVIEW and not top.shortcut
    assert top.summary()["patches_per_image"] >= top.summary()["seed_patches_per_image"]
    assert set(result.repairs) == {"none", "dfr:pseudo", "dfr:class", "dfr:oracle"}
    floor, pseudo = result.repairs["none"], result.repairs["dfr:pseudo"]
    assert pseudo.worst_group_accuracy > floor.worst_group_accuracy
    assert np.isfinite(pseudo.gap_closed)
    # The repaired model is a normal timm model: saved and loaded like any checkpoint.
    again, _ = load_model(None, save_checkpoint(result.repaired_models["dfr:pseudo"], spec,
                                                tmp_path / "rep.safetensors"))
    pred = predict_labels(again, view.to_tensor(d.views[:half])).numpy()
    assert (pred == d.labels[:half]).mean() == pytest.approx(pseudo.accuracy)
    files = write_report(result, part(slice(0, half)), tmp_path / "r", {})
    assert "relied on — review" in files[-1].read_text() and "repairs.png" in {
        f.name for f in files}
    doc = json.loads((tmp_path / "r" / "audit.json").read_text())
    assert doc["repairs"]["dfr:pseudo"]["gap_closed"] == pytest.approx(pseudo.gap_closed)
    # Re-audit the repaired model: the glyph's removal hurts it less than it hurt the floor.
    again = audit(again, view, part(slice(0, half)), cfg)
    assert again.prompts["none"].accuracy == pytest.approx(pseudo.accuracy)
    after = again.maps["semantic"].top
    before = top.causal.effect - top.causal.random_effect
    assert after is None or after.causal.effect - after.causal.random_effect < before
    assert doc["findings"]["semantic"][0]["verdict_label"] == "relied on — review"


def _unmasked(d: AuditData, sl: slice) -> AuditData:
    """Images ``sl`` of ``d`` without their object masks, as a user's data comes."""
    return AuditData(d.views[sl], d.keypoints[sl], d.labels[sl], d.class_names,
                     (d.groups or [])[sl], None, d.clean[sl] if d.clean is not None else None,
                     (d.names or [])[sl])


def test_repair_from_a_finding_known_only_by_its_place(
        shortcut_data: Path, shortcut_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pattern found by its place (no descriptors: a cue without keypoints) still yields
    pseudo-groups: a held-out image holds it where the map ranks one of its places top. The
    glyph sits at one place, so those pseudo-groups must be the glyph's true presence."""
    import vitsem.audit.pipeline as pipeline

    net, _ = load_model(None, shortcut_model)
    view = ModelView.from_model(net)
    d = load_benchmark(shortcut_data, "test", view, token_layout(net, view.hw).grid).data
    half = len(d) // 2
    audited, held = _unmasked(d, slice(0, half)), _unmasked(d, slice(half, None))
    cfg = AuditConfig(maps=("semantic",), faithfulness_images=0)
    result = audit(net, view, audited, cfg)
    m = result.maps["semantic"]
    assert m.relied and m.relied[0].class_name == "disc"
    # The same finding as a place-only one: what recurring_positions proposes.
    m.findings = [replace(f, centroids=np.zeros((0, 128), np.float32), radii=np.zeros(0))
                  for f in m.findings]
    seen: dict[str, np.ndarray] = {}
    real = pipeline.repair_last_layer

    def spy(*args: object, **kwargs: object) -> object:
        seen["present"] = np.asarray(args[3])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "repair_last_layer", spy)
    pipeline.repair_audit(net, view, audited, result, held, cfg)
    glyph = ~np.asarray(held.clean)
    assert (seen["present"] == glyph).mean() >= 0.9, (seen["present"], glyph)
    floor, pseudo = result.repairs["none"], result.repairs["dfr:pseudo"]
    assert pseudo.worst_group_accuracy > floor.worst_group_accuracy
    assert result.reaudit["method"] == "dfr:pseudo"


def test_repair_with_an_empty_group_keeps_the_audit(shortcut_data: Path,
                                                    shortcut_model: Path) -> None:
    """Held-out images all of glyph groups: nothing to balance; the audit stays, with why."""
    net, _ = load_model(None, shortcut_model)
    view = ModelView.from_model(net)
    d = load_benchmark(shortcut_data, "test", view, token_layout(net, view.hw).grid).data
    glyph = ~np.asarray(d.clean)
    held = AuditData(d.views[glyph], [k for k, g in zip(d.keypoints, glyph, strict=True) if g],
                     d.labels[glyph], d.class_names)
    result = audit(net, view, d, AuditConfig(maps=("semantic",), faithfulness_images=0),
                   heldout=held)
    assert result.maps["semantic"].relied and result.repairs == {}
    assert any("repair skipped" in n and "hold no image" in n for n in result.notes)


def test_audit_equals_its_pieces_computed_apart_in_any_order(
        few_images: Path, small_checkpoint: Path) -> None:
    """What a distributed run does: each map audited on its own prepared inputs (as another
    process would), the results pickled (Dask's transport) and handed over in reverse order,
    then assembled. The same result as the one-process audit, byte for byte."""
    net, _ = load_model(None, small_checkpoint)
    view = ModelView.from_model(net)
    data = load_benchmark(few_images, "test", view, token_layout(net, view.hw).grid).data
    # Few candidates and trials: the test is about the split, not the figures.
    cfg = AuditConfig(maps=("semantic", "gae", "random"), faithfulness_images=4,
                      max_checked=1, causal_trials=2, grow_rings=1, grow_trials=1)
    whole = audit(net, view, data, cfg, family="tiny")
    assert any(m.findings for m in whole.maps.values()) and set(whole.faithfulness) == set(
        cfg.maps)
    assert maps_to_audit(net, view, data, cfg) == cfg.maps
    apart = {name: pickle.loads(pickle.dumps(audit_map(net, prepare(net, view, data, cfg), cfg,
                                                       name)))
             for name in reversed(cfg.maps)}
    pieces = assemble(net, view, data, prepare(net, view, data, cfg), apart, cfg,
                      family="tiny")
    assert list(pieces.maps) == list(whole.maps) == list(cfg.maps)
    assert json.dumps(pieces.summary()) == json.dumps(whole.summary())
    for name in cfg.maps:
        assert np.array_equal(pieces.maps[name].attribution, whole.maps[name].attribution)
        assert np.array_equal(pieces.maps[name].reliance, whole.maps[name].reliance)
    with pytest.raises(ValueError, match="results of maps"):
        assemble(net, view, data, prepare(net, view, data, cfg),
                 {k: v for k, v in apart.items() if k != "semantic"}, cfg)


# ---------------------------------------------------------------------------------------------
# Bad input


def _tiny_data(views: np.ndarray, labels: list[int], names: list[str]) -> AuditData:
    return AuditData(views=views, keypoints=[detect_sift(v, AUDIT_SIFT) for v in views],
                     labels=np.array(labels), class_names=names)


def test_one_class_and_mismatched_classes_are_clear_errors(shortcut_model: Path) -> None:
    net, spec = load_model(None, shortcut_model)
    view = ModelView.from_model(net)
    views = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(AuditInputError, match="one class"):
        audit(net, view, _tiny_data(views, [1, 1, 1, 1], spec.class_names or []))
    with pytest.raises(AuditInputError, match="3 output classes but the labels name 2"):
        audit(net, view, _tiny_data(views, [0, 1, 0, 1], ["cat", "dog"]))


def test_images_without_keypoints_give_nothing_to_report(shortcut_model: Path,
                                                         tmp_path: Path) -> None:
    net, spec = load_model(None, shortcut_model)
    view = ModelView.from_model(net)
    views = np.full((6, 64, 64, 3), 128, np.uint8)  # flat grey: SIFT finds nothing
    data = _tiny_data(views, [0, 1, 2, 0, 1, 2], spec.class_names or [])
    assert all(len(k) == 0 for k in data.keypoints)
    result = audit(net, view, data)
    assert result.status == "nothing_to_report"
    assert "no SIFT keypoint" in result.notes[0]
    assert result.maps == {} and set(result.prompts) == {"none"}
    write_report(result, data, tmp_path, {})
    assert "nothing_to_report" in (tmp_path / "report.html").read_text()


def test_unlabelled_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(AuditInputError, match="sub-folder named after the class"):
        labelled_images(tmp_path)
    with pytest.raises(AuditInputError, match="no such folder"):
        labelled_images(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# The flow on the platform


@pytest.mark.usefixtures("prefect_api")
def test_spurious_audit_flow_on_postgres_and_s3(
        shortcut_data: Path, shortcut_model: Path, pg_url: str, s3_bucket: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from flows.spurious_audit import AuditParams, spurious_audit
    from vitsem.platform.services.context import context
    from vitsem.platform.settings import Settings

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_DATABASE_URL", pg_url)
    monkeypatch.setenv("VITSEM_MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("VITSEM_ARTIFACT_URI", f"s3://{s3_bucket}/audit")
    # Three maps keep the test short; tests/test_dask.py runs the flow with every default map.
    params = AuditParams(data=str(shortcut_data), checkpoint=str(shortcut_model), shard_size=40,
                         maps=["semantic", "cls_last", "random"])
    first = spurious_audit(params)
    assert first["images"] == 120 and first["status"] == "ok" and first["shortcuts"] >= 1
    assert first["computed"] == 120 and not first["cached_audit"]
    top = first["findings"]["semantic"][0]
    assert top["shortcut"] and top["class_name"] == "disc"
    # Findings in SQL, one row per candidate of every map.
    n_findings = sum(len(v) for v in first["findings"].values())
    eng = sa.create_engine(pg_url)

    def rows() -> list[tuple]:
        with eng.connect() as c:
            return list(c.execute(sa.text(
                "SELECT map_name, rank, class_name, shortcut, report_uri FROM audit_findings "
                "WHERE audit_digest = :d ORDER BY map_name, rank"), {"d": first["audit_digest"]}))

    found = rows()
    assert len(found) == n_findings
    assert ("semantic", 1, "disc", True) == tuple(found[[r[0] for r in found].index(
        "semantic")][:4])
    assert found[0][4].startswith(f"s3://{s3_bucket}/audit/reports/spurious_audit/")
    # The report in the S3 store, metrics and the report in MLflow.
    store = context(Settings()).store
    prefix = f"reports/spurious_audit/{first['audit_digest']}"
    for name in ("report.html", "audit.json", "prompting.png", "finding_semantic_1.png"):
        assert store.exists(f"{prefix}/{name}"), name
    client = MlflowClient(mlflow_uri)
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.metrics["shortcuts.semantic"] >= 1
    assert run.data.metrics["prompt.drop-semantic.accuracy"] == pytest.approx(
        first["prompts"]["drop:semantic"]["accuracy"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {
        "report/report.html", "report/prompting.png"}
    # A rerun finds everything stored: no SIFT, no audit, no new rows.
    second = spurious_audit(params)
    assert second["computed"] == 0 and second["cached"] == 120 and second["cached_audit"]
    assert second["findings"] == first["findings"]
    assert rows() == found
    eng.dispose()


@pytest.mark.usefixtures("prefect_api")
def test_audit_flow_errors_are_clear_and_recorded(
        shortcut_data: Path, shortcut_model: Path, small_checkpoint: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.spurious_audit import AuditParams, spurious_audit
    from vitsem.platform.settings import Settings

    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    # Every image broken: a clear error, and the flow run is recorded as failed.
    broken = tmp_path / "broken"
    for cls in ("disc", "square"):
        (broken / cls).mkdir(parents=True)
        (broken / cls / "x.png").write_bytes(b"")
    with pytest.raises(AuditInputError, match="all 2 images were rejected"):
        spurious_audit(AuditParams(data=str(broken), checkpoint=str(shortcut_model)))
    # Labels the model does not predict.
    other = tmp_path / "animals"
    for cls in ("cat", "dog"):
        (other / cls).mkdir(parents=True)
        for p in sorted((shortcut_data / "images" / "test").glob("*.png"))[:2]:
            shutil.copy(p, other / cls / p.name)
    with pytest.raises(AuditInputError, match=r"labels \['cat', 'dog'\] are not classes"):
        spurious_audit(AuditParams(data=str(other), checkpoint=str(small_checkpoint)))
    eng = sa.create_engine(Settings().resolved_database_url())
    with eng.connect() as c:
        statuses = c.execute(sa.text(
            "SELECT status FROM flow_runs WHERE flow_name = 'spurious_audit'")).scalars().all()
    eng.dispose()
    assert statuses == ["failed", "failed"]


@pytest.mark.usefixtures("prefect_api")
def test_cli_audit_prints_findings_and_writes_the_report(
        shortcut_data: Path, shortcut_model: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from vitsem.cli import app

    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    for var in ("VITSEM_DATABASE_URL", "VITSEM_ARTIFACT_URI", "VITSEM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["audit", str(shortcut_data), "--checkpoint",
                                      str(shortcut_model), "--out", str(out),
                                      "--map", "semantic", "--map", "random"])
    assert result.exit_code == 0, result.output
    assert "shortcut" in result.output and "drop:semantic" in result.output
    assert "drop:random" in result.output and "drop:gae" not in result.output
    unknown = CliRunner().invoke(app, ["audit", str(shortcut_data), "--checkpoint",
                                       str(shortcut_model), "--map", "saliency"])
    assert unknown.exit_code == 2 and "unknown attribution maps ['saliency']" in unknown.output
    assert (out / "report.html").is_file() and (out / "finding_semantic_1.png").is_file()
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((shortcut_data / "images" / "test").glob("*.png")), flat / "a.png")
    bad = CliRunner().invoke(app, ["audit", str(flat), "--checkpoint", str(shortcut_model)])
    assert bad.exit_code == 2
    assert "sub-folder named after the class" in " ".join(bad.output.split())  # rich wraps
