"""Promotion hold: the flow the audit-event automation runs (see ``prefect.yaml``). While a
registered model is on hold, ``vitsem model promote`` refuses every challenger."""

from __future__ import annotations

from prefect import flow, get_run_logger

from vitsem.platform.history import set_hold
from vitsem.platform.registry import parse_model_uri
from vitsem.platform.settings import Settings
from vitsem.platform.tracking import open_client


@flow(name="hold_promotion", flow_run_name="hold promotion of {model}", retries=2,
      retry_delay_seconds=10)
def hold_promotion(model: str, reason: str) -> str:
    """Put registered model ``model`` on hold with ``reason`` (the audit event that asked)."""
    parse_model_uri(f"models:/{model}@champion")  # a model name, not a path or a query
    set_hold(open_client(Settings().resolved_mlflow_uri()), model, reason)
    get_run_logger().warning("promotions of %s are on hold: %s", model, reason)
    return reason
