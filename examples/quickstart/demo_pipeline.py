"""The quickstart's demo pipeline: two components, deterministic weights."""

from __future__ import annotations

import torch
from torch import nn


def _stack(width: int, depth: int, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(width, width, generator=g) / width**0.5)
            lin.bias.copy_(torch.randn(width, generator=g) * 0.01)
        layers += [lin, nn.GELU()]
    return nn.Sequential(*layers)


class DemoPipeline:
    """encoder → decoder, each ``depth`` layers of ``width``² float32 weights
    (width 2048, depth 9: about 151 MB per component)."""

    def __init__(self, width: int = 2048, depth: int = 9):
        self.encoder = _stack(width, depth, seed=1)
        self.decoder = _stack(width, depth, seed=2)
        self.width = width

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def example_input(self) -> torch.Tensor:
        return torch.linspace(-1, 1, 4 * self.width).reshape(4, self.width)
