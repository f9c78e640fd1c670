"""The Qwen2.5 decoder as Show-o2 uses it: a caller-given attention mask, 1-D RoPE, no qk-norm.

Module names match the checkpoint (``showo.model.layers.{i}.self_attn.q_proj`` ...), so a state dict
loads without renaming. Differences from stock HF Qwen2 that Show-o2 made (docs/SHOWO2.md §1.2) are kept:
the mask is passed through unchanged and the returned final hidden state is post-norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashu_fx.config import Showo2Config
from flashu_fx.layers import RMSNorm, apply_rope, attention
from flashu_fx.und_cache import LayerCache

# A pruned FFN is a set of contiguous neuron ranges of the (permuted) intermediate axis; None = all.
NeuronRanges = tuple[tuple[int, int], ...]


class KVCache(nn.Module):
    """Preallocated K/V of one layer, written by index (static shapes for compile and CUDA graphs).

    k_cache, v_cache: (B, n_kv, max_len, head_dim)
    """

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv, L_new, d) at ``input_pos`` (L_new,); return the whole caches."""
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Showo2Config) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, L, H) -> q (B, heads, L, d), k and v (B, kv_heads, L, d), RoPE applied to q and k."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        kv_cache: KVCache | LayerCache | None = None,
        input_pos: Tensor | None = None,
        prefix_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x: (B, L, H); cos/sin: (B|., L, d); mask: bool (B|1, 1, L, L_kv) -> (B, L, H).

        ``kv_cache``: a ``KVCache`` written at ``input_pos`` (mask over its whole length), or a ``LayerCache``
        appended to (mask (1, 1, L, L) among the new rows: the cache widens it to the slots it holds).

        ``prefix_kv``: K/V (B, kv_heads, P, d) of earlier positions computed once and reused (keys first).
        """
        q, k, v = self.qkv(x, cos, sin)
        if isinstance(kv_cache, LayerCache):  # appends after its own entries and widens the mask over them
            k, v, mask = kv_cache.append(k, v, mask)
        elif kv_cache is not None:
            k, v = kv_cache.update(input_pos, k, v)
        if prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        # Without a mask upstream's SDPA runs causal; Show-o2 always passes the omni mask.
        return self.o_proj(attention(q, k, v, mask))


class Qwen2MLP(nn.Module):
    """SwiGLU FFN. ``ranges`` selects neuron ranges of the intermediate axis (a pruned FFN as views)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor, ranges: NeuronRanges | None = None) -> Tensor:
        if ranges is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # SwiGLU is a sum over neurons, so a set of neuron ranges is a sum of smaller dense FFNs.
        out = None
        for lo, hi in ranges:
            a = F.silu(F.linear(x, self.gate_proj.weight[lo:hi])) * F.linear(x, self.up_proj.weight[lo:hi])
            part = F.linear(a, self.down_proj.weight[:, lo:hi])
            out = part if out is None else out + part
        return out


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Showo2Config) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        kv_cache: KVCache | LayerCache | None = None,
        input_pos: Tensor | None = None,
        ffn_ranges: NeuronRanges | None = None,
        prefix_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, input_pos, prefix_kv)
        return x + self.mlp(self.post_attention_layernorm(x), ffn_ranges)


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Showo2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    """Named ``showo`` in the checkpoint: ``showo.model.*`` and ``showo.lm_head.weight``."""

    def __init__(self, cfg: Showo2Config) -> None:
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        kv_caches: Sequence[KVCache | LayerCache] | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """Decoder stack over input embeddings. x: (B, L, H) -> post-final-norm hidden (B, L, H)."""
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, None if kv_caches is None else kv_caches[i], input_pos)
        return self.model.norm(x)
