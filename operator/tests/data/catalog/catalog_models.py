"""The two-component pipeline the cluster workflow test publishes."""

import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, dim: int = 256, hidden: int = 512):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x)))


class TwoStage:
    """A pipeline object (not an nn.Module) with two components, as in the seed."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.encoder = Encoder()
        self.decoder = Encoder()
        self.scale = 0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)) * self.scale
