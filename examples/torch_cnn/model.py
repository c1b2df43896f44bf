"""A small CNN on the 8x8 digits as 1-channel images, wrapped for p2pfl by TorchModel.

`build(config)` is the plugin entry point (`--model examples/torch_cnn/model.py:build`,
or `[model] name = "model.py:build"` in scenario.toml): p2pfl calls it with the node's
config, once for the model that trains and once for the one that evaluates the
aggregate. Every node of a federation must start from the same weights, so the
initialization is seeded from `config.model_seed`, never from torch's global generator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from p2pfl.adapters.torch import TorchModel


class DigitsCNN(nn.Module):
    """conv 1->8 3x3, relu, conv 8->16 3x3, relu, 2x2 max-pool, linear 256->10 (3,818 params).

    The same shape as RustFL's MNIST CNN (two convolutions, a pooling, a linear head),
    scaled down to 8x8 inputs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(torch.flatten(x, 1))


def build(config: Any) -> TorchModel:
    """The CNN, identically initialized on every node, as a p2pfl Model.

    The node hands `fit` its shard of digits as flat rows of 64 standardized pixels;
    `input_shape=(1, 8, 8)` views each batch as 1-channel images. SGD with momentum 0.9
    at the node's `lr` (TorchModel's default optimizer).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(getattr(config, "model_seed", 0)))
        net = DigitsCNN()
    return TorchModel(net, input_shape=(1, 8, 8), device=getattr(config, "device", "cpu"))
