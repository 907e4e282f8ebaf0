"""The pre-training loop: epochs of MAE with a chosen masker, evaluation by linear probe and
k-NN, and a complete, resumable state after every epoch.

The state (weights, optimiser, epoch, the data-order and mask generators, history) is saved
as a dict of tensors and plain values, read back with ``torch.load(weights_only=True)``; a
run resumed from it continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vitsem.errors import ConfigError, PretrainInputError
from vitsem.method.concentration import SemanticConfig
from vitsem.method.models import ModelSpec, create_model
from vitsem.method.training import warmup_cosine_lr
from vitsem.pretrain.mae import MaskedAutoencoder
from vitsem.pretrain.maskers import MASKERS, NEEDS_ATTENTION, MaskSpec, loss_weights, make_mask
from vitsem.pretrain.probe import check_probe_data, encode_all, knn_accuracy, linear_probe_accuracy


@dataclass(frozen=True)
class PretrainConfig:
    """Encoder (a timm ViT built from ``model`` with ``img_size``, ``patch_size``,
    ``depth``), decoder (``norm_pix_loss``: MAE's per-patch normalised target), masker and
    optimiser settings. ``eval_epochs``: epochs after which the probes run (default: every
    epoch); ``knn_standardise``: the k-NN compares standardised features, as the linear probe
    does; ``amp``: bfloat16 autocast on CUDA."""

    model: str = "vit_tiny_patch16_224"
    img_size: int = 64
    patch_size: int = 8
    depth: int = 4
    decoder_dim: int = 128
    decoder_depth: int = 2
    norm_pix_loss: bool = True
    masker: str = "random"
    mask: MaskSpec = field(default_factory=MaskSpec)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    eval_epochs: tuple[int, ...] | None = None
    knn_k: int = 20
    knn_standardise: bool = True
    seed: int = 0
    device: str = "cpu"
    amp: bool = True

    def validate(self) -> None:
        if self.masker not in MASKERS:
            raise ConfigError(f"unknown masker {self.masker!r}; choose one of {sorted(MASKERS)}")
        self.mask.validate()
        self.semantic.validate()
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")

    def encoder_spec(self) -> ModelSpec:
        return ModelSpec(self.model, {"img_size": self.img_size, "patch_size": self.patch_size,
                                      "depth": self.depth, "num_classes": 0})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_epochs"] = list(self.eval_epochs) if self.eval_epochs is not None else None
        return d


@dataclass
class PretrainData:
    """``images`` (M, 3, H, W) normalised float; ``weights`` (M, N) semantic weights of
    each image's patches on the encoder's grid (precomputed from stored keypoints);
    ``probe`` = (train images, train labels, test images, test labels)."""

    images: torch.Tensor
    weights: torch.Tensor
    probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class PretrainState:
    model: MaskedAutoencoder
    optimizer: torch.optim.Optimizer
    epoch: int
    order_gen: torch.Generator
    mask_gen: torch.Generator
    history: list[dict[str, float]]


def check_data(cfg: PretrainConfig, data: PretrainData, model: MaskedAutoencoder) -> None:
    m, n = data.weights.shape
    if m != len(data.images):
        raise PretrainInputError(f"{len(data.images)} images but {m} rows of keypoint weights")
    if n != model.num_patches:
        raise PretrainInputError(
            f"the keypoint weights cover {n} patches per image but the encoder's grid has "
            f"{model.num_patches} ({cfg.img_size} px / {cfg.patch_size} px patches); compute "
            "the weights on this encoder's grid (the flow does it from the keypoint store)")
    if len(data.images) == 0:
        raise PretrainInputError("no images to pre-train on")
    check_probe_data(data.probe[1], data.probe[3])


def new_state(cfg: PretrainConfig) -> PretrainState:
    cfg.validate()
    torch.manual_seed(cfg.seed)
    encoder = create_model(cfg.encoder_spec())
    model = MaskedAutoencoder(encoder, cfg.decoder_dim, cfg.decoder_depth,
                              norm_pix_loss=cfg.norm_pix_loss).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))
    order = torch.Generator().manual_seed(cfg.seed)
    mask = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
    return PretrainState(model, opt, 0, order, mask, [])


def save_state(state: PretrainState) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "epoch": state.epoch, "order_gen": state.order_gen.get_state(),
                "mask_gen": state.mask_gen.get_state(), "history": state.history}, buf)
    return buf.getvalue()


def load_state(cfg: PretrainConfig, blob: bytes) -> PretrainState:
    """A state saved by :func:`save_state`; only tensors and plain values are read."""
    state = new_state(cfg)
    saved = torch.load(io.BytesIO(blob), map_location=cfg.device, weights_only=True)
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.order_gen.set_state(saved["order_gen"].cpu())
    state.mask_gen.set_state(saved["mask_gen"].to(state.mask_gen.device)
                             if state.mask_gen.device.type != "cpu" else saved["mask_gen"].cpu())
    state.epoch = int(saved["epoch"])
    state.history = list(saved["history"])
    return state


def _lr(cfg: PretrainConfig, step: int, steps_per_epoch: int) -> float:
    return warmup_cosine_lr(cfg.lr, step, int(cfg.warmup_epochs * steps_per_epoch),
                            cfg.epochs * steps_per_epoch)


def train_epoch(state: PretrainState, data: PretrainData, cfg: PretrainConfig
                ) -> dict[str, float]:
    """One epoch over ``data.images``; returns the mean loss and the seconds spent in all
    and in masking (for ``attmask`` that includes the attention forward)."""
    model, device = state.model, cfg.device
    model.train()
    m = len(data.images)
    steps = math.ceil(m / cfg.batch_size)
    order = torch.randperm(m, generator=state.order_gen)
    amp = cfg.amp and torch.device(device).type == "cuda"
    losses, mask_seconds = [], 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        x = data.images[idx].to(device, non_blocking=True)
        w = data.weights[idx].to(device, non_blocking=True)
        tm = time.perf_counter()
        if cfg.masker in NEEDS_ATTENTION:
            # AttMask: the current encoder's CLS attention with every patch visible, from a
            # no-grad forward before this step (its cost counts as masking time).
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                scores = model.cls_attention(x)
            mask = make_mask(cfg.masker, scores.float(), cfg.mask, state.mask_gen)
        else:
            mask = make_mask(cfg.masker, w, cfg.mask, state.mask_gen)
        lw = loss_weights(cfg.masker, w, cfg.mask)
        mask_seconds += time.perf_counter() - tm
        for group in state.optimizer.param_groups:
            group["lr"] = _lr(cfg, state.epoch * steps + i, steps)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(x, mask, lw)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        losses.append(loss.detach())
    seconds = time.perf_counter() - t0
    state.epoch += 1
    return {"loss": float(torch.stack(losses).mean()), "epoch_seconds": seconds,
            "mask_seconds": mask_seconds}


def evaluate(state: PretrainState, data: PretrainData, cfg: PretrainConfig) -> dict[str, float]:
    """Linear-probe and k-NN accuracy of the encoder's frozen features."""
    state.model.eval()
    tr_x, tr_y, te_x, te_y = data.probe
    ftr = encode_all(state.model.features, tr_x, device=cfg.device)
    fte = encode_all(state.model.features, te_x, device=cfg.device)
    return {"linear_probe": linear_probe_accuracy(ftr, tr_y, fte, te_y),
            "knn": knn_accuracy(ftr, tr_y, fte, te_y, cfg.knn_k,
                                standardise=cfg.knn_standardise)}


EpochCallback = Callable[[PretrainState, dict[str, float]], None]


def pretrain(cfg: PretrainConfig, data: PretrainData, *, resume: bytes | None = None,
             on_epoch: EpochCallback | None = None, stop_after: int | None = None
             ) -> PretrainState:
    """Pre-train to ``cfg.epochs`` (from ``resume`` when given). ``on_epoch`` receives the
    state after each epoch (to save it) and the epoch's record; ``stop_after`` ends early
    after that many epochs of this call."""
    state = load_state(cfg, resume) if resume is not None else new_state(cfg)
    check_data(cfg, data, state.model)
    done = 0
    while state.epoch < cfg.epochs and (stop_after is None or done < stop_after):
        record: dict[str, float] = {"epoch": float(state.epoch + 1)}
        record |= train_epoch(state, data, cfg)
        if cfg.eval_epochs is None or state.epoch in cfg.eval_epochs:
            record |= evaluate(state, data, cfg)
        state.history.append(record)
        if on_epoch is not None:
            on_epoch(state, record)
        done += 1
    return state
