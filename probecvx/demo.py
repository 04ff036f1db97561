"""The built-in end-to-end example: train a small convnet, then probe every layer.

:func:`run_demo` trains :class:`DemoConvNet` on scikit-learn's 8x8 digits (or
on MNIST-style data given with ``data``), saves checkpoints from step 0
(untrained) onwards, and runs the whole pipeline over them: extraction into
shards, probe fits into reports, then the table and figures. It is what
``probecvx demo`` runs.

The network has the shape of the MNIST convnet probed by Alain & Bengio (2016,
"Understanding intermediate layers using linear classifier probes", figure
5): two blocks of 5x5 convolution, ReLU and 2x2 max-pooling, a fully-connected
hidden layer with ReLU, and a linear classifier.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from probecvx.atomic import atomic_path
from probecvx.datasets import SPLIT_CODES, ProbeDataset
from probecvx.errors import InvalidInputError

logger = logging.getLogger(__name__)

MODEL_SPEC = "probecvx.demo:DemoConvNet"
DEFAULT_OUT_DIR = Path("probecvx-demo")
MARKER_NAME = "probecvx-demo.json"
MARKER_FORMAT = "probecvx-demo"
SUBFOLDERS = ("checkpoints", "acts", "reports", "figures")

DIGITS = "digits"
# Rows used from a dataset other than digits, unless the caller sets a limit:
# the first conv layer of the 28x28 model has 25,088 features a sample, so a
# shard of all 70,000 MNIST rows would take 7 GB per checkpoint for that site.
DEFAULT_OTHER_LIMIT = 10_000


class DemoConvNet(nn.Module):
    """A two-block convnet with a hidden fully-connected layer, for square images.

    ``conv1 -> relu1 -> pool1 -> conv2 -> relu2 -> pool2 -> fc1 -> relu3 ->
    fc2``: 5x5 convolutions with padding 2, 2x2 max-pooling, and a linear
    classifier ``fc2`` whose outputs are the logits. Every layer is a child
    module, so each is a probe site named after it.

    Parameters
    ----------
    image_size : int, default=8
        Height and width of the input images, at least 4.
    in_channels : int, default=1
    n_classes : int, default=10
    conv1_channels, conv2_channels, hidden : int, optional
        Widths of the two convolutions and of ``fc1``. The defaults depend on
        ``image_size``: 32, 64 and 512 from 28 pixels up (the MNIST model of
        TensorFlow's original "Deep MNIST for Experts" tutorial, which the
        paper probes), else 16, 32 and 128.
    """

    def __init__(
        self,
        image_size: int = 8,
        in_channels: int = 1,
        n_classes: int = 10,
        conv1_channels: int | None = None,
        conv2_channels: int | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise InvalidInputError(
                f"invalid image_size {image_size}; DemoConvNet needs images of "
                "at least 4x4 pixels"
            )
        widths = default_widths(image_size)
        conv1_channels = conv1_channels or widths["conv1_channels"]
        conv2_channels = conv2_channels or widths["conv2_channels"]
        hidden = hidden or widths["hidden"]
        pooled_size = image_size // 2 // 2

        self.conv1 = nn.Conv2d(in_channels, conv1_channels, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(conv1_channels, conv2_channels, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(conv2_channels * pooled_size**2, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits, shape ``(batch, n_classes)``."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def default_widths(image_size: int) -> dict[str, int]:
    """Return the layer widths :class:`DemoConvNet` uses for ``image_size``."""
    if image_size >= 28:
        return {"conv1_channels": 32, "conv2_channels": 64, "hidden": 512}
    return {"conv1_channels": 16, "conv2_channels": 32, "hidden": 128}


def model_kwargs_for(dataset: ProbeDataset) -> dict[str, int]:
    """Return the :class:`DemoConvNet` keyword arguments that fit ``dataset``.

    Raises
    ------
    InvalidInputError
        If the inputs are not square images of shape ``(channels, size, size)``.
    """
    shape = dataset.sample_shape
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] < 4:
        raise InvalidInputError(
            f"dataset {dataset.name!r} has inputs of shape {shape}; the demo needs "
            "square images (channels, size, size) of at least 4x4 pixels, such as "
            "a folder of MNIST IDX files"
        )
    return {
        "image_size": int(shape[1]),
        "in_channels": int(shape[0]),
        "n_classes": dataset.n_classes,
        **default_widths(int(shape[1])),
    }


def checkpoint_steps(n_steps: int, n_checkpoints: int) -> list[int]:
    """Return the training steps to save checkpoints at: 0, then doubling up to
    ``n_steps``.

    Step 0 is the untrained network. The others are spaced by factors of 2
    ending at ``n_steps`` (``800, 6`` gives 0, 50, 100, 200, 400, 800), because
    probe errors change fastest early in training. Steps that would repeat are
    dropped, so fewer checkpoints come back when ``n_steps`` is small.
    """
    if n_steps < 1 or n_checkpoints < 2:
        raise InvalidInputError(
            f"invalid schedule of {n_checkpoints} checkpoints over {n_steps} steps; "
            "give at least 1 step and 2 checkpoints"
        )
    later = [max(1, round(n_steps / 2**k)) for k in reversed(range(n_checkpoints - 1))]
    return sorted({0, *later})


@dataclass(frozen=True)
class TrainingConfig:
    """How the demo trains its network.

    Attributes
    ----------
    steps : list of int
        Steps to save a checkpoint at, from 0; training stops at the last one.
    batch_size : int
        Training examples per SGD step, drawn without replacement each epoch.
    learning_rate : float
        Adam's step size.
    seed : int
        Seed of the weight initialisation and of the order of examples.
    """

    steps: list[int]
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


def train_demo_model(
    dataset: ProbeDataset,
    model_kwargs: Mapping[str, Any],
    config: TrainingConfig,
    checkpoint_dir: Path,
    *,
    progress: bool = True,
) -> list[Path]:
    """Train :class:`DemoConvNet` on the train split and save checkpoints.

    Each checkpoint is ``step_NNNNNN.pt``, a dict with the ``state_dict`` and
    its ``step``, written atomically. The val and test rows are never used.

    Parameters
    ----------
    dataset : ProbeDataset
        Data with array inputs; only the rows of the train split are used.
    model_kwargs : mapping
        Keyword arguments of :class:`DemoConvNet`.
    config : TrainingConfig
    checkpoint_dir : Path
        Folder for the checkpoints, created if missing.
    progress : bool, default=True
        Show a progress bar on stderr.

    Returns
    -------
    list of Path
        The checkpoint files, in step order.
    """
    inputs, labels = _train_tensors(dataset)
    torch.manual_seed(config.seed)
    model = DemoConvNet(**model_kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _shuffled_batches(len(labels), config.batch_size, generator)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    saved = [_save_checkpoint(model, 0, checkpoint_dir)]
    save_at = set(config.steps)
    model.train()
    bar = tqdm(total=max(config.steps), desc="train", unit="step", disable=not progress)
    with bar, _one_torch_thread():
        for step in range(1, max(config.steps) + 1):
            rows = next(batches)
            loss = nn.functional.cross_entropy(model(inputs[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update()
            if step in save_at:
                saved.append(_save_checkpoint(model, step, checkpoint_dir))
                bar.set_postfix(loss=f"{loss.item():.3f}")
                logger.info("step %d: training loss %.4f", step, loss.item())
    return saved


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch ops on one thread inside the block, then restore the count.

    The demo's layers are too small for intra-op threads to pay off. Measured
    on a 2-core machine that other jobs kept busy, a training step of the 8x8
    model took 0.2 s with 2 threads and 0.014 s with 1.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def _train_tensors(dataset: ProbeDataset) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(dataset.inputs, np.ndarray):
        raise InvalidInputError(
            f"dataset {dataset.name!r} is a torch Dataset; the demo trains on "
            "array data such as digits or a folder of MNIST IDX files"
        )
    train = dataset.split == SPLIT_CODES["train"]
    if not train.any():
        raise InvalidInputError(
            f"dataset {dataset.name!r} has no train rows; give data with train "
            "rows or without a split column"
        )
    inputs = torch.from_numpy(np.asarray(dataset.inputs[train], dtype=np.float32))
    labels = torch.from_numpy(dataset.labels[train].astype(np.int64))
    return inputs, labels


def _shuffled_batches(
    n_rows: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Yield index batches forever, reshuffling the rows at each epoch.

    The rows left over at the end of an epoch are skipped, so every batch has
    ``min(batch_size, n_rows)`` rows.
    """
    size = min(batch_size, n_rows)
    while True:
        order = torch.randperm(n_rows, generator=generator)
        for start in range(0, n_rows - size + 1, size):
            yield order[start : start + size]


def checkpoint_name(step: int) -> str:
    """Return the file name of the demo checkpoint saved at ``step``."""
    return f"step_{step:06d}.pt"


def _save_checkpoint(model: nn.Module, step: int, checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / checkpoint_name(step)
    with atomic_path(path) as temp:
        torch.save({"state_dict": model.state_dict(), "step": step}, temp)
    logger.debug("saved %s", path)
    return path
