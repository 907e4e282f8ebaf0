"""MLflow adapter: one experiment per flow, layer as the metric step, secrets never logged.

Runs are named and tagged by their :class:`~vitsem.platform.lineage.Lineage` (model, registry
version, data set digest, Prefect flow run), log their data set as an input, and carry
``summary.*`` scalars a compare view can sort; a model audit's analysis and audit runs are
children of its own run."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vitsem.method.models import model_checksum, read_checkpoint_spec
from vitsem.method.pipeline import AnalysisResult
from vitsem.platform.history import AuditEvent, AuditRecord, audit_events, audit_history
from vitsem.platform.lineage import Lineage, RegistryVersion
from vitsem.platform.registry import (
    CHECKSUM_TAG,
    is_model_uri,
    resolve_checkpoint,
    version_of_checksum,
)
from vitsem.platform.settings import Settings, redact
from vitsem.platform.storage.db import serialised
from vitsem.platform.summaries import (
    analysis_scalars,
    audit_scalars,
    metric_name,
    relied_on_signatures,
)

log = logging.getLogger("vitsem.platform.tracking")

_READY: set[str] = set()
_READY_LOCK = threading.Lock()
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _set_up_race(error: BaseException) -> bool:
    """An error of two clients creating MLflow's tables at once (SQLite: 'table ... already
    exists'; PostgreSQL: a duplicate type or SQLAlchemy's CircularDependencyError)."""
    text = f"{type(error).__name__}: {error}"
    return any(s in text for s in ("already exists", "CircularDependencyError",
                                   "duplicate key", "UniqueViolation"))


def open_client(uri: str, attempts: int = 5) -> Any:
    """An MLflow client of ``uri``; its first use in this process, for a database store,
    creates MLflow's tables under a lock.

    MLflow creates its schema when a client is constructed, without a lock, so two runs
    starting together on a fresh store fail ('table secrets already exists', 'duplicate
    column', CircularDependencyError). Here the first construction holds
    :func:`~vitsem.platform.storage.db.serialised` (a lock file on this machine, an advisory
    lock on PostgreSQL), and a set-up error caused by a client that does not take it is
    retried."""
    import mlflow

    if uri in _READY or uri.split(":", 1)[0].split("+")[0] not in _DATABASE_SCHEMES:
        return mlflow.MlflowClient(uri)
    with _READY_LOCK:
        if uri in _READY:
            return mlflow.MlflowClient(uri)
        with serialised(uri, "mlflow-schema"):
            for attempt in range(1, attempts + 1):
                try:
                    client = mlflow.MlflowClient(uri)
                    client.search_experiments(max_results=1)
                    break
                except Exception as e:
                    if attempt == attempts or not _set_up_race(e):
                        raise
                    log.warning("MLflow store set-up raced another client (%s); retrying",
                                type(e).__name__)
                    time.sleep(0.5 * attempt)
        _READY.add(uri)
        return client


def client_for(settings: Settings) -> Any:
    """The MLflow client of ``settings`` (its URI also set as MLflow's tracking URI: artifact
    repositories read it)."""
    import mlflow

    uri = settings.resolved_mlflow_uri()
    mlflow.set_tracking_uri(uri)
    return open_client(uri)



def experiment_id(settings: Settings, flow_name: str) -> str:
    """The experiment ``vitsem/<flow>``, created on first use with its artifacts beside the
    project's artifact store (S3 when configured)."""
    client = client_for(settings)
    name = f"vitsem/{flow_name}"
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    store = settings.resolved_artifact_uri()
    # Beside the project's artifacts when they are in S3, or when MLflow is local too; a
    # tracking server with local project artifacts keeps its own (served) artifact store.
    remote = settings.resolved_mlflow_uri().startswith("http")
    location = None if remote and not store.startswith("s3://") else store.rstrip("/") + "/mlflow"
    try:
        # The kind makes the MLflow UI open the experiment on its training-runs table.
        return str(client.create_experiment(name, artifact_location=location, tags={
            "mlflow.experimentKind": "custom_model_development"}))
    except Exception:  # created concurrently by another run
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return redact(text)[:6000]


def _new_run(settings: Settings, flow_name: str, lineage: Lineage | None,
             tags: dict[str, str] | None = None) -> tuple[Any, Any]:
    """A new run of ``vitsem/<flow>``, or a child of the lineage's parent run (in the
    parent's experiment, so the MLflow UI nests it), named and tagged by ``lineage``; its
    data set logged as an input."""
    client = client_for(settings)
    all_tags = {"vitsem.flow": flow_name, **(tags or {})}
    if lineage is None:
        return client, client.create_run(experiment_id(settings, flow_name), tags=all_tags)
    exp = (client.get_run(lineage.parent_run_id).info.experiment_id if lineage.parent_run_id
           else experiment_id(settings, flow_name))
    run = client.create_run(exp, tags=all_tags | lineage.tags(), run_name=lineage.run_name())
    _log_dataset(client, str(run.info.run_id), lineage)
    return client, run


def _log_dataset(client: Any, run_id: str, lineage: Lineage) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = json.dumps({"uri": redact(lineage.dataset_source)})
    profile = json.dumps({"num_images": lineage.num_images})
    dataset = Dataset(lineage.dataset_name, lineage.dataset_digest, "local", source,
                      profile=profile)
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context",
                                                                "evaluation")])])


def log_analysis(settings: Settings, flow_name: str, params: dict[str, Any],
                 result: AnalysisResult, files: list[Path], tags: dict[str, str] | None = None,
                 lineage: Lineage | None = None) -> str:
    """Log ``params`` (redacted), the layer profile and per-head statistics (step = layer)
    and ``files`` (stats.json, pictures) to a new run; returns its run id."""
    from mlflow.entities import Metric, Param, RunTag

    client, run = _new_run(settings, flow_name, lineage, tags)
    run_id = str(run.info.run_id)
    try:
        metrics = []
        summary = result.summary()
        ts = int(run.info.start_time)
        for row in result.layer_profile():
            layer = int(row["layer"])
            for name in ("semantic_lift", "cls_focus"):
                if row[name] == row[name]:  # not NaN
                    metrics.append(Metric(name, row[name], ts, layer))
            for name in ("semantic_lift", "cls_focus", "semantic_mass"):
                per_head = summary[name].mean[layer]
                metrics += [Metric(f"{name}.head{h}", float(v), ts, layer)
                            for h, v in enumerate(per_head) if v == v]
        metrics.append(Metric("images", float(result.num_images), ts, 0))
        metrics.append(Metric("rejected", float(len(result.rejected)), ts, 0))
        metrics += [Metric(k, v, ts, 0) for k, v in analysis_scalars(result).items()]
        client.log_batch(run_id, metrics=metrics,
                         params=[Param(k, _param(v)) for k, v in sorted(params.items())],
                         tags=[RunTag("vitsem.platform.settings", _param(settings.public_dict()))])
        for f in files:
            client.log_artifact(run_id, str(f))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def log_audit(settings: Settings, params: dict[str, Any], summary: dict[str, Any],
              files: list[Path], lineage: Lineage | None = None) -> str:
    """Log a spurious-correlation audit to a run of ``vitsem/spurious_audit``: accuracy and
    worst-group accuracy per prompt, candidates and confirmed shortcuts per map, the
    ``summary.*`` scalars, the report (HTML, PNGs, JSON) as artifacts. Returns the run id."""
    from mlflow.entities import Metric, Param, RunTag

    client, run = _new_run(settings, "spurious_audit", lineage, {
        "vitsem.audit_status": summary["status"],
        "vitsem.patterns": ",".join(relied_on_signatures(summary))})
    run_id = str(run.info.run_id)
    ts = int(run.info.start_time)
    try:
        metrics = [Metric("images", float(summary["images"]), ts, 0)]
        metrics += [Metric(k, v, ts, 0) for k, v in audit_scalars(summary).items()]
        for prompt, o in summary["prompts"].items():
            for key in ("accuracy", "worst_group_accuracy", "clean_accuracy", "changed"):
                if o.get(key) is not None:
                    metrics.append(Metric(metric_name("prompt", prompt, key), float(o[key]),
                                          ts, 0))
        for map_name, findings in summary["findings"].items():
            metrics.append(Metric(metric_name("candidates", map_name), float(len(findings)),
                                  ts, 0))
            metrics.append(Metric(metric_name("shortcuts", map_name),
                                  float(sum(f["shortcut"] for f in findings)), ts, 0))
        client.log_batch(run_id, metrics=metrics,
                         params=[Param(k, _param(v)) for k, v in sorted(params.items())],
                         tags=[RunTag("vitsem.platform.settings", _param(settings.public_dict()))])
        for f in files:
            client.log_artifact(run_id, str(f), artifact_path="report")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def run_url(settings: Settings, run_id: str) -> str | None:
    """A link to the run in the MLflow UI when the tracking URI is a server."""
    uri = settings.resolved_mlflow_uri()
    if not uri.startswith("http"):
        return None
    client = client_for(settings)
    exp = client.get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"


def register_checkpoint(settings: Settings, checkpoint: Path, name: str, alias: str,
                        params: dict[str, Any], metrics: dict[str, float],
                        run_id: str | None = None) -> tuple[str, str]:
    """Log a safetensors checkpoint to a run (``run_id``, or a new run of ``vitsem/train``)
    as an MLflow logged model (``python_function`` flavour, loadable with
    ``mlflow.pyfunc.load_model``), and register it as a version of model ``name`` with
    ``alias``. Only weights travel: nothing is pickled.

    Returns (run id, model version)."""
    from mlflow.entities import Metric, Param

    from vitsem.platform.mlflow_flavor import save_pyfunc

    client = client_for(settings)
    if run_id is None:
        run = client.create_run(experiment_id(settings, "train"), tags={"vitsem.flow": "train"})
        run_id = str(run.info.run_id)
        ts = int(run.info.start_time)
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()],
                         params=[Param(k, _param(v)) for k, v in sorted(params.items())])
    spec = read_checkpoint_spec(checkpoint)
    tags = {CHECKSUM_TAG: model_checksum(spec, checkpoint)} if spec is not None else {}
    logged = client.create_logged_model(client.get_run(run_id).info.experiment_id,
                                        name="model", source_run_id=run_id, tags=tags,
                                        model_type="vitsem")
    with tempfile.TemporaryDirectory() as scratch:
        folder = save_pyfunc(checkpoint, Path(scratch) / "model", model_id=logged.model_id)
        client.log_model_artifacts(logged.model_id, str(folder))
    client.finalize_logged_model(logged.model_id, "READY")
    client.set_terminated(run_id, "FINISHED")
    try:
        client.create_registered_model(name)
    except Exception:  # already registered
        pass
    version = client.create_model_version(name, f"models:/{logged.model_id}", run_id=run_id,
                                          tags=tags, model_id=logged.model_id)
    client.set_registered_model_alias(name, alias, version.version)
    return run_id, str(version.version)


def resolve_model(settings: Settings, checkpoint: str | None
                  ) -> tuple[str | None, RegistryVersion | None]:
    """A checkpoint parameter as a local file: ``models:/<name>@<alias>`` (or ``/<version>``)
    is resolved through the registry and downloaded once; a path passes through."""
    if not is_model_uri(checkpoint):
        return checkpoint, None
    path, ref = resolve_checkpoint(settings, client_for(settings), str(checkpoint))
    return str(path), ref


def registry_version(settings: Settings, checksum: str) -> RegistryVersion | None:
    """The registered version whose weights have ``checksum`` (None when unregistered)."""
    return version_of_checksum(client_for(settings), checksum)


def audit_changes(settings: Settings, run_id: str, lineage: Lineage,
                  max_worst_group_drop: float) -> list[AuditEvent]:
    """The events an audit run (``run_id``) raises against the previous audit of the same
    model (the registered model, or the same weights when unregistered)."""
    client = client_for(settings)
    current = AuditRecord.from_run(client.get_run(run_id))
    key, by = ((lineage.registry.name, "registered_model") if lineage.registry
               else (lineage.model_checksum, "model.checksum"))
    before = [r for r in audit_history(client, key, 5, by=by)
              if r.run_id != run_id and r.start_time <= current.start_time]
    return audit_events(current, before[0] if before else None, max_worst_group_drop)


def start_parent_run(settings: Settings, flow_name: str, lineage: Lineage,
                     params: dict[str, Any]) -> str:
    """An open run of ``vitsem/<flow>`` that the flow's steps log under as children."""
    from mlflow.entities import Param

    client, run = _new_run(settings, flow_name, lineage)
    run_id = str(run.info.run_id)
    client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in sorted(params.items())])
    return run_id


def finish_parent_run(settings: Settings, run_id: str, children: list[str],
                      status: str = "FINISHED") -> None:
    """Copy the children's ``summary.*`` scalars and pattern signatures to the parent (so
    the parents of nightly audits compare side by side) and close it as ``status``."""
    from mlflow.entities import Metric, RunTag

    client = client_for(settings)
    ts = int(time.time() * 1000)
    metrics, tags = [], []
    for child in children:
        data = client.get_run(child).data
        metrics += [Metric(k, float(v), ts, 0) for k, v in data.metrics.items()
                    if k.startswith("summary.")]
        tags += [RunTag(k, v) for k, v in data.tags.items() if k == "vitsem.patterns"]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    client.set_terminated(run_id, status)


def log_epoch(settings: Settings, run_id: str | None, params: dict[str, Any],
              record: dict[str, float]) -> str:
    """Log one pre-training epoch's record (step = epoch) to ``run_id``, creating a run of
    ``vitsem/guided_pretrain`` with ``params`` on the first epoch. Returns the run id."""
    from mlflow.entities import Metric, Param

    client = client_for(settings)
    if run_id is None:
        run = client.create_run(experiment_id(settings, "guided_pretrain"),
                                tags={"vitsem.flow": "guided_pretrain"})
        run_id = str(run.info.run_id)
        client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in sorted(params.items())])
    step = int(record["epoch"])
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in record.items()
                                      if k != "epoch" and v == v])
    return run_id


def log_audit_scores(settings: Settings, run_id: str, summary: dict[str, Any]) -> None:
    """Add an audit's faithfulness (ABPC per map) and repairs (accuracy, worst-group accuracy
    and gap closed per method) to its run."""
    from mlflow.entities import Metric

    client = client_for(settings)
    ts = int(time.time() * 1000)
    metrics = [Metric(metric_name("faithfulness", m, "abpc"), float(f["abpc"]), ts, 0)
               for m, f in summary.get("faithfulness", {}).items() if f["abpc"] == f["abpc"]]
    for method, o in summary.get("repairs", {}).items():
        for key in ("accuracy", "worst_group_accuracy", "gap_closed"):
            v = o.get(key)
            if v is not None and v == v:
                metrics.append(Metric(metric_name("repair", method, key), float(v), ts, 0))
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def register_repair(settings: Settings, run_id: str, checkpoint: Path, family: str,
                    audit_digest: str, metrics: dict[str, float]) -> str:
    """Register a repaired checkpoint as a new version of model ``family`` (alias
    ``repaired``), logged to the audit's run and tagged with the audit; the version of an
    audit already registered is returned, not registered again. Returns the version."""
    client = client_for(settings)
    quoted = family.replace("'", "\\'")
    for v in client.search_model_versions(f"name = '{quoted}'"):
        if v.tags.get("vitsem.audit_digest") == audit_digest:
            return str(v.version)
    _run, version = register_checkpoint(settings, checkpoint, family, "repaired", {}, {},
                                        run_id=run_id)
    client.set_model_version_tag(family, version, "vitsem.audit_digest", audit_digest)
    client.set_model_version_tag(family, version, "vitsem.repair", "dfr:pseudo")
    for k, val in metrics.items():
        client.set_model_version_tag(family, version, f"vitsem.{k}", f"{val:.4f}")
    return version
