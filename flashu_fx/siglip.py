"""The understanding stack ``und_trans``: SigLIP so400m encoder layers (its last layer removed upstream).

No patch embedding, no post-norm, no pooling head: input and output are (N, tokens, 1152).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from flashu_fx.config import Showo2Config
from flashu_fx.layers import FP32LayerNorm, attention


class SiglipAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape

        def heads(t: Tensor) -> Tensor:  # (B, N, E) -> (B, heads, N, d)
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        return self.out_proj(attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), None))


class SiglipMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, hidden: int, num_heads: int, intermediate: int) -> None:
        super().__init__()
        self.layer_norm1 = FP32LayerNorm(hidden, eps=1e-6)
        self.self_attn = SiglipAttention(hidden, num_heads)
        self.layer_norm2 = FP32LayerNorm(hidden, eps=1e-6)
        self.mlp = SiglipMLP(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: Showo2Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(cfg.und_hidden_size, cfg.und_num_heads, cfg.und_intermediate_size)
            for _ in range(cfg.und_num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
