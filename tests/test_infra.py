"""Deployment files, checked by reading: no Docker engine runs on the project machines."""

from __future__ import annotations

import copy
import importlib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

import vitsem

ROOT = Path(__file__).resolve().parents[1]


COMPOSE = ROOT / "infra" / "docker-compose.yml"
SECRET_WORDS = ("PASSWORD", "SECRET", "_KEY", "AUTH_STRING")
ONE_SHOT = {"buckets", "migrate", "deploy"}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_stack_is_consistent() -> None:
    doc = _compose()
    services = doc["services"]
    assert {"postgres", "s3", "mlflow", "prefect", "migrate", "worker", "worker-gpu"} <= set(
        services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    worker = services["worker"]
    env = worker["environment"]
    assert env["VITSEM_DATABASE_URL"].startswith("postgresql+psycopg2://")
    assert env["VITSEM_ARTIFACT_URI"].startswith("s3://vitsem/")
    assert env["PREFECT_API_URL"] == "http://prefect:4200/api" and env["PREFECT_API_AUTH_STRING"]
    assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
    assert worker["command"][:3] == ["worker", "start", "--pool"]  # a pool, not `serve`
    mlflow = services["mlflow"]["command"]
    for flag in ("--backend-store-uri postgresql", "--serve-artifacts", "--allowed-hosts",
                 "--app-name basic-auth", "--artifacts-destination s3://"):
        assert flag in mlflow, flag
    prefect = services["prefect"]["environment"]
    assert prefect["PREFECT_UI_API_URL"].endswith("/api") and prefect["PREFECT_API_URL"]
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"]
    assert services["worker-gpu"]["build"]["args"]["TORCH_INDEX"].endswith(("cu128", "cu126"))
    for vol in doc["volumes"]:
        assert any(vol in str(s.get("volumes", [])) for s in services.values())
    init = (ROOT / "infra" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow" in init and "CREATE DATABASE prefect" in init


def test_compose_lint_pinned_tags_no_default_secrets_local_ports_healthchecks() -> None:
    import re

    text = COMPOSE.read_text()
    services = _compose()["services"]
    for name, svc in services.items():
        image = svc.get("image")
        if image:  # a pinned version: a tag with a digit, never latest or a bare major
            tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            assert re.match(r"^v?\d+\.\d+", tag) and "latest" not in image, (name, image)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        if name in ONE_SHOT:
            assert svc["restart"] == "no", name
        else:
            assert svc.get("restart") == "unless-stopped", name
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    # One-shot services gate the rest: dependants wait for their success.
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            want = ("service_completed_successfully" if dep in ONE_SHOT
                    else "service_healthy")
            assert cond["condition"] == want, (name, dep)
    # Secrets: every variable that looks like one is required, none has a default.
    for var, default in re.findall(r"\$\{(\w+)(:?[-?][^}]*)?\}", text):
        if any(w in var for w in SECRET_WORDS):
            assert default.startswith(":?"), f"{var} has a default or is optional"
    assert not re.search(r"(PASSWORD|SECRET|_KEY)\w*:\s+(?!\$|\*)[\w-]{4,}", text)
    assert "minio" not in text.lower()
    ini = (ROOT / "infra" / "mlflow-auth.ini").read_text()
    assert "admin_password" not in ini
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text()
    rules = [r for r in ignored.splitlines() if r and not r.startswith("#")]
    assert rules[0] == "**" and {"!vitsem/", "!infra/requirements.lock"} <= set(rules)


def _check_deployments(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """Every deployment's entrypoint imports, and its parameters validate against the flow's
    parameter models (nested keys included: a typo must fail, not be dropped)."""
    names = set()
    for dep in doc["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        names.add((flow.name, dep["name"]))
        hints = typing.get_type_hints(flow.fn)
        params = dep.get("parameters", {})
        assert set(params) <= set(hints) - {"return"}, dep["name"]
        for name, value in params.items():
            model = hints[name]
            assert isinstance(model, type) and issubclass(model, BaseModel), name
            model.model_validate(value)
    return names


def test_prefect_yaml_deployments_match_their_flows() -> None:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = _check_deployments(doc)
    assert ("model_audit", "scheduled-audit") in names
    assert len({name for _, name in names}) == len(doc["deployments"])  # distinct names
    for dep in doc["deployments"]:
        assert dep["description"] and "vitsem" in dep["tags"], dep["name"]
        assert str(dep["version"]) == vitsem.__version__, dep["name"]
    audit = next(d for d in doc["deployments"] if d["name"] == "scheduled-audit")
    assert audit["schedules"][0]["cron"] == "0 3 * * *"
    assert audit["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    # The check fails on a misspelt nested key and on a bad choice.
    for key, value in (("chekpoint", "/x.safetensors"), ("weighting", "votes")):
        bad = copy.deepcopy(doc)
        bad["deployments"][0]["parameters"]["params"][key] = value
        with pytest.raises(ValidationError):
            _check_deployments(bad)


def test_vitsem_serve_builds_exactly_the_deployments_of_prefect_yaml() -> None:
    from flows.deployments import load_deployment_specs, load_entrypoint, runner_deployments

    specs = load_deployment_specs()
    data = {"data": "/elsewhere/data", "model": None, "checkpoint": "/elsewhere/m.safetensors"}
    served = runner_deployments(data)
    assert [(d.flow_name, d.name) for d in served] == [
        (load_entrypoint(s["entrypoint"]).name, s["name"]) for s in specs]
    for dep, spec in zip(served, specs, strict=True):
        assert dep.tags == spec["tags"] and dep.description == spec["description"]
        assert dep.version == str(spec["version"])
        assert len(dep.triggers or []) == len(spec.get("triggers", []))
        if "params" not in spec.get("parameters", {}):  # the hold automation: no data
            continue
        params = dep.parameters["params"]
        assert params["data"] == "/elsewhere/data"  # serve's data replaces the file's
        if "checkpoint" in spec["parameters"]["params"]:
            assert params["checkpoint"] == "/elsewhere/m.safetensors"
        else:  # pre-training: keeps its own parameters, gets no checkpoint
            assert "checkpoint" not in params and params["masker"] == "sift"
        crons = [s.schedule.cron for s in dep.schedules or []]
        assert crons == [s["cron"] for s in spec.get("schedules", [])]
        limit = spec.get("concurrency_limit")
        if limit:
            assert dep.concurrency_limit == limit["limit"]
            assert dep.concurrency_options.collision_strategy == limit["collision_strategy"]
    (audit,) = [d for d in runner_deployments(data, cron="*/5 * * * *")
                if d.name == "scheduled-audit"]
    assert [s.schedule.cron for s in audit.schedules] == ["*/5 * * * *"]


def test_run_names_say_what_runs() -> None:
    from flows.common import DataParams, describe_params

    assert describe_params(DataParams(data="/d/sc", checkpoint="/m/tiny.safetensors")
                           ) == "tiny on sc"
    assert describe_params({"data": "/d/sc", "split": "train", "model": "vit_base_patch16_224"}
                           ) == "vit_base_patch16_224 on sc/train"
    assert describe_params({"data": "/d/sc"}) == "sc"


def test_dockerfile_pins_torch_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
    assert "USER vitsem" in text and 'ENTRYPOINT ["vitsem"]' in text


def test_the_image_installs_from_a_hashed_lock_that_covers_the_dependencies() -> None:
    """Every dependency of pyproject.toml (torch aside: it comes from the torch index) and
    every server pin of infra/platform.in is in infra/requirements.lock, at a version its
    specifier allows, with hashes; the Dockerfile installs from it with --require-hashes."""
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = (ROOT / "infra" / "requirements.lock").read_text()
    pinned: dict[str, str] = {}
    for block in re.split(r"\n(?=[a-z0-9])", lock):
        m = re.match(r"([a-z0-9._-]+)==(\S+) \\", block)
        if m:
            assert "--hash=sha256:" in block, m.group(1)
            pinned[canonicalize_name(m.group(1))] = m.group(2)
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted += [line for line in (ROOT / "infra" / "platform.in").read_text().splitlines()
               if line and not line.startswith("#")]
    for text in wanted:
        req = Requirement(text)
        if req.name in {"torch", "torchvision"}:
            assert canonicalize_name(req.name) not in pinned  # CPU and CUDA wheels differ
            continue
        version = pinned.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is missing from the lock: run scripts/lock.sh"
        assert req.specifier.contains(version, prereleases=True), (req, version)
    docker = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r infra/requirements.lock" in docker
    assert re.search(r"pip install --no-deps \.", docker)


@pytest.mark.usefixtures("prefect_api")
def test_a_cuda_model_pass_holds_a_slot_of_the_gpu_limit() -> None:
    """``device_slot`` takes a slot of the global limit ``vitsem-gpu`` for CUDA work (so a
    second pass waits) and none for the CPU; without the limit nothing waits."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.common import GPU_LIMIT, device_slot

    with device_slot("cuda:0"):  # no limit yet: proceeds
        pass
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT,
                                                                            limit=1))

        def active() -> int:
            return int(client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots)

        with device_slot("cpu"):
            assert active() == 0
        with device_slot("cuda"):
            assert active() == 1
        assert active() == 0
