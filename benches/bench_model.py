"""The benchmark pipeline: two components of square float32 layers."""

from __future__ import annotations

import torch
from torch import nn

SIDE = 1024


class Stack(nn.Module):
    def __init__(self, layers: int, seed: int | None):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(SIDE, SIDE, bias=False, device="meta" if seed is None else None) for _ in range(layers))
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for lin in self.layers:
                    lin.weight.copy_(torch.randn(SIDE, SIDE, generator=g) / SIDE**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return x


class BenchPipeline:
    """``size_mb`` MiB of weights split over two components."""

    def __init__(self, size_mb: int, seed: bool = True):
        per = max(1, (size_mb << 20) // 2 // (SIDE * SIDE * 4))
        self.first = Stack(per, 1 if seed else None)
        self.second = Stack(per, 2 if seed else None)

    @classmethod
    def empty(cls, size_mb: int) -> "BenchPipeline":
        return cls(size_mb, seed=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))
