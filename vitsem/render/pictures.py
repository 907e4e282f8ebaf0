"""Pictures of an analysis: attention heatmaps with keypoints, level matrices, layer profile.

All functions return a matplotlib Figure (Agg backend, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle

from vitsem.method.concentration import TokenGrid
from vitsem.method.pipeline import AnalysisResult, Example
from vitsem.paths import path_text

# File and class names are drawn as text: "$...$" in a name must not parse as math.
matplotlib.rcParams["text.parse_math"] = False

LEVEL_COLOURS = ("none", "#ffd400", "#ff2d2d", "#9b30ff", "#00c8ff")


def _upsample(values: np.ndarray, grid: TokenGrid) -> np.ndarray:
    gh, gw = grid.grid_hw
    ph, pw = grid.patch_hw
    return np.kron(values.reshape(gh, gw), np.ones((ph, pw)))


def _draw_keypoints(ax: plt.Axes, ex: Example, grid: TokenGrid) -> None:
    ax.imshow(ex.view)
    _gh, gw = grid.grid_hw
    ph, pw = grid.patch_hw
    for idx in np.flatnonzero(ex.levels > 0):
        r, c = divmod(int(idx), gw)
        colour = LEVEL_COLOURS[min(int(ex.levels[idx]), len(LEVEL_COLOURS) - 1)]
        ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False,
                               edgecolor=colour, linewidth=1.0))
    kp = ex.keypoints
    for (x, y), s in zip(kp.xy, kp.size, strict=True):
        ax.add_patch(Circle((x, y), max(float(s) / 2, 0.8), fill=False, edgecolor="#00ff66",
                            linewidth=0.6))
    ax.set_title(f"{len(kp)} keypoints; patches by level", fontsize=8)


def attention_figure(ex: Example, result: AnalysisResult, class_names: list[str] | None = None
                     ) -> Figure:
    """Row 1: the model view with SIFT keypoints (green) and keypoint patches outlined by
    level (yellow = lower, red = upper), then the head-mean CLS attention of each layer.
    Row 2: every head of the last layer."""
    grid = result.layout.grid
    layers, heads = result.num_layers, result.num_heads
    ncols = max(layers, heads) + 1
    fig, axes = plt.subplots(2, ncols, figsize=(1.9 * ncols, 4.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    _draw_keypoints(axes[0, 0], ex, grid)
    label = class_names[ex.predicted] if class_names and ex.predicted < len(class_names) else (
        str(ex.predicted))
    axes[1, 0].imshow(ex.view)
    axes[1, 0].set_title(f"predicted: {label}", fontsize=8)
    if ex.cls_maps is None:
        axes[0, 1].text(0, 0.5, "model has no CLS token", fontsize=8)
        return fig

    cmap = plt.get_cmap("inferno")

    def overlay(ax: plt.Axes, values: np.ndarray, title: str) -> None:
        # Opacity follows attention, so the image stays visible where attention is low.
        heat = _upsample(values / max(float(values.max()), 1e-12), grid)
        rgba = cmap(heat)
        rgba[..., 3] = 0.1 + 0.75 * heat
        ax.imshow(ex.view)
        ax.imshow(rgba, extent=(-0.5, ex.view.shape[1] - 0.5, ex.view.shape[0] - 0.5, -0.5))
        ax.set_title(f"{title}\nmax {float(values.max()):.2f}", fontsize=7)

    for layer in range(layers):
        overlay(axes[0, layer + 1], ex.cls_maps[layer].mean(0), f"layer {layer} CLS (mean)")
    for head in range(heads):
        overlay(axes[1, head + 1], ex.cls_maps[-1, head], f"layer {layers - 1} head {head}")
    fig.suptitle(path_text(ex.path), fontsize=8)
    fig.tight_layout()
    return fig


def level_matrix_figure(result: AnalysisResult) -> Figure:
    """Per layer, the head-mean level interrelation matrix R[a, b] (annotated), coloured by
    log2 of R over its uniform-attention baseline: red = more attention than uniform."""
    s = result.summary()
    r = np.nanmean(s["level_matrix"].mean, axis=1)  # (L, K, K)
    base = s["uniform_level_matrix"].mean  # (K, K)
    layers, k = r.shape[0], r.shape[1]
    fig, axes = plt.subplots(1, layers, figsize=(2.2 * layers, 2.6), squeeze=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log2(r / base[None])
    vmax = float(np.nanmax(np.abs(ratio))) if np.isfinite(ratio).any() else 1.0
    names = ["L0 none"] + [f"L{i}" for i in range(1, k)]
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(ratio[layer], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for a in range(k):
            for b in range(k):
                ax.text(b, a, f"{r[layer, a, b]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(k), names, fontsize=6)
        ax.set_yticks(range(k), names if layer == 0 else [""] * k, fontsize=6)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xlabel("key level", fontsize=7)
        if layer == 0:
            ax.set_ylabel("query level", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="log2(R / uniform)")
    fig.suptitle(f"Level interrelation R (mean over heads, {result.num_images} images); "
                 "uniform baseline row: " + " ".join(f"{v:.2f}" for v in base[0]), fontsize=8)
    return fig


def layer_profile_figure(result: AnalysisResult) -> Figure:
    """Semantic lift and CLS weighted focus against depth: the head mean with its 95%
    interval, and each head's mean as a dot. 1 = uniform attention."""
    s = result.summary()
    layers = np.arange(result.num_layers)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, name, title in ((axes[0], "semantic_lift", "semantic lift (query patches)"),
                            (axes[1], "cls_focus", "CLS weighted semantic focus")):
        per_head = s[name].mean  # (L, H)
        layer = s[f"{name}_layer"]
        for h in range(per_head.shape[1]):
            ax.scatter(layers, per_head[:, h], s=10, color="grey", alpha=0.6,
                       label="heads" if h == 0 else None)
        ax.plot(layers, layer.mean, color="C3", marker="o", label="mean over heads")
        ax.fill_between(layers, layer.ci_low, layer.ci_high, color="C3", alpha=0.25,
                        label="95% interval")
        ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8, label="uniform")
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(layers)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Semantic layer profile ({result.num_images} images)", fontsize=9)
    fig.tight_layout()
    return fig
