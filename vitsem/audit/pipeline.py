"""The spurious-correlation audit on arrays (METHOD.md §3), one harness for every map.

For each attribution map (the method's ``semantic`` map and the baselines): discover
recurring keypoint patterns in the most-attributed patches per predicted class, grow each
candidate's patch set until removing it no longer hurts more (:mod:`vitsem.audit.grow`),
confirm it by removing its tokens against matched random removals, score each image's
reliance on the top finding, measure the map's faithfulness (deletion curves, ABPC), and
prompt the model by removing the relied-on findings' tokens. Given held-out labelled data,
the findings become pseudo-groups for a last-layer repair (:mod:`vitsem.audit.repair`).
Storage and orchestration live elsewhere; this module sees arrays and a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from vitsem.audit.causal import CausalResult, causal_check
from vitsem.audit.discovery import (
    Candidate,
    discover_candidates,
    match_patches,
    recurring_positions,
)
from vitsem.audit.faithfulness import Faithfulness, faithfulness
from vitsem.audit.grow import grow_candidate
from vitsem.audit.maps import MAPS
from vitsem.audit.prompting import (
    keep_top_k,
    matched_random,
    prompt_outcome,
    safe_removal,
)
from vitsem.audit.repair import repair_last_layer
from vitsem.audit.results import (
    METHOD,
    AuditData,
    AuditResult,
    Finding,
    MapAudit,
    PromptOutcome,
)
from vitsem.audit.scores import off_object_semantic_attention, patch_coverage
from vitsem.audit.tokens import predict_without
from vitsem.audit.verdicts import ReviewDecision, carry_review, verdict_of
from vitsem.errors import AuditInputError, ConfigError
from vitsem.method.attention import token_layout
from vitsem.method.concentration import (
    SemanticConfig,
    TokenGrid,
    concentration,
    patch_weights,
)
from vitsem.method.keypoints import Keypoints
from vitsem.method.training import in_batches, model_device
from vitsem.method.view import ModelView

__all__ = ["METHOD", "AuditConfig", "AuditData", "AuditResult", "Finding", "MapAudit",
           "MapResult", "Prepared", "PromptOutcome", "assemble", "audit", "audit_map",
           "check_audit_data", "maps_to_audit", "prepare", "repair_audit", "repair_reference"]

DEFAULT_MAPS = tuple(m for m in MAPS if m != "occlusion")
"""Every map but leave-one-out occlusion, which costs N forwards per image; ask for it."""


@dataclass(frozen=True)
class AuditConfig:
    """Audit settings. ``top_fraction``: share of patches counted as most attributed;
    ``max_checked``: candidates per map given the causal check; ``alpha``/``min_effect``:
    significance and minimum probability drop (beyond random) that confirm a candidate;
    ``on_object_limit``: a confirmed candidate whose patches the object covers at least this
    much is the object itself, not a shortcut (needs masks); ``keep_fraction``: patches kept
    by the keep-top-k prompt; ``positions``: also propose recurring top-attributed grid
    positions as candidates (a pattern at a fixed place that holds no keypoint, see
    :func:`vitsem.audit.discovery.recurring_positions`); ``grow``/``grow_rings``: grow
    candidates' patch sets (see :mod:`vitsem.audit.grow`);
    ``faithfulness_images``/``faithfulness_steps``: images (a seeded sample) and removal
    fractions of the deletion curves (0 images: skip);
    ``repair_min_images``/``repair_min_per_group``: the least held-out data the repair
    accepts."""

    maps: tuple[str, ...] = DEFAULT_MAPS
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    top_fraction: float = 0.1
    eps_factor: float = 0.3
    min_recurrence: float = 0.3
    min_enrichment: float = 1.5
    max_checked: int = 4
    causal_trials: int = 5
    alpha: float = 0.01
    min_effect: float = 0.05
    on_object_limit: float = 0.5
    keep_fraction: float = 0.5
    batch_size: int = 64
    positions: bool = True
    grow: bool = True
    grow_rings: int = 2
    grow_trials: int = 2
    faithfulness_images: int = 128
    faithfulness_steps: int = 8
    repair_min_images: int = 20
    repair_min_per_group: int = 2
    seed: int = 0
    device: str = "cpu"
    """Where the model runs (``cpu``, ``cuda``, ``cuda:N``); inputs stay in host memory and
    go there a batch at a time. Not a result-affecting setting (no part of the digest)."""

    def validate(self) -> None:
        self.semantic.validate()
        unknown = [m for m in self.maps if m not in MAPS]
        if unknown or not self.maps:
            raise ConfigError(f"unknown attribution maps {unknown}; choose from {sorted(MAPS)}")
        for name in ("top_fraction", "keep_fraction", "alpha", "on_object_limit",
                     "min_recurrence"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {v}")
        if min(self.max_checked, self.causal_trials, self.batch_size, self.grow_trials) < 1:
            raise ConfigError("max_checked, causal_trials, grow_trials and batch_size must be "
                             ">= 1")
        if self.faithfulness_steps < 2 or self.faithfulness_images < 0 or self.grow_rings < 0:
            raise ConfigError("faithfulness_steps must be >= 2, faithfulness_images and "
                             "grow_rings >= 0")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"unknown device {self.device!r}: use cpu, cuda or cuda:N "
                              "(the flows also take auto)") from None


# ---------------------------------------------------------------------------------------------


def check_audit_data(data: AuditData, num_model_classes: int) -> None:
    """Refuse input the audit cannot answer, saying what to change."""
    b = len(data)
    if b == 0:
        raise AuditInputError("no usable images to audit (all were rejected or the folder "
                              "is empty); check the rejected list and the data path")
    if len(data.keypoints) != b or len(data.labels) != b:
        raise AuditInputError(f"{b} views but {len(data.keypoints)} keypoint sets and "
                              f"{len(data.labels)} labels; they must align")
    if len(data.class_names) != num_model_classes:
        raise AuditInputError(
            f"the model has {num_model_classes} output classes but the labels name "
            f"{len(data.class_names)} ({', '.join(data.class_names[:8])}); audit a model "
            "trained on these classes, or give labels in the model's classes")
    present = np.unique(data.labels)
    if len(present) < 2:
        only = data.class_names[int(present[0])] if len(present) else "none"
        raise AuditInputError(
            f"the data set holds one class ({only}); a shortcut is a pattern that separates "
            "classes, so the audit needs images of at least two classes")
    if data.masks is not None and data.masks.shape[:1] != (b,):
        raise AuditInputError(f"{len(data.masks)} masks for {b} images; they must align")


def _predictor(model: nn.Module, batch_size: int) -> Any:
    @torch.no_grad()
    def predict(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return in_batches(partial(predict_without, model), x, drop, batch_size=batch_size,
                          device=model_device(model))
    return predict


def _keypoint_arrays(keypoints: Sequence[Keypoints], grid: TokenGrid
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image: descriptors (K, 128) and patch index (K,) of keypoints inside the grid."""
    desc, patches = [], []
    for k in keypoints:
        if k.descriptors is None:
            raise AuditInputError("keypoints without SIFT descriptors; extract them with "
                                  "SiftParams(descriptors=True)")
        idx = grid.patch_index(k.xy) if len(k) else np.zeros(0, np.int64)
        inside = idx >= 0
        desc.append(np.asarray(k.descriptors, np.float32).reshape(-1, 128)[inside])
        patches.append(idx[inside])
    return desc, patches

@dataclass
class Prepared:
    """What every map's audit of one data set shares, computed from the model and the data
    alone (cheap and deterministic, so each process that audits a map computes it again):
    images ``x`` (B, 3, H, W), the token ``grid`` (N patches), the ``class_names``,
    ``labels``, ``groups`` and the
    model's predictions ``base`` (B,), semantic ``weights`` (B, N), per image the keypoints'
    descriptors (K, 128) and patches (K,) inside the grid, object ``coverage`` (B, N) (None
    without masks), the faithfulness ``sample`` (indices) and ``predict`` (images, dropped
    patches (B, N)) -> logits."""

    grid: TokenGrid
    x: torch.Tensor
    class_names: list[str]
    labels: np.ndarray
    groups: list[str]
    base: np.ndarray
    weights: np.ndarray
    desc: list[np.ndarray]
    kp_patches: list[np.ndarray]
    coverage: np.ndarray | None
    sample: np.ndarray
    predict: Any = field(repr=False)

    @property
    def has_keypoints(self) -> bool:
        """Whether any image holds a keypoint inside the grid (else nothing to report)."""
        return any(len(d) for d in self.desc)


@dataclass(frozen=True)
class MapResult:
    """One map's share of the audit: its findings as discovered and checked (no review
    carried yet) and its faithfulness (None when ``faithfulness_images`` is 0). Depends only
    on the model, the data and the settings, not on which process computed it or on the
    other maps."""

    audit: MapAudit
    faithfulness: Faithfulness | None


def _num_classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0) or 0)


def maps_to_audit(model: nn.Module, view: ModelView, data: AuditData,
                  cfg: AuditConfig = AuditConfig()) -> tuple[str, ...]:
    """The maps :func:`audit` runs on ``data``: ``cfg.maps``, or none when no image holds a
    SIFT keypoint inside the token grid (nothing to report). Refuses bad settings and data
    as :func:`audit` does, without running the model."""
    cfg.validate()
    check_audit_data(data, _num_classes(model))
    desc, _ = _keypoint_arrays(data.keypoints, token_layout(model, view.hw).grid)
    return cfg.maps if any(len(d) for d in desc) else ()


def prepare(model: nn.Module, view: ModelView, data: AuditData,
            cfg: AuditConfig = AuditConfig()) -> Prepared:
    """Check the settings and ``data``, put ``model`` on ``cfg.device`` in eval mode and
    compute what every map's audit shares (:class:`Prepared`): one forward pass."""
    cfg.validate()
    model.to(cfg.device).eval()
    check_audit_data(data, _num_classes(model))
    grid = token_layout(model, view.hw).grid
    labels = np.asarray(data.labels, np.int64)
    groups = list(data.groups) if data.groups is not None else [
        data.class_names[int(c)] for c in labels]
    predict = _predictor(model, cfg.batch_size)
    x = view.to_tensor(data.views)
    none = np.zeros((len(data), grid.num_patches), bool)
    base = predict(x, torch.from_numpy(none)).argmax(-1).numpy()
    conc = np.stack([concentration(k, grid, cfg.semantic.weighting) for k in data.keypoints])
    desc, kp_patches = _keypoint_arrays(data.keypoints, grid)
    coverage = (np.stack([patch_coverage(m > 0, grid) for m in data.masks])
                if data.masks is not None else None)
    sample = np.random.default_rng(cfg.seed).permutation(len(x))[:cfg.faithfulness_images]
    return Prepared(grid, x, list(data.class_names), labels, groups, base,
                    patch_weights(conc), desc, kp_patches, coverage, sample, predict)


def audit_map(model: nn.Module, prep: Prepared, cfg: AuditConfig, name: str) -> MapResult:
    """The heavy part of the audit with the map ``name``: attribution, candidate discovery,
    growth, causal check and the deletion curves on ``prep.sample``. ``prep`` must hold
    keypoints (:attr:`Prepared.has_keypoints`)."""
    if not prep.has_keypoints:
        raise ValueError("no keypoint inside the grid: nothing to audit (see maps_to_audit)")
    m = _audit_map(name, model, prep, cfg)
    faith = None
    if len(prep.sample):
        faith = faithfulness(prep.predict, prep.x[torch.from_numpy(prep.sample)],
                             m.attribution[prep.sample], prep.base[prep.sample],
                             steps=cfg.faithfulness_steps, seed=cfg.seed)
    return MapResult(m, faith)


def assemble(model: nn.Module, view: ModelView, data: AuditData, prep: Prepared,
             maps: Mapping[str, MapResult], cfg: AuditConfig = AuditConfig(), *,
             heldout: AuditData | None = None, family: str = "",
             reviews: Sequence[ReviewDecision] = ()) -> AuditResult:
    """The audit's result from the per-map results ``maps`` (in any order, computed
    anywhere; one per map of ``cfg.maps``, none when ``prep`` holds no keypoint): reviews
    carried, the prompts (each map's relied-on findings removed, random, keep-top-k), the
    notes and, with ``heldout``, the repair (see :func:`audit`)."""
    n = prep.grid.num_patches
    none = np.zeros((len(data), n), bool)

    def outcome(drop: np.ndarray) -> PromptOutcome:
        drop = safe_removal(drop)
        pred = prep.base if not drop.any() else prep.predict(
            prep.x, torch.from_numpy(drop)).argmax(-1).numpy()
        return prompt_outcome(pred, prep.base, prep.labels, prep.groups, data.clean, drop)

    result = AuditResult(data.class_names, prep.grid, prep.labels, prep.base, prep.groups, {},
                         {"none": outcome(none)}, semantic_weights=prep.weights,
                         masks_given=data.masks is not None)
    if not prep.has_keypoints:
        result.status = "nothing_to_report"
        result.notes.append(
            f"no SIFT keypoint in any of the {len(data)} images, so there is no recurring "
            "pattern to test; the images may be blank or too small for SIFT")
        return result
    if set(maps) != set(cfg.maps):
        raise ValueError(f"results of maps {sorted(maps)}, but the audit runs {list(cfg.maps)}")
    if prep.coverage is None:
        result.notes.append(
            "no object masks: a confirmed pattern is 'relied on — review', since the audit "
            "cannot tell a shortcut from a legitimate part of the object without them")
    for name in cfg.maps:  # the settings' order, whatever order the results came in
        m = replace(maps[name].audit,
                    findings=[_carried(f, family, reviews) for f in maps[name].audit.findings])
        result.maps[name] = m
        result.prompts[f"drop:{name}"] = outcome(np.any(
            [f.patches for f in m.relied] or [none], axis=0))
        faith = maps[name].faithfulness
        if faith is not None and len(prep.sample):
            result.faithfulness[name] = faith
    ref = result.maps.get(METHOD) or next(iter(result.maps.values()))
    removed = safe_removal(np.any([f.patches for f in ref.relied] or [none], axis=0))
    result.prompts["random"] = outcome(matched_random(removed, cfg.seed))
    keep = max(1, round(cfg.keep_fraction * n))
    result.prompts["keep_top_k"] = outcome(keep_top_k(prep.weights, keep))
    if not any(m.relied for m in result.maps.values()):
        result.notes.append("no candidate was confirmed by the causal check")
    if heldout is not None:
        repair_audit(model, view, data, result, heldout, cfg)
    return result


def audit(model: nn.Module, view: ModelView, data: AuditData, cfg: AuditConfig = AuditConfig(),
          *, heldout: AuditData | None = None, family: str = "",
          reviews: Sequence[ReviewDecision] = ()) -> AuditResult:
    """Run the audit of ``model`` on ``data`` with every map in ``cfg.maps``. With
    ``heldout`` labelled images (not used in training), the method's relied-on findings are
    turned into pseudo-groups for a last-layer repair, evaluated on ``data``; ``heldout``'s
    own ``groups``, when given, serve as the oracle. ``reviews``: decisions recorded for the
    model ``family``; a finding of the same pattern carries its decision (a pattern reviewed
    as legitimate is neither prompted away nor repaired against) and is flagged only when
    new or regressed.

    In one process, map after map: :func:`prepare`, :func:`audit_map` per map and
    :func:`assemble`; a distributed run calls the same pieces in separate processes."""
    prep = prepare(model, view, data, cfg)
    maps = ({name: audit_map(model, prep, cfg, name) for name in cfg.maps}
            if prep.has_keypoints else {})
    return assemble(model, view, data, prep, maps, cfg, heldout=heldout, family=family,
                    reviews=reviews)


def repair_reference(maps: Mapping[str, MapAudit]) -> MapAudit | None:
    """The map whose confirmed findings become the repair's pseudo-groups: the method's map
    when it confirmed any, else the first map (in audit order) that did; None when none did.
    A finding confirmed by token removal is causal whichever map proposed it, and the
    method's map cannot propose patterns without keypoints."""
    method = maps.get(METHOD)
    if method is not None and method.relied:
        return method
    return next((m for m in maps.values() if m.relied), None)


def _carried(f: Finding, family: str, reviews: Sequence[ReviewDecision]) -> Finding:
    c = carry_review(family, f.class_name, f.centroids, f.radii, f.verdict,
                     f.causal.effect - f.causal.random_effect, reviews)
    return replace(f, verdict=c.verdict, review=c.decision, flag=c.flag)


def repair_audit(model: nn.Module, view: ModelView, data: AuditData, result: AuditResult,
                 heldout: AuditData, cfg: AuditConfig = AuditConfig()) -> None:
    """Repair ``model``'s last layer from the relied-on findings of ``result`` (see
    :func:`repair_reference`), evaluate it on the audited ``data`` and re-audit the
    annotation-free repair. Held-out data or a model the repair cannot use leave the audit as
    it is, with the reason in the notes."""
    ref = repair_reference(result.maps)
    if ref is None:
        result.notes.append("repair skipped: no map confirmed a pattern to build pseudo-groups "
                            "from")
        return
    if ref.map != METHOD and METHOD in result.maps:
        result.notes.append(f"repair from the {ref.map} map's findings: the {METHOD} map "
                            "confirmed none (e.g. a pattern without keypoints)")
    grid = result.grid
    try:
        check_audit_data(heldout, len(data.class_names))
        h_desc, h_patches = _keypoint_arrays(heldout.keypoints, grid)
        present = np.zeros(len(heldout), bool)
        top = None
        for f in ref.relied:
            if len(f.centroids):
                present |= match_patches(f.centroids, f.radii, h_desc, h_patches,
                                         grid.num_patches).any(1)
                continue
            # A pattern found by its place: present where the map ranks a place top.
            if top is None:
                h_conc = np.stack([concentration(k, grid, cfg.semantic.weighting)
                                   for k in heldout.keypoints])
                att = _attribution(ref.map, model, view.to_tensor(heldout.views),
                                   torch.from_numpy(patch_weights(h_conc)).float(),
                                   cfg.batch_size)
                k = max(1, int(np.ceil(cfg.top_fraction * grid.num_patches)))
                top = np.zeros(att.shape, bool)
                np.put_along_axis(top, np.argsort(-att, 1)[:, :k], True, 1)
            places = np.asarray(f.seed_patches.any(0), bool)
            present |= (top & places[None]).any(1)
        rep = repair_last_layer(
            model, view.to_tensor(heldout.views), np.asarray(heldout.labels), present,
            view.to_tensor(data.views), result.labels, result.groups, data.class_names,
            held_true_groups=heldout.groups, min_images=cfg.repair_min_images,
            min_per_group=cfg.repair_min_per_group, seed=cfg.seed)
    except AuditInputError as e:  # RepairInputError included
        result.notes.append(f"repair skipped: {e}")
        return
    result.repairs = rep.outcomes
    result.repaired_models = rep.models
    # Re-audit the annotation-free repair with the reference map: does it still rely on
    # what the unrepaired model relied on?
    again = audit(rep.models["dfr:pseudo"], view, data,
                  replace(cfg, maps=(ref.map,), faithfulness_images=0))
    result.reaudit = {"method": "dfr:pseudo", "map": ref.map,
                      "prompts": {"none": asdict(again.prompts["none"])},
                      "findings": [{k: v for k, v in f.summary().items() if k != "pattern"}
                                   for f in again.maps[ref.map].findings] if ref.map in
                      again.maps else [], "notes": again.notes}


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Patch overlap (B, N) of two findings over the images both mark."""
    rows = a.any(1) & b.any(1)
    union = int((a[rows] | b[rows]).sum())
    return int((a[rows] & b[rows]).sum()) / union if union else 0.0


def _attribution(name: str, model: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                 batch_size: int) -> np.ndarray:
    fn = MAPS[name]
    return in_batches(partial(fn, model), x, weights, batch_size=batch_size,
                      device=model_device(model)).detach().numpy().astype(np.float64)


def _audit_map(name: str, model: nn.Module, prep: Prepared, cfg: AuditConfig) -> MapAudit:
    x, predicted, predict, coverage = prep.x, prep.base, prep.predict, prep.coverage
    w = torch.from_numpy(prep.weights).float()
    attribution = _attribution(name, model, x, w, cfg.batch_size)
    grid_hw = token_layout(model, (int(x.shape[-2]), int(x.shape[-1]))).grid.grid_hw
    candidates = discover_candidates(
        prep.desc, prep.kp_patches, attribution, predicted, top_fraction=cfg.top_fraction,
        eps_factor=cfg.eps_factor, min_recurrence=cfg.min_recurrence,
        min_enrichment=cfg.min_enrichment, grid_hw=grid_hw)
    if cfg.positions:
        # Keypoint-free candidates; one that marks what a descriptor candidate of its class
        # already marks adds nothing to check.
        extra = [p for p in recurring_positions(
            attribution, predicted, top_fraction=cfg.top_fraction,
            min_recurrence=cfg.min_recurrence, min_enrichment=cfg.min_enrichment,
            alpha=cfg.alpha, grid_hw=grid_hw)
            if not any(c.cls == p.cls and _jaccard(c.patches, p.patches) >= 0.5
                       for c in candidates)]
        candidates = sorted(candidates + extra, key=lambda c: -c.score)
    checked: list[tuple[Candidate, np.ndarray, CausalResult, float, int]] = []
    for cand in candidates[: cfg.max_checked]:
        rows = (predicted == cand.cls) & cand.patches.any(1)
        xr = x[torch.from_numpy(rows)]
        target = torch.full((int(rows.sum()),), cand.cls, dtype=torch.long)
        patches, levels = cand.patches, 0
        if cfg.grow:
            growth = grow_candidate(predict, xr, target, cand.patches[rows], attribution[rows],
                                    grid_hw, rings=cfg.grow_rings,
                                    trials=cfg.grow_trials, seed=cfg.seed)
            patches = cand.patches.copy()
            patches[rows] = growth.patches
            levels = growth.levels
        causal = causal_check(predict, xr, target, torch.from_numpy(patches[rows]),
                              trials=cfg.causal_trials, seed=cfg.seed, alpha=cfg.alpha,
                              min_effect=cfg.min_effect)
        on_object = float(coverage[patches].mean()) if coverage is not None and patches.any() \
            else float("nan")
        checked.append((cand, patches, causal, on_object, levels))

    def verdict(causal: CausalResult, on_object: float) -> Any:
        return verdict_of(causal.confirmed, on_object, cfg.on_object_limit)

    def order(t: tuple[Candidate, np.ndarray, CausalResult, float, int]) -> tuple[Any, ...]:
        cand, _, causal, on_obj, _ = t
        v = verdict(causal, on_obj)
        relied = v.value in ("shortcut", "review")
        # Relied-on findings first (largest effect beyond random), then the rest by score.
        return (not relied, not causal.confirmed,
                -(causal.effect - causal.random_effect) if causal.confirmed else -cand.score)

    checked.sort(key=order)
    findings: list[Finding] = []
    for c, patches, causal, on_obj, levels in checked:
        same = next((i for i, f in enumerate(findings) if f.cls == c.cls
                     and _jaccard(f.patches, patches) >= 0.5), None)
        if same is not None:  # grown onto the same pattern: one finding, all descriptors
            f = findings[same]
            findings[same] = replace(
                f, centroids=np.vstack([f.centroids, c.centroids]),
                radii=np.append(f.radii, c.radii), seed_patches=f.seed_patches | c.patches,
                patches=np.where(f.patches.any(1, keepdims=True), f.patches, patches))
            continue
        findings.append(Finding(len(findings) + 1, c.cls, prep.class_names[c.cls], c.images,
                                c.recurrence, c.other_rate, c.attention_lift, on_obj, causal,
                                verdict(causal, on_obj), patches, c.patches, c.centroids,
                                c.radii, levels))
    reliance = (attribution * findings[0].patches).sum(1) if findings else np.zeros(len(x))
    off = (off_object_semantic_attention(attribution, prep.weights > 0, coverage)
           if coverage is not None else np.full(len(x), np.nan))
    return MapAudit(name, findings, reliance, off, attribution)
