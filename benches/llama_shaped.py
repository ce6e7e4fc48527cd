"""A Llama-shaped model for loader benchmarks: the tensor names, shapes and
count of a Llama checkpoint (embeddings, 9 tensors per decoder layer, final
norm, LM head), with a plain forward pass (no rotary embedding, no KV cache:
the cost measured here is weights, not attention details).

``LlamaShaped()`` with defaults is 32 layers, 291 tensors, 1.78 B parameters:
3.55 GB in bfloat16. ``uninitialised()`` builds it without writing a byte of
weights (the loaders' cost is per tensor and per byte, not per value).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Tensor-parallel layout (Megatron style): column-parallel projections split
# their output rows (dim 0), row-parallel ones their input columns (dim 1).
TP_DIMS = {
    "*.self_attn.q_proj.weight": 0,
    "*.self_attn.k_proj.weight": 0,
    "*.self_attn.v_proj.weight": 0,
    "*.mlp.gate_proj.weight": 0,
    "*.mlp.up_proj.weight": 0,
    "*.self_attn.o_proj.weight": 1,
    "*.mlp.down_proj.weight": 1,
    "lm_head.weight": 0,
}


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (p(x).view(b, s, self.heads, h // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(hidden, heads)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = MLP(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, vocab: int, hidden: int, intermediate: int, layers: int, heads: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderLayer(hidden, intermediate, heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)


class LlamaShaped(nn.Module):
    def __init__(
        self, vocab: int = 32000, hidden: int = 2048, intermediate: int = 5632, layers: int = 32, heads: int = 16
    ):
        super().__init__()
        self.model = Decoder(vocab, hidden, intermediate, layers, heads)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def uninitialised(dtype: torch.dtype = torch.bfloat16, **config: int) -> LlamaShaped:
    """The model with storage allocated but never written (fast at any size)."""
    with torch.device("meta"):
        model = LlamaShaped(**config).to(dtype)
    return model.to_empty(device="cpu").eval().requires_grad_(False)


def random(seed: int = 0, dtype: torch.dtype = torch.bfloat16, **config: int) -> LlamaShaped:
    """A small model with random weights, for checks that compare bytes."""
    torch.manual_seed(seed)
    model = LlamaShaped(**config)
    return model.to(dtype).eval().requires_grad_(False)


SMALL = {"vocab": 1000, "hidden": 256, "intermediate": 688, "layers": 4, "heads": 4}
