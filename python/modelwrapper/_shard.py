"""Tensor-parallel shards: which slice of a tensor a rank reads.

A shard is any callable ``(name, shape) -> (dim, start, length) | None``;
``None`` means the rank reads the whole tensor (replicated: norms, small
biases). :func:`tp_shard` builds the usual one, splitting tensors named by
glob patterns evenly along a dimension, the way Megatron-style column (0)
and row (1) parallel layers are laid out.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Callable, Mapping

from ._format import TensorEntry, VolumeError

Shard = Callable[[str, tuple[int, ...]], "tuple[int, int, int] | None"]


class TensorParallelShard:
    """Splits every tensor whose name matches a pattern along that pattern's
    dimension into ``size`` equal parts and keeps part ``rank``."""

    def __init__(self, rank: int, size: int, dims: Mapping[str, int]):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"tp size must be a positive integer, not {size!r}")
        if not isinstance(rank, int) or not 0 <= rank < size:
            raise ValueError(f"tp rank must be an integer in 0..{size - 1}, not {rank!r}")
        self.rank, self.size, self.dims = rank, size, dict(dims)

    def __call__(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        for pattern, dim in self.dims.items():
            if fnmatch.fnmatchcase(name, pattern):
                break
        else:
            return None
        if not -len(shape) <= dim < len(shape):
            raise VolumeError(f"tensor {name!r} has shape {list(shape)}: no dimension {dim} to split (pattern {pattern!r})")
        dim %= len(shape)
        if shape[dim] % self.size:
            raise VolumeError(
                f"tensor {name!r}: dimension {dim} of shape {list(shape)} does not split into {self.size} equal parts"
            )
        part = shape[dim] // self.size
        return dim, self.rank * part, part

    def __repr__(self) -> str:
        return f"tp_shard(rank={self.rank}, size={self.size}, dims={self.dims!r})"


def tp_shard(rank: int, size: int, dims: Mapping[str, int]) -> TensorParallelShard:
    """``dims`` maps glob patterns of tensor names to the dimension to split,
    e.g. ``{"*.q_proj.weight": 0, "*.o_proj.weight": 1}``; the first
    matching pattern wins and unmatched tensors are read whole."""
    return TensorParallelShard(rank, size, dims)


def shard_of(shard: Shard | None, t: TensorEntry, where: Path) -> tuple[int, int, int] | None:
    """The checked ``(dim, start, length)`` a shard asks of tensor ``t``."""
    if shard is None:
        return None
    cut = shard(t.name, t.shape)
    if cut is None:
        return None
    try:
        dim, start, length = (int(x) for x in cut)
    except (TypeError, ValueError):
        raise VolumeError(f"{where}: shard returned {cut!r} for {t.name!r}; expected (dim, start, length) or None") from None
    if not 0 <= dim < len(t.shape) or start < 0 or length < 0 or start + length > t.shape[dim]:
        raise VolumeError(
            f"{where}: shard asks {t.name!r} (shape {list(t.shape)}) for dim {dim} [{start}, {start + length}): out of range"
        )
    return dim, start, length
