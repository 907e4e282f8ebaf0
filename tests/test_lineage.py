"""What users see in MLflow: runs named and tagged by what they audited, the data set as an
input, a model audit's steps nested under it, ``models:/`` references, the audit history
(`vitsem compare`) and the promotion gate."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset
from vitsem.errors import RegistryError
from vitsem.platform.history import AuditRecord, GateRule, changes, decide
from vitsem.platform.lineage import Lineage, RegistryVersion, dataset_digest
from vitsem.platform.registry import parse_model_uri


def _lineage(**kw: Any) -> Lineage:
    base: dict[str, Any] = dict(kind="audit", model_name="vit_tiny", model_checksum="ab" * 32,
                                dataset_name="benchmark", dataset_digest="d" * 16,
                                dataset_source="/data/benchmark#test", num_images=40,
                                date="2026-12-03", code="0.1.0")
    return Lineage(**(base | kw))


def test_run_name_and_tags_say_what_ran() -> None:
    plain = _lineage()
    assert plain.run_name() == "audit vit_tiny#abababab benchmark 2026-12-03"
    reg = _lineage(registry=RegistryVersion("tiny", "3", "champion"), cached=True,
                   parent_run_id="p1", flow_run_id="f1")
    assert reg.run_name() == "audit tiny@v3 benchmark 2026-12-03"
    tags = reg.tags()
    assert tags["vitsem.registered_model"] == "tiny"
    assert tags["vitsem.registered_model.version"] == "3"
    assert tags["vitsem.model.checksum"] == "ab" * 32
    assert tags["vitsem.dataset.digest"] == "d" * 16
    assert tags["vitsem.result"] == "cached" and tags["mlflow.parentRunId"] == "p1"
    assert "vitsem.prefect.deployment" not in tags  # absent facts are left out


def test_dataset_digest_ignores_order_and_repeats_but_not_content() -> None:
    assert dataset_digest(["b", "a", "a"]) == dataset_digest(["a", "b"])
    assert dataset_digest(["a", "b"]) != dataset_digest(["a", "c"])


@pytest.mark.parametrize("uri,want", [
    ("models:/tiny@champion", ("tiny", None, "champion")),
    ("models:/my.model-2/14", ("my.model-2", "14", None)),
])
def test_model_uri_parsing(uri: str, want: tuple[str | None, ...]) -> None:
    assert parse_model_uri(uri) == want


@pytest.mark.parametrize("uri", ["models:/", "models:/a@", "models:/a/b/c", "models:/../x@y",
                                 "models:/a@b c", "models:/a/1.5"])
def test_malformed_model_uri_is_refused(uri: str) -> None:
    with pytest.raises(RegistryError, match="models:/<name>@<alias>"):
        parse_model_uri(uri)


def _record(version: str, unreviewed: float = 0, reviewed_shortcuts: float = 0,
            wga: float | None = 0.8, patterns: tuple[str, ...] = ()) -> AuditRecord:
    scalars = {"summary.unreviewed_patterns": unreviewed,
               "summary.reviewed_shortcuts": reviewed_shortcuts,
               "summary.relied_on_patterns": unreviewed + reviewed_shortcuts}
    if wga is not None:
        scalars["summary.worst_group_accuracy"] = wga
    return AuditRecord(f"r{version}", f"audit m@v{version}", int(version), version, "c", "d",
                       scalars, frozenset(patterns))


def test_gate_refuses_an_unreviewed_shortcut_and_a_worse_worst_group() -> None:
    champion = _record("1", wga=0.7)
    assert decide(_record("2", wga=0.75), champion).promote
    assert decide(_record("2", wga=0.75), None).promote  # first champion
    shortcut = decide(_record("2", unreviewed=1, wga=0.9), champion)
    assert not shortcut.promote and "unreviewed" in shortcut.reasons[0]
    assert not decide(_record("2", reviewed_shortcuts=1), champion).promote
    worse = decide(_record("2", wga=0.65), champion)
    assert not worse.promote and "below the champion's" in worse.reasons[0]
    assert decide(_record("2", wga=0.65), champion, GateRule(max_worst_group_drop=0.1)).promote
    assert not decide(None, champion).promote
    assert not decide(_record("2", wga=None), champion).promote


def test_changes_name_what_appeared_and_went() -> None:
    rows = changes([_record("3", wga=0.6, patterns=("p1", "p3")),
                    _record("2", wga=0.8, patterns=("p1", "p2")), _record("1", wga=0.8)])
    assert rows[0]["appeared"] == ["p3"] and rows[0]["gone"] == ["p2"]
    assert rows[0]["worst_group_change"] == pytest.approx(-0.2)
    assert rows[2]["worst_group_change"] is None and rows[2]["appeared"] == []


# ---------------------------------------------------------------------------------------------
# Through the flows, on a real MLflow store


def _log_audit_run(client: Any, name: str, version: str, unreviewed: float, wga: float) -> str:
    """An audit run as the flow logs it (tags and summary scalars), for gate decisions on
    chosen figures."""
    from mlflow.entities import Metric

    exp = client.get_experiment_by_name("vitsem/spurious_audit")
    exp_id = exp.experiment_id if exp else client.create_experiment("vitsem/spurious_audit")
    run = client.create_run(exp_id, run_name=f"audit {name}@v{version}", tags={
        "vitsem.flow": "spurious_audit", "vitsem.registered_model": name,
        "vitsem.registered_model.version": version})
    client.log_batch(run.info.run_id, metrics=[
        Metric("summary.unreviewed_patterns", unreviewed, 0, 0),
        Metric("summary.reviewed_shortcuts", 0.0, 0, 0),
        Metric("summary.worst_group_accuracy", wga, 0, 0)])
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


@pytest.fixture(scope="module")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled benchmark of the small model's classes, small enough for a quick audit."""
    root = tmp_path_factory.mktemp("few") / "data"
    return make_shortcut_dataset(root, ShortcutSpec(n_train=8, n_test=16, seed=4), workers=1)


@pytest.mark.usefixtures("prefect_api")
def test_model_audit_of_a_registered_version_is_named_tagged_nested_and_compared(
        few_images: Path, small_checkpoint: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from flows.model_audit import ModelAuditParams, model_audit
    from vitsem.cli import app
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import register_checkpoint

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_MLFLOW_TRACKING_URI", mlflow_uri)
    _, version = register_checkpoint(Settings(), small_checkpoint, "tiny", "champion", {}, {})
    result = model_audit(ModelAuditParams(data=str(few_images),
                                          checkpoint="models:/tiny@champion"))
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result["attention_analysis"]["mlflow_run_id"]).data.tags[
        "mlflow.parentRunId"]
    audit_run = client.get_run(result["spurious_audit"]["mlflow_run_id"])
    assert audit_run.data.tags["mlflow.parentRunId"] == parent
    assert re.fullmatch(rf"audit tiny@v{version} data:test \d{{4}}-\d\d-\d\d",
                        audit_run.info.run_name)
    tags = audit_run.data.tags
    assert len(tags["vitsem.model.checksum"]) == 64 and len(tags["vitsem.dataset.digest"]) == 16
    assert tags["vitsem.registered_model.uri"] == f"models:/tiny/{version}"
    assert tags["vitsem.prefect.flow_run_id"]
    inputs = audit_run.inputs.dataset_inputs
    assert [d.dataset.digest for d in inputs] == [tags["vitsem.dataset.digest"]]
    assert inputs[0].dataset.name == "data:test"
    parent_run = client.get_run(parent)
    assert parent_run.info.run_name.startswith(f"model audit tiny@v{version} ")
    assert parent_run.info.status == "FINISHED"
    assert {"summary.max_semantic_lift", "summary.worst_group_accuracy",
            "summary.unreviewed_patterns"} <= set(parent_run.data.metrics)
    # The history reads the audit back; a second audit shows the change since the first.
    model_audit(ModelAuditParams(data=str(few_images), checkpoint="models:/tiny@champion"))
    out = CliRunner().invoke(app, ["compare", "tiny", "--last", "5"])
    assert out.exit_code == 0 and "audits of tiny" in out.output, out.output
    out = CliRunner().invoke(app, ["compare", "tiny", "--json"])
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert [r["version"] for r in rows] == [version, version]
    assert rows[0]["worst_group_change"] == 0.0 and rows[1]["worst_group_change"] is None
    assert rows[1]["run_id"] == audit_run.info.run_id
    # The gate: a challenger whose audit confirms an unreviewed shortcut stays challenger; a
    # clean one with a worst-group accuracy as good as the champion's is promoted.
    champion_wga = audit_run.data.metrics["summary.worst_group_accuracy"]
    for unreviewed, promoted in ((1.0, False), (0.0, True)):
        if promoted:  # a hold (what the audit-event automation sets) refuses even a clean one
            assert CliRunner().invoke(app, ["model", "hold", "tiny", "--reason", "event"]
                                      ).exit_code == 0
            _, v = register_checkpoint(Settings(), small_checkpoint, "tiny", "challenger", {}, {})
            _log_audit_run(client, "tiny", v, 0.0, champion_wga)
            out = CliRunner().invoke(app, ["model", "promote", "tiny"])
            assert out.exit_code == 1 and "on hold" in out.output, out.output
            assert CliRunner().invoke(app, ["model", "hold", "tiny", "--release"]).exit_code == 0
        _, v = register_checkpoint(Settings(), small_checkpoint, "tiny", "challenger", {}, {})
        _log_audit_run(client, "tiny", v, unreviewed, champion_wga)
        out = CliRunner().invoke(app, ["model", "promote", "tiny"])
        assert out.exit_code == (0 if promoted else 1), out.output
        champion = str(client.get_model_version_by_alias("tiny", "champion").version)
        assert (champion == v) is promoted
        assert client.get_model_version("tiny", v).tags["vitsem.gate"].startswith(
            "promoted" if promoted else "refused")


def test_unknown_alias_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import resolve_model

    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(RegistryError, match="no alias 'nope' of model 'tiny'"):
        resolve_model(Settings(), "models:/tiny@nope")


def test_audit_events_name_new_patterns_and_a_worst_group_fall() -> None:
    from vitsem.platform.history import audit_events

    first = audit_events(_record("1", wga=0.8, patterns=("p1",)), None)
    assert [(e.name, e.payload["patterns"]) for e in first] == [
        ("vitsem.audit.pattern-appeared", ["p1"])]
    same = audit_events(_record("2", wga=0.78, patterns=("p1",)),
                        _record("1", wga=0.8, patterns=("p1",)), max_worst_group_drop=0.05)
    assert same == []
    worse = audit_events(_record("2", wga=0.6, patterns=("p1", "p2")),
                         _record("1", wga=0.8, patterns=("p1",)), max_worst_group_drop=0.05)
    assert [e.name for e in worse] == ["vitsem.audit.pattern-appeared",
                                      "vitsem.audit.worst-group-dropped"]
    assert worse[0].payload["patterns"] == ["p2"]
    assert worse[1].payload["drop"] == pytest.approx(0.2)


@pytest.mark.usefixtures("prefect_api")
def test_an_audit_event_reaches_the_prefect_api_with_the_model_as_resource() -> None:
    import time

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from flows.common import announce
    from vitsem.platform.history import audit_events

    events = audit_events(_record("2", wga=0.5, patterns=("p9",)), _record("1", wga=0.9))

    @flow
    def audit_like() -> None:
        announce(_lineage(registry=RegistryVersion("evented", "2")), events)

    audit_like()
    wanted = EventFilter(resource=EventResourceFilter(id=["vitsem.model.evented"]),
                         event=EventNameFilter(prefix=["vitsem.audit."]))
    found: list[Any] = []
    with get_client(sync_client=True) as client:
        for _ in range(60):  # the server persists events asynchronously
            found = list(client.read_events(filter=wanted, limit=10).events)
            if len(found) == 2:
                break
            time.sleep(0.5)
    assert sorted(e.event for e in found) == ["vitsem.audit.pattern-appeared",
                                              "vitsem.audit.worst-group-dropped"]
    assert all(e.resource["vitsem.model.version"] == "2" for e in found)


def test_prefect_yaml_holds_promotion_on_audit_events() -> None:
    import yaml
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    spec = yaml.safe_load((Path(__file__).parents[1] / "prefect.yaml").read_text())
    hold = [d for d in spec["deployments"] if d["entrypoint"].endswith(":hold_promotion")]
    assert len(hold) == 1
    trigger = DeploymentEventTrigger.model_validate(hold[0]["triggers"][0])
    assert trigger.expect == {"vitsem.audit.pattern-appeared",
                              "vitsem.audit.worst-group-dropped"}
    assert trigger.match.model_dump()["prefect.resource.id"] == "vitsem.model.*"
    assert set(trigger.parameters or {}) == {"model", "reason"}
