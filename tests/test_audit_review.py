"""Review decisions and the repair in the flow. A decision recorded with the CLI (in
PostgreSQL) carries to the next audit of the model family: the pattern comes back reviewed
and unflagged, and flagged as regressed once the model relies on it more than when it was
decided. The flow repairs the last layer on a held-out share, registers the repaired
checkpoint in MLflow and re-audits it. Bad held-out data or a model the repair cannot use
leave the audit whole, with the reason."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from torch import nn

from vitsem.audit.benchmark import load_benchmark
from vitsem.audit.pipeline import AuditConfig, AuditData, AuditResult, audit, repair_audit
from vitsem.audit.verdicts import Verdict
from vitsem.errors import AuditInputError
from vitsem.method.attention import token_layout
from vitsem.method.models import load_model
from vitsem.method.view import ModelView


@pytest.mark.usefixtures("prefect_api")
def test_review_recorded_by_cli_carries_and_the_flow_registers_the_repair(
        shortcut_data: Path, shortcut_model: Path, pg_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from flows.spurious_audit import AuditParams, spurious_audit
    from vitsem.cli import app
    from vitsem.platform.services.context import context
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import resolve_model

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_DATABASE_URL", pg_url)
    monkeypatch.setenv("VITSEM_MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.delenv("VITSEM_ARTIFACT_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    family = f"shortcut-vit-{uuid.uuid4().hex[:8]}"
    params = AuditParams(data=str(shortcut_data), checkpoint=str(shortcut_model),
                         maps=["semantic"], repair_holdout=0.5, family=family)
    first = spurious_audit(params)
    assert 50 <= first["images"] <= 70 and first["family"] == family
    top = first["findings"]["semantic"][0]
    assert top["confirmed"] and top["class_name"] == "disc"
    assert top["flag"] == "new" and top["review"] is None and first["flagged"] >= 1

    # The repair: fitted on the held-out half of each group, evaluated on the audited rest.
    repairs = first["repairs"]
    assert set(repairs) == {"none", "dfr:pseudo", "dfr:class", "dfr:oracle"}
    assert sum(repairs["dfr:pseudo"]["fit_groups"].values()) + first["images"] == 120
    # (Whether it lifts the worst group is tested on more data in test_audit.py; here, with
    # about ten images a group, the figures are only checked to agree with each other.)
    floor, oracle = (repairs[k]["worst_group_accuracy"] for k in ("none", "dfr:oracle"))
    for o in repairs.values():
        expected = ((o["worst_group_accuracy"] - floor) / (oracle - floor)
                    if oracle - floor > 1e-9 else float("nan"))
        assert o["gap_closed"] == pytest.approx(expected, nan_ok=True)
        assert o["worst_group_accuracy"] == min(o["group_accuracy"].values())
    assert first["faithfulness"]["semantic"]["images"] == first["images"]
    reaudit = first["reaudit"]
    assert reaudit["method"] == "dfr:pseudo"
    assert reaudit["prompts"]["none"]["accuracy"] == pytest.approx(
        repairs["dfr:pseudo"]["accuracy"])
    # Registered in MLflow as a version of the family, with the audit's run and scores.
    client = MlflowClient(mlflow_uri)
    versions = client.search_model_versions(f"name = '{family}'")
    assert [str(v.version) for v in versions] == [first["repaired_version"]] == ["1"]
    assert versions[0].tags["vitsem.audit_digest"] == first["audit_digest"]
    assert versions[0].run_id == first["mlflow_run_id"]
    assert str(client.get_model_version_by_alias(family, "repaired").version) == "1"
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.metrics["repair.dfr-pseudo.worst_group_accuracy"] == pytest.approx(
        repairs["dfr:pseudo"]["worst_group_accuracy"])
    assert "faithfulness.semantic.abpc" in run.data.metrics
    # The registered weights (an MLflow logged model of the audit's run) are the original
    # model with a new head.
    logged = client.get_logged_model(str(versions[0].source).removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id
    got_path, _ref = resolve_model(Settings(), f"models:/{family}/1")
    got = Path(str(got_path))
    assert got.name == "repaired-dfr-pseudo.safetensors"
    repaired, _ = load_model(None, got)
    original, _ = load_model(None, shortcut_model)
    assert not torch.equal(repaired.head.weight, original.head.weight)
    assert torch.equal(repaired.patch_embed.proj.weight, original.patch_embed.proj.weight)
    # The report shows the flag, the repair with its re-audit, and what the method cannot see.
    store = context(Settings()).store
    page = store.get(f"reports/spurious_audit/{first['audit_digest']}/report.html").decode()
    assert "Flagged: new" in page and "Re-audit of <code>dfr:pseudo</code>" in page
    assert "repairs.png" in page and "faithfulness.png" in page
    assert "What this method cannot see" in page and "colour cast" in page
    # The same audit again: found in the store, nothing registered twice.
    rerun = spurious_audit(params)
    assert rerun["cached_audit"] and rerun["repaired_version"] == "1"
    assert len(client.search_model_versions(f"name = '{family}'")) == 1

    # The reviewer lists the last audit's confirmed findings and records a decision.
    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        finding_id = c.execute(sa.text(
            "SELECT id FROM audit_findings WHERE audit_digest = :d AND map_name = 'semantic' "
            "AND rank = 1"), {"d": first["audit_digest"]}).scalar_one()
    runner = CliRunner()
    listed = runner.invoke(app, ["review", "list", "--checkpoint", str(shortcut_model)])
    assert listed.exit_code == 0, listed.output
    assert str(finding_id) in listed.output and "disc" in listed.output
    recorded = runner.invoke(app, ["review", "record", str(finding_id), "--decision",
                                   "legitimate", "--reviewer", "alice", "--note",
                                   "the disc's rim"])
    assert recorded.exit_code == 0, recorded.output
    assert "legitimate" in recorded.output and family in recorded.output
    unknown = runner.invoke(app, ["review", "record", "999999", "--decision", "shortcut",
                                  "--reviewer", "bob"])
    assert unknown.exit_code == 2 and "no audit finding with id 999999" in unknown.output
    bad = runner.invoke(app, ["review", "record", str(finding_id), "--decision", "maybe",
                              "--reviewer", "bob"])
    assert bad.exit_code == 2

    # The next audit carries it: reviewed, not flagged, and not repaired against.
    second = spurious_audit(params)
    assert second["audit_digest"] != first["audit_digest"] and not second["cached_audit"]
    again = second["findings"]["semantic"][0]
    assert again["verdict"] == Verdict.REVIEWED_LEGITIMATE and again["flag"] == ""
    assert again["review"]["reviewer"] == "alice" and again["review"]["decision"] == "legitimate"
    page = store.get(f"reports/spurious_audit/{second['audit_digest']}/report.html").decode()
    assert "Reviewed as <b>legitimate</b> by alice" in page
    # As if decided when the model relied on the pattern far less: flagged as regressed.
    with eng.begin() as c:
        c.execute(sa.text("UPDATE review_decisions SET excess_effect = excess_effect - 0.5 "
                          "WHERE family = :f"), {"f": family})
    third = spurious_audit(params)
    regressed = third["findings"]["semantic"][0]
    assert regressed["verdict"] == Verdict.REVIEWED_LEGITIMATE
    assert regressed["flag"] == "regressed" and third["flagged"] >= 1
    eng.dispose()


# ---------------------------------------------------------------------------------------------
# Bad input to the repair: the audit stays whole


@pytest.fixture(scope="module")
def audited(shortcut_data: Path, shortcut_model: Path
            ) -> tuple[nn.Module, ModelView, AuditData, AuditData, AuditResult]:
    net, _ = load_model(None, shortcut_model)
    view = ModelView.from_model(net)
    d = load_benchmark(shortcut_data, "test", view, token_layout(net, view.hw).grid).data
    half = len(d) // 2

    def part(sl: slice) -> AuditData:
        return AuditData(d.views[sl], d.keypoints[sl], d.labels[sl], d.class_names,
                         (d.groups or [])[sl])

    data, held = part(slice(0, half)), part(slice(half, None))
    result = audit(net, view, data, AuditConfig(maps=("semantic",), faithfulness_images=0))
    assert result.maps["semantic"].relied
    return net, view, data, held, result


def _subset(d: AuditData, keep: np.ndarray) -> AuditData:
    return AuditData(d.views[keep], [k for k, s in zip(d.keypoints, keep, strict=True) if s],
                     d.labels[keep], d.class_names,
                     [g for g, s in zip(d.groups or [], keep, strict=True) if s])


@pytest.mark.parametrize("case", ["too_few", "one_class", "no_linear_head"])
def test_bad_repair_input_keeps_the_audit_and_says_why(
        audited: tuple[nn.Module, ModelView, AuditData, AuditData, AuditResult],
        case: str) -> None:
    net, view, data, held, result = audited
    before = json.dumps(result.summary(), sort_keys=True)
    notes = list(result.notes)
    model: nn.Module = net
    if case == "too_few":
        held = _subset(held, np.arange(len(held)) < 8)
        expected = "8 held-out images; the last-layer repair needs at least 20"
    elif case == "one_class":
        held = _subset(held, held.labels == held.labels[0])
        expected = "the data set holds one class"
    else:
        import copy

        model = copy.deepcopy(net)
        model.head = nn.Sequential(model.head)  # type: ignore[assignment]
        expected = "head is Sequential, not a linear layer"
    repair_audit(model, view, data, result, held)
    assert result.repairs == {} and result.repaired_models == {} and result.reaudit == {}
    added = result.notes[len(notes):]
    assert len(added) == 1 and added[0].startswith("repair skipped: ")
    assert expected in added[0]
    del result.notes[len(notes):]
    assert json.dumps(result.summary(), sort_keys=True) == before  # nothing lost


def test_held_out_share_is_per_group_and_independent_of_order_and_location() -> None:
    from vitsem.data.inputs import InputImage
    from vitsem.platform.services.audit import split_heldout

    def images(root: str) -> list[InputImage]:
        return [InputImage(f"{root}/{i:03d}.png", "ab"[i % 2], f"{'ab'[i % 2]}|{i % 3 == 0}")
                for i in range(60)]

    audited, held = split_heldout(images("/data/one"), 0.5)
    assert len(audited) + len(held) == 60 and not {im.path for im in audited} & {
        im.path for im in held}
    groups = {g: sum(im.group == g for im in images("/x")) for g in
              {im.group for im in images("/x")}}
    for g, n in groups.items():
        assert sum(im.group == g for im in held) == round(0.5 * n)
    _, moved = split_heldout(list(reversed(images("/elsewhere/two"))), 0.5)
    assert sorted(im.path.rsplit("/", 1)[1] for im in moved) == sorted(
        im.path.rsplit("/", 1)[1] for im in held)
    assert split_heldout(images("/d"), 0.0) == (images("/d"), [])
    with pytest.raises(AuditInputError, match="held-out share"):
        split_heldout(images("/d"), 1.0)
