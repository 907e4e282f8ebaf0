"""The embedded default: the shipped benchmark and a tiny ViT trained on it, both cached under
a home folder by the digest of their settings, so each is made once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from vitsem.data.shortcut import DATASET_INFO, ShortcutSpec, make_shortcut_dataset
from vitsem.data.train import TrainConfig, TrainResult, train_classifier
from vitsem.digests import json_digest

TrainProgress = Callable[[int, int, dict[str, float]], None]


def default_paths(home: Path, spec: ShortcutSpec = ShortcutSpec(),
                  cfg: TrainConfig = TrainConfig()) -> tuple[Path, Path]:
    """(benchmark folder, checkpoint) of the default under ``home``."""
    data_dir = home / "data" / f"shortcut-{json_digest(asdict(spec), 12)}"
    ckpt = home / "models" / f"tiny-vit-{json_digest([asdict(spec), asdict(cfg)], 12)}.safetensors"
    return data_dir, ckpt


def ensure_default_model(home: Path, *, on_generate: Callable[[Path], None] | None = None,
                         on_train: Callable[[Path], TrainProgress | None] | None = None,
                         on_trained: Callable[[TrainResult], None] | None = None
                         ) -> tuple[Path, Path]:
    """The default benchmark and model under ``home``, made when missing. The callbacks let
    a caller show progress: ``on_generate(folder)`` before rendering images,
    ``on_train(checkpoint)`` before training (returns a per-epoch progress callback) and
    ``on_trained(result)`` after."""
    spec, cfg = ShortcutSpec(), TrainConfig()
    data_dir, ckpt = default_paths(home, spec, cfg)
    if not (data_dir / DATASET_INFO).is_file():
        if on_generate is not None:
            on_generate(data_dir)
        make_shortcut_dataset(data_dir, spec)
    if not ckpt.is_file():
        progress = on_train(ckpt) if on_train is not None else None
        result = train_classifier(data_dir, ckpt, cfg, progress=progress)
        if on_trained is not None:
            on_trained(result)
    return data_dir, ckpt
