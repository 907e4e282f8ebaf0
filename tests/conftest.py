from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.services import MotoServer, postgres_database
from vitsem.data.shortcut import ShortcutSpec, make_shortcut_dataset
from vitsem.data.train import TrainConfig, train_classifier

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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


@pytest.fixture(scope="session")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled benchmark of the small model's classes, small enough for a quick audit."""
    root = tmp_path_factory.mktemp("few") / "data"
    return make_shortcut_dataset(root, ShortcutSpec(n_train=8, n_test=16, seed=4), workers=1)


def copy_test_images(dataset: Path, dest: Path, n: int) -> Path:
    """The first ``n`` test-split images of a benchmark folder, copied into ``dest``."""
    dest.mkdir(parents=True)
    for p in sorted((dataset / "images" / "test").glob("*.png"))[:n]:
        shutil.copy(p, dest / p.name)
    return dest


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL (fails, not skips, with CI=true)."""
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.close()


@pytest.fixture
def s3_bucket(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket on the moto server, with the AWS variables pointing at it."""
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    name = f"vitsem-{uuid.uuid4().hex[:8]}"
    moto.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real, temporary Prefect API server for flow runs in this process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def shortcut_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rho = 1 in training: the glyph alone separates class 0, so a tiny ViT trained for a
    few epochs relies on it; the test split is decorrelated."""
    root = tmp_path_factory.mktemp("shortcut") / "data"
    return make_shortcut_dataset(root, ShortcutSpec(n_train=400, n_test=120, rho=1.0, seed=5),
                                 workers=1)


@pytest.fixture(scope="session")
def shortcut_model(shortcut_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shortcut-model") / "model.safetensors"
    train_classifier(shortcut_data, out, TrainConfig(epochs=4, depth=2, seed=0))
    return out
