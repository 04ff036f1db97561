"""Tiny models for the tests, importable as ``tests.tinymodels:NAME``.

``conftest.py`` puts the repository root on ``sys.path`` so that
``--model tests.tinymodels:TinyConvNet`` resolves in the test process, and
subprocess tests set ``PYTHONPATH`` to the root.

Weights set by :func:`set_dyadic_weights` and inputs from :func:`dyadic_inputs`
are small multiples of powers of two, so every sum in a forward pass is exact
in float32 and the result does not depend on the summation order. That makes
exact comparisons across batch sizes hold on any BLAS.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

TINY_MODEL_SPEC = "tests.tinymodels:TinyConvNet"


class TinyConvNet(nn.Module):
    """conv → ReLU(inplace) → maxpool → conv → ReLU → flatten → linear, on 1x8x8.

    ``delay`` seconds of sleep per forward call slow the model down for tests
    that kill a run in the middle.
    """

    def __init__(self, channels: int = 4, n_classes: int = 3, delay: float = 0.0):
        super().__init__()
        self.delay = delay
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels * 16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return self.classifier(self.flatten(self.features(x)))


def reference_forward(model: TinyConvNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compute every site of TinyConvNet by hand with functional ops, unflattened."""
    conv1, _, _, conv2, _ = model.features
    out: dict[str, torch.Tensor] = {"input": x}
    h = torch.nn.functional.conv2d(x, conv1.weight, conv1.bias, padding=1)
    out["features.0"] = h
    h = torch.relu(h)
    out["features.1"] = h
    h = torch.nn.functional.max_pool2d(h, 2)
    out["features.2"] = h
    h = torch.nn.functional.conv2d(h, conv2.weight, conv2.bias, padding=1)
    out["features.3"] = h
    h = torch.relu(h)
    out["features.4"] = h
    h = h.reshape(h.shape[0], -1)
    out["flatten"] = h
    out["classifier"] = h @ model.classifier.weight.T + model.classifier.bias
    return out


class SharedActNet(nn.Module):
    """Calls one ReLU module three times, so it yields act, act:2 and act:3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        h = self.act(self.fc2(h) - 0.5)
        return self.act(h * 2.0)


class PairOutput(nn.Module):
    """Returns ``(x + 1, x - 1)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x - 1


class SingleDictOutput(nn.Module):
    """Returns ``{"hidden": 2 * x, "note": "text"}``: one tensor in a dict."""

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"hidden": 2 * x, "note": "text"}


class NoTensorOutput(nn.Module):
    """Returns a string, so it cannot be probed."""

    def forward(self, x: torch.Tensor) -> str:
        return "no tensor here"


class StructuredNet(nn.Module):
    """Uses modules with tuple, dict and non-tensor outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.pair = PairOutput()
        self.mapping = SingleDictOutput()
        self.text = NoTensorOutput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        first, second = self.pair(h)
        self.text(h)
        return self.mapping(first * second)["hidden"]


class Log(nn.Module):
    """Natural log, NaN for negative inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class LogNet(nn.Module):
    """flatten → linear → log: the site ``log`` is NaN where the linear is negative."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, 4)
        self.log = Log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log(self.fc(self.flatten(x)))


def set_dyadic_weights(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with multiples of 1/8 in [-1, 1], in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            values = torch.randint(-8, 9, param.shape, generator=generator)
            param.copy_(values.to(param.dtype) / 8)
    return model


def dyadic_inputs(n_samples: int, seed: int, shape: tuple[int, ...] = (1, 8, 8)):
    """Return float32 inputs that are multiples of 1/4 in [0, 1]."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 5, size=(n_samples, *shape)) / 4).astype(np.float32)
