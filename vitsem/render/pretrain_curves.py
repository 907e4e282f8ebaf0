"""The probe and k-NN curves of a pre-training run, for its MLflow artifacts."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

CURVES = {"linear_probe": "linear probe", "knn": "k-NN"}


def pretrain_curves_figure(history: Sequence[dict[str, float]], title: str = "") -> Figure:
    """Accuracy of the linear probe and k-NN against epoch, from the run's epoch records
    (epochs without an evaluation are skipped), and the reconstruction loss."""
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in CURVES.items():
        points = [(r["epoch"], r[key]) for r in history if key in r and r[key] == r[key]]
        if points:
            acc.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
    acc.set_xlabel("epoch")
    acc.set_ylabel("accuracy")
    acc.legend(fontsize=8)
    loss.plot([r["epoch"] for r in history], [r["loss"] for r in history], marker="o", ms=3,
              color="tab:gray")
    loss.set_xlabel("epoch")
    loss.set_ylabel("reconstruction loss")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
