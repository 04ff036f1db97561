"""The networks of the paper reproductions, as plain ``torch.nn`` modules.

Every layer is a named child module, so that each probe site has a readable
name in ``named_modules()``: ``fc7`` is the seventh linear map and ``act7`` its
activation. ``probecvx extract --model examples.paper.models:NAME`` builds
them with keyword arguments from ``--model-kwargs`` and loads the state_dicts
that the training scripts save.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def init_glorot_normal(linear: nn.Linear, generator: torch.Generator | None) -> None:
    """Draw ``linear.weight`` from N(0, 2 / (fan_in + fan_out)) and zero its bias.

    This is Glorot & Bengio (2010) normal initialisation, as in Keras'
    ``glorot_normal`` without truncation.
    """
    fan_out, fan_in = linear.weight.shape
    std = math.sqrt(2.0 / (fan_in + fan_out))
    with torch.no_grad():
        linear.weight.normal_(0.0, std, generator=generator)
        if linear.bias is not None:
            linear.bias.zero_()


def _init_truncated_normal(
    tensor: torch.Tensor, std: float, generator: torch.Generator | None
) -> None:
    """Draw from N(0, std²) and redraw every value beyond two standard deviations.

    This is ``tf.truncated_normal``, which the TensorFlow MNIST tutorial uses.
    """
    with torch.no_grad():
        tensor.normal_(0.0, std, generator=generator)
        outside = tensor.abs() > 2 * std
        while bool(outside.any()):
            redrawn = torch.empty(int(outside.sum()), dtype=tensor.dtype)
            redrawn.normal_(0.0, std, generator=generator)
            tensor[outside] = redrawn
            outside = tensor.abs() > 2 * std


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed)


class DeepLeakyMLP(nn.Module):
    """A stack of ``depth`` fully-connected layers, each followed by LeakyReLU.

    The untrained network of the first reproduction: with ``depth=32``,
    ``width=128``, ``negative_slope=0.5`` and Glorot-normal weights it is the
    model whose layers the paper probes without any training. The probe sites
    are ``input`` and ``act1`` … ``act{depth}``; the model's output is the last
    activation, because no classifier is ever trained on top.

    Parameters
    ----------
    in_features : int, default=128
    depth : int, default=32
        Number of linear layers.
    width : int, default=128
        Units per layer.
    negative_slope : float, default=0.5
        Slope of LeakyReLU for negative inputs.
    seed : int or None, default=None
        Seed of the weight draw; None uses torch's global generator.
    """

    def __init__(
        self,
        in_features: int = 128,
        depth: int = 32,
        width: int = 128,
        negative_slope: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        generator = _generator(seed)
        self.depth = depth
        fan_in = in_features
        for index in range(1, depth + 1):
            linear = nn.Linear(fan_in, width)
            init_glorot_normal(linear, generator)
            self.add_module(f"fc{index}", linear)
            self.add_module(f"act{index}", nn.LeakyReLU(negative_slope))
            fan_in = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for index in range(1, self.depth + 1):
            h = getattr(self, f"act{index}")(getattr(self, f"fc{index}")(h))
        return h


class TutorialConvNet(nn.Module):
    """The convolutional network of TensorFlow's MNIST tutorial, in torch.

    conv 5×5, 32 filters → ReLU → 2×2 max-pool → conv 5×5, 64 filters → ReLU →
    2×2 max-pool → fully-connected 512 → ReLU → dropout 0.5 → fully-connected
    10. Convolutions pad by 2 so that they keep the image size ("SAME" in
    TensorFlow). Weights start from a normal with std 0.1 truncated at two
    standard deviations; biases start at 0 for ``conv1`` and 0.1 elsewhere.
    The model subtracts ``input_offset`` from its input first: the tutorial
    scales pixels to [-0.5, 0.5], and probecvx's datasets give [0, 1]. These
    values come from ``tutorials/image/mnist/convolutional.py`` in the
    ``tensorflow/models`` repository.

    ``image_size`` must be divisible by 4: 28 for MNIST, 8 for scikit-learn's
    digits, where the flattened ``pool2`` output has 2·2·64 = 256 features
    instead of 7·7·64 = 3136.

    Probe sites: ``input``, ``conv1``, ``relu1``, ``pool1``, ``conv2``,
    ``relu2``, ``pool2``, ``fc1``, ``relu3``, ``fc2`` (the logits).
    ``dropout`` is the identity in eval mode and repeats ``relu3``.
    """

    def __init__(
        self,
        image_size: int = 28,
        n_classes: int = 10,
        hidden: int = 512,
        input_offset: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(
                f"image_size must be divisible by 4 for two 2×2 poolings; "
                f"got {image_size}"
            )
        self.image_size = image_size
        self.input_offset = input_offset
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear((image_size // 4) ** 2 * 64, hidden)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(hidden, n_classes)

        generator = _generator(seed)
        for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
            _init_truncated_normal(layer.weight, 0.1, generator)
        with torch.no_grad():
            self.conv1.bias.zero_()
            for layer in (self.conv2, self.fc1, self.fc2):
                layer.bias.fill_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, self.image_size, self.image_size) - self.input_offset
        h = self.pool1(self.relu1(self.conv1(x)))
        h = self.pool2(self.relu2(self.conv2(h)))
        h = self.dropout(self.relu3(self.fc1(h.flatten(1))))
        return self.fc2(h)


class PathologicalMLP(nn.Module):
    """A very deep fully-connected classifier that plain training cannot fix.

    ``depth`` layers of ``width`` units with LeakyReLU and Glorot-normal
    weights, then a linear classifier ``head``. Two variants from the paper:

    - ``aux_every=k`` adds a linear classifier ``aux{i}`` after every k-th
      activation (not after the last one, which has ``head``). The training
      loss sums the cross-entropy of every classifier; see
      :meth:`all_logits`.
    - ``skip_to=j`` concatenates the model input to the input of layer ``j``,
      so layer ``j`` reads ``[act{j-1}, input]``.

    Probe sites: ``input``, ``act1`` … ``act{depth}``, ``head`` and any
    ``aux{i}``.
    """

    def __init__(
        self,
        in_features: int = 64,
        n_classes: int = 10,
        depth: int = 128,
        width: int = 128,
        negative_slope: float = 0.5,
        aux_every: int | None = None,
        skip_to: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if aux_every is not None and not 1 <= aux_every < depth:
            raise ValueError(f"aux_every must be in [1, {depth - 1}]; got {aux_every}")
        if skip_to is not None and not 2 <= skip_to <= depth:
            raise ValueError(f"skip_to must be in [2, {depth}]; got {skip_to}")
        generator = _generator(seed)
        self.depth = depth
        self.skip_to = skip_to
        self.aux_layers: list[int] = []
        if aux_every is not None:
            self.aux_layers = list(range(aux_every, depth, aux_every))

        fan_in = in_features
        for index in range(1, depth + 1):
            if index == skip_to:
                fan_in += in_features
            linear = nn.Linear(fan_in, width)
            init_glorot_normal(linear, generator)
            self.add_module(f"fc{index}", linear)
            self.add_module(f"act{index}", nn.LeakyReLU(negative_slope))
            if index in self.aux_layers:
                aux = nn.Linear(width, n_classes)
                init_glorot_normal(aux, generator)
                self.add_module(f"aux{index}", aux)
            fan_in = width
        self.head = nn.Linear(width, n_classes)
        init_glorot_normal(self.head, generator)

    def all_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the model; return the logits of every auxiliary classifier, then
        of ``head``."""
        x = x.flatten(1)
        h = x
        logits = []
        for index in range(1, self.depth + 1):
            if index == self.skip_to:
                h = torch.cat([h, x], dim=1)
            h = getattr(self, f"act{index}")(getattr(self, f"fc{index}")(h))
            if index in self.aux_layers:
                logits.append(getattr(self, f"aux{index}")(h))
        logits.append(self.head(h))
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_logits(x)[-1]
