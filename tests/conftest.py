"""Shared fixtures: a seed, a tiny image dataset and a folder of checkpoints.

The repository root is put on ``sys.path`` so that ``tests.tinymodels`` is
importable as a model spec (``tests.tinymodels:TinyConvNet``), both from test
code and from the CLI run in-process by click's ``CliRunner``.

Torch runs on one intra-op thread: the test models are tiny, and on a loaded
machine two spinning OpenMP threads made a 5x8x8 convolution about 100 times
slower than one thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
torch.set_num_threads(1)

from tests.tinymodels import (  # noqa: E402
    TinyConvNet,
    dyadic_inputs,
    set_dyadic_weights,
)

TINY_SAMPLES = 37  # not a multiple of the batch sizes used in the tests
TINY_STEPS = (10, 20, 30)


@pytest.fixture
def seed() -> int:
    """Seed torch and NumPy's legacy global generator; return the seed."""
    value = 0
    torch.manual_seed(value)
    np.random.seed(value)
    return value


@pytest.fixture
def tiny_data_file(tmp_path: Path) -> Path:
    """An .npz dataset of 37 dyadic 1x8x8 images in 3 classes."""
    path = tmp_path / "tiny.npz"
    x = dyadic_inputs(TINY_SAMPLES, seed=1)
    y = np.arange(TINY_SAMPLES) % 3
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    """A folder of 3 TinyConvNet state_dicts, ``step_10.pt`` to ``step_30.pt``."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for index, step in enumerate(TINY_STEPS):
        model = set_dyadic_weights(TinyConvNet(), seed=100 + index)
        torch.save(model.state_dict(), folder / f"step_{step}.pt")
    return folder
