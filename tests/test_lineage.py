"""What users see in MLflow: runs named and tagged by what they audited, the data set as an
input, a model audit's steps nested under it, ``models:/`` references, the audit history
(`vitsem compare`) and the promotion gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

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


def test_gate_promotes_through_the_registry_and_honours_a_hold(
        small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate on a real MLflow store, over audit runs logged as the flow logs them (the
    audit itself, named and tagged, is run end to end by tests/test_browser.py)."""
    from mlflow import MlflowClient

    from vitsem.cli import app
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import register_checkpoint, resolve_model

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_MLFLOW_TRACKING_URI", mlflow_uri)
    client = MlflowClient(mlflow_uri)
    _, first = register_checkpoint(Settings(), small_checkpoint, "tiny", "champion", {}, {})
    path, ref = resolve_model(Settings(), "models:/tiny@champion")
    assert ref is not None and ref.version == first
    assert Path(str(path)).read_bytes() == small_checkpoint.read_bytes()
    _log_audit_run(client, "tiny", first, 0.0, 0.7)

    def challenger(unreviewed: float, wga: float) -> str:
        _, v = register_checkpoint(Settings(), small_checkpoint, "tiny", "challenger", {}, {})
        _log_audit_run(client, "tiny", v, unreviewed, wga)
        return v

    def promote() -> tuple[int, str]:
        out = CliRunner().invoke(app, ["model", "promote", "tiny"])
        return out.exit_code, str(client.get_model_version_by_alias("tiny", "champion").version)

    shortcut = challenger(1.0, 0.9)  # relies on an unreviewed pattern
    assert promote() == (1, first)
    assert client.get_model_version("tiny", shortcut).tags["vitsem.gate"].startswith("refused")
    assert challenger(0.0, 0.6) and promote() == (1, first)  # worse worst group
    assert CliRunner().invoke(app, ["model", "hold", "tiny", "--reason", "event"]).exit_code == 0
    clean = challenger(0.0, 0.75)
    assert promote() == (1, first)  # on hold
    assert CliRunner().invoke(app, ["model", "hold", "tiny", "--release"]).exit_code == 0
    assert promote() == (0, clean)
    assert client.get_model_version("tiny", clean).tags["vitsem.gate"].startswith("promoted")
    out = CliRunner().invoke(app, ["compare", "tiny", "--json"])
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert [r["version"] for r in rows][:2] == [clean, str(int(clean) - 1)]
    assert rows[0]["worst_group_change"] == pytest.approx(0.15)


def test_a_registered_version_is_an_mlflow_model_that_loads_without_pickle(
        small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow.pyfunc.load_model("models:/…@alias")`` rebuilds the network from its
    safetensors file (any unpickling would raise here) and predicts as the checkpoint does."""
    import pickle

    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow import MlflowClient

    from vitsem.method.models import load_model
    from vitsem.platform.settings import Settings
    from vitsem.platform.tracking import register_checkpoint

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("VITSEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITSEM_MLFLOW_TRACKING_URI", mlflow_uri)
    _, version = register_checkpoint(Settings(), small_checkpoint, "tiny", "champion", {}, {})
    client = MlflowClient(mlflow_uri)
    mv = client.get_model_version("tiny", version)
    logged_id = str(mv.source).removeprefix("models:/")
    assert client.get_logged_model(logged_id).status == "READY"

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("unpickling while loading a vitsem model")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    mlflow.set_tracking_uri(mlflow_uri)
    loaded = mlflow.pyfunc.load_model("models:/tiny@champion")
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    probs = loaded.predict(images)
    net, _ = load_model(checkpoint=small_checkpoint)
    inner = loaded._model_impl  # the loader module's object (VitsemPyfunc)
    with torch.inference_mode():
        want = net(inner._batch(images)).softmax(-1).numpy()
    assert probs.shape == (3, want.shape[1])
    np.testing.assert_allclose(probs, want, atol=1e-6)


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
