from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitsem.shortcut_data import ShortcutSpec, make_shortcut_dataset
from vitsem.train import TrainConfig, train_classifier


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "data"
    return make_shortcut_dataset(root, ShortcutSpec(n_train=96, n_test=40, seed=3), workers=1)


@pytest.fixture(scope="session")
def small_checkpoint(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    train_classifier(small_dataset, out, TrainConfig(epochs=1, depth=2, batch_size=32))
    return out
