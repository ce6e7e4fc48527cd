"""Small models used by the Python tests (importable for factory skeletons)."""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        # not in the weights: its value must come from the constructor
        self.register_buffer("scale", torch.full((dim,), 0.5), persistent=False)
        self.register_buffer("shift", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x)))) * self.scale + self.shift


class TiedDecoder(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class Pipeline:
    """A seed-style pipeline: plain object, nn.Module attributes."""

    def __init__(self, dim: int = 64):
        self.text_encoder = Encoder(dim)
        self.decoder = TiedDecoder(dim=dim)
        self.temperature = 2.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.text_encoder(x)) / self.temperature


class Big(nn.Module):
    """``n`` float32 parameters in square layers, deterministic."""

    def __init__(self, mib: int, seed: int):
        super().__init__()
        side = 1024
        layers = max(1, (mib << 20) // (side * side * 4))
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            lin = nn.Linear(side, side, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(side, side, generator=g) / side**0.5)
            self.layers.append(lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class BigPipeline:
    def __init__(self, mib_each: int):
        self.first = Big(mib_each, seed=1)
        self.second = Big(mib_each, seed=2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class CustomLoading(nn.Module):
    """Loads its state its own way (as quantised or legacy modules do):
    load() must go through load_state_dict for it, not bind directly."""

    loads = 0

    def __init__(self, dim: int = 16):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        type(self).loads += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class KeepsDropoutOn(nn.Module):
    """Monte Carlo dropout: its train() keeps dropout active in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def train(self, mode: bool = True) -> "KeepsDropoutOn":
        super().train(mode)
        self.drop.train(True)
        return self


class CountsEval(nn.Module):
    """Overrides eval() itself (some libraries hook it)."""

    evals = 0

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def eval(self) -> "CountsEval":
        type(self).evals += 1
        return super().eval()


class Renamed(nn.Module):
    """A wrapper whose state dict drops its 'inner.' prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        sd = super().state_dict(*args, **kwargs)
        return type(sd)((k.removeprefix("inner."), v) for k, v in sd.items())

    def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def,override]
        return super().load_state_dict({f"inner.{k}": v for k, v in state_dict.items()}, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class TransposedTie(nn.Module):
    """A decoder weight that is a transposed view of the encoder's."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8, bias=False)
        self.dec = nn.Linear(8, 8, bias=False)
        self.dec.weight = nn.Parameter(self.enc.weight.detach().t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class SharesModules(nn.Module):
    """One block registered under two names, a tied weight, a module held
    outside ``_modules`` and a plain attribute: a skeleton keeps them all."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(8, 8)
        self.again = self.block
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
        self.__dict__["outside"] = self.head  # not a submodule: no state-dict names
        self.scale = 0.5
        self.register_buffer("mask", torch.tensor([1.0, 0.0] * 4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outside(self.again(self.block(x)) * self.mask * self.scale)


class PicklesItsOwnWay(nn.Module):
    """Leaves an attribute out of its pickled state (as some caches do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cache = {"computed": True}

    def __getstate__(self):  # type: ignore[no-untyped-def]
        state = super().__getstate__()
        state.pop("cache", None)
        return state

    def __setstate__(self, state):  # type: ignore[no-untyped-def]
        super().__setstate__(state)
        self.cache = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class SmallCNN(nn.Module):
    """Conv (whose class has its own __setstate__) and BatchNorm (running
    statistics are buffers; num_batches_tracked an integer one)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3)))
