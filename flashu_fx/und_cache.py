"""The static cache of understanding: what ``Showo2.forward(..., cache=cache)`` prefills and each decode step extends.

gpt-fast's pattern (a model forward over preallocated K/V buffers, one shape for the prefill and one per decode
step), with one difference that FlashU needs: every decoder layer keeps its own fill count and a mask of the slots
it wrote. A layer appends its new rows where its own entries end, and attends to every slot it has written plus the new
rows. So a layer that received fewer rows (V-norm token pruning compacts the rows after layer p) or none at all (a
skipped layer on a decode step) stays consistent without any slot arithmetic outside it: attention over the set of
valid slots does not depend on where they lie, since RoPE is applied before K is stored.

Shapes (C = capacity, KV = key/value heads, d = head dim, n = rows of the call):

    LayerCache.k, .v: (1, KV, C, d);  .written: (C,) additive mask, 0 where a slot holds an entry;  .length: int64 (1,)
    UndCache.position: int64 (1,) RoPE position of the next row;  .cos, .sin: (C, d) RoPE tables
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flashu_fx.config import Showo2Config
from flashu_fx.layers import rope_cos_sin, rope_inv_freq
from flashu_fx.shapes import round_up

CACHE_BUCKET = 256  # capacities are a multiple of this: answers of similar length share cache shapes (and graphs)


def cache_capacity(positions: int) -> int:
    """The capacity of a cache holding ``positions`` (prompt + new tokens): rounded up to CACHE_BUCKET."""
    if positions < 1:
        raise ValueError(f"positions={positions} is invalid: allowed an integer >= 1")
    return round_up(positions, CACHE_BUCKET)


class LayerCache(nn.Module):
    """K/V of one decoder layer, appended to in place (static shapes for compile and CUDA graphs).

    Which slots hold entries is kept as an additive mask (0 where written, -inf elsewhere) in the cache dtype: the
    form SDPA converts a boolean mask to on every call, so a decode step's mask is a view, made by no kernel.
    """

    def __init__(self, n_kv: int, capacity: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (1, n_kv, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("written", torch.full((capacity,), float("-inf"), dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("length", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)

    def append(self, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Store k, v (1, KV, n, d) after this layer's entries; ``mask``: bool (1, 1, n, n) among the new rows (None
        for one row).

        Returns the whole cache (1, KV, C, d) twice and the additive mask (1, 1, n, C) of the new rows over it:
        every slot written before, plus the new rows' own mask at their slots.
        """
        n = k.shape[2]
        # A decode step's one slot is the fill count itself (two kernels fewer per layer and token).
        slots = self.length if n == 1 else self.length + torch.arange(n, device=k.device)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        if n == 1:  # a decode step: the new row sees every earlier slot and itself
            self.written.index_fill_(0, slots, 0.0)
            full = self.written[None, None, None, :]
        else:
            own = torch.zeros(n, n, dtype=self.written.dtype, device=k.device).masked_fill(~mask[0, 0], float("-inf"))
            full = self.written.expand(n, -1).clone().index_copy_(1, slots, own)[None, None]
            self.written.index_fill_(0, slots, 0.0)
        self.length.add_(n)
        return self.k, self.v, full


class UndCache(nn.Module):
    """Every decoder layer's ``LayerCache`` plus the RoPE position of the next row, for one answer at a time.

    >>> from flashu_fx import get_config
    >>> cache = UndCache(get_config("tiny"), capacity=64, dtype=torch.float32, device="cpu")
    >>> len(cache.layers), tuple(cache.layers[0].k.shape), int(cache.position)
    (2, (1, 2, 64, 16), 0)
    """

    def __init__(self, config: Showo2Config, capacity: int, dtype: torch.dtype, device,
                 cos: Tensor | None = None, sin: Tensor | None = None) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity={capacity} is invalid: allowed an integer >= 1")
        self.capacity = capacity
        self.layers = nn.ModuleList(LayerCache(config.num_kv_heads, capacity, config.head_dim, dtype, device)
                                    for _ in range(config.num_layers))
        self.register_buffer("position", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
        if cos is None or sin is None:  # the LLM's plain RoPE, as Showo2.rope computes it
            inv_freq = rope_inv_freq(config.head_dim, config.rope_theta).to(device)
            cos, sin = rope_cos_sin(torch.arange(capacity, device=device), inv_freq, dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def for_model(cls, model: nn.Module, capacity: int, dtype: torch.dtype, device) -> UndCache:
        """A cache for ``model`` (a ``Showo2``) with RoPE tables from the model's own buffers."""
        cos, sin, _, _ = model.rope(capacity, dtype, device)
        return cls(model.config, capacity, dtype, device, cos, sin)

    def reset(self) -> None:
        """Empty every layer and restart at position 0 (the K/V values stay; no slot counts as written)."""
        self.position.zero_()
        for layer in self.layers:
            layer.written.fill_(float("-inf"))
            layer.length.zero_()

    def advance(self, n: int) -> Tensor:
        """The RoPE positions (n,) of a call's rows; the next call continues after them."""
        positions = self.position + torch.arange(n, device=self.position.device)
        self.position.add_(n)
        return positions
