"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SKIPTS_DATA_ROOT", REPO.parent / "shared" / "data"))


def png(path: Path, value: int) -> Path:
    """A tiny grey PNG whose bytes depend only on ``value`` (equal values: identical files)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("L", (4, 4))
    img.putpixel((0, 0), value % 256)
    img.putpixel((1, 0), value // 256)
    img.save(path, format="PNG")  # PNG bytes whatever the name: lossless, so values stay distinct
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: on a shared, loaded CPU, OpenMP threads spin-wait
    on each other (10x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache and no downloads: the situation of a machine without internet."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("MONAI_SKIPTS_OFFLINE", "1")
    import torch

    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return home


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A small phantom dataset (MVTec layout) shared by the engine and bundle tests."""
    from monai_skipts.apps import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_train=24, n_test_normal=8, n_test_abnormal=8, size=64, seed=0)
