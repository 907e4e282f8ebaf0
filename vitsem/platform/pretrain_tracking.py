"""MLflow records of guided pre-training that the generic tracking module does not keep:
registration that a rerun does not repeat, and the run's probe and k-NN curves as a
picture. (The per-epoch metrics, with the epoch as step, are logged by
:func:`vitsem.platform.tracking.log_epoch`.)"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt

from vitsem.method.models import model_checksum, read_checkpoint_spec
from vitsem.platform import tracking
from vitsem.platform.registry import version_of_checksum
from vitsem.platform.settings import Settings
from vitsem.render.pretrain_curves import pretrain_curves_figure

__all__ = ["CURVES_ARTIFACT", "log_curves", "register_encoder_once"]

CURVES_ARTIFACT = "curves/pretrain-curves.png"


def register_encoder_once(settings: Settings, checkpoint: Path, name: str, alias: str,
                          run_id: str | None) -> tuple[str | None, str, bool]:
    """Register ``checkpoint`` as a version of model ``name`` with ``alias``, unless a
    version of ``name`` from the same MLflow run ``run_id`` already holds these weights (by
    the checksum tag), as after a rerun of a finished run: then that version gets the alias
    and nothing is registered. (Another run that happens to produce the same weights, e.g.
    the same settings in another artifact store, still registers its own version.)

    Returns (run id, version, whether a new version was registered)."""
    spec = read_checkpoint_spec(checkpoint)
    if spec is not None:
        client = tracking.client_for(settings)
        found = version_of_checksum(client, model_checksum(spec, checkpoint))
        if found is not None and found.name == name and (
                run_id is None or client.get_model_version(name, found.version).run_id == run_id):
            client.set_registered_model_alias(name, alias, found.version)
            return run_id, found.version, False
    run, version = tracking.register_checkpoint(settings, checkpoint, name, alias, {}, {},
                                                run_id=run_id)
    return run, version, True


def log_curves(settings: Settings, run_id: str, history: Sequence[dict[str, float]],
               title: str = "") -> str:
    """Draw the run's probe and k-NN curves and store the PNG as the run's artifact
    :data:`CURVES_ARTIFACT` (replaced on a rerun). Returns the artifact path."""
    fig = pretrain_curves_figure(history, title)
    with tempfile.TemporaryDirectory(prefix="vitsem-curves-") as tmp:
        path = Path(tmp) / Path(CURVES_ARTIFACT).name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        client = tracking.client_for(settings)
        client.log_artifact(run_id, str(path), artifact_path=str(Path(CURVES_ARTIFACT).parent))
    return CURVES_ARTIFACT
