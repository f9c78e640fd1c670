"""Read-only probes of the LLM's layers through forward hooks: what FlashU's decisions rest on, measured.

- ``LayerCosineProbe``: per model call and layer, the cosine similarity of a layer's input and output hidden states
  at chosen positions (paper Fig. 2 and 4: a layer whose output barely differs from its input is a skip candidate).
- ``AttentionProbe``: per layer, the attention probabilities softmax(Q K^T / sqrt(d) + mask) recomputed from the
  attention module's own inputs with its own projections (the model runs fused SDPA, which never materialises them),
  and the value vectors V = v_proj(input_layernorm(h)) that V-norm token pruning ranks (paper Fig. 5).

The hooks only read; the model's forward is unchanged. ``AttentionProbe`` sees whole-sequence calls only (no KV
cache: the eager generation call, or a prefill run without caches).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flashu_fx.model import Showo2

# positions(h) -> the rows whose cosine counts: h (B, L, H) -> (..., H)
PositionFn = Callable[[Tensor], Tensor]
# on_layer(layer index, probabilities (B, heads, L, L) fp32, values (B, kv_heads, L, d)) -> None
AttentionFn = Callable[[int, Tensor, Tensor], None]


class _LayerHooks:
    """A context manager that puts ``self._register(index, layer)``'s hook on every LLM layer and removes them all on
    exit."""

    def __init__(self, model: Showo2) -> None:
        self.layers = list(model.showo.model.layers)
        self._handles: list[Any] = []

    def _register(self, index: int, layer: torch.nn.Module) -> Any:
        raise NotImplementedError

    def __enter__(self):
        self._handles = [self._register(index, layer) for index, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class LayerCosineProbe(_LayerHooks):
    """``with LayerCosineProbe(model, positions) as probe: <model calls>``; then ``probe.calls[c][l]`` is the mean
    cosine (fp32) of layer l's input and output at ``positions(h)`` in call c. ``positions`` may be replaced
    between calls (a prefill and its decode steps select differently)."""

    def __init__(self, model: Showo2, positions: PositionFn) -> None:
        super().__init__(model)
        self.positions = positions
        self.calls: list[list[float]] = []

    def _register(self, index: int, layer: torch.nn.Module) -> Any:
        return layer.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
            if index == 0:  # layer 0 opens a new model call
                self.calls.append([])
            cos = F.cosine_similarity(self.positions(args[0]).float(), self.positions(output).float(), dim=-1)
            self.calls[-1].append(float(cos.mean()))

        return hook


def attention_probabilities(attn: torch.nn.Module, x: Tensor, cos: Tensor, sin: Tensor,
                            mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The probabilities (B, heads, L, L) fp32 of one attention call over its whole sequence, and its V
    (B, kv_heads, L, d). ``mask``: bool (True = attend) or additive, (B|1, 1, L, >= L) (key columns past L,
    a static cache's padding, are dropped)."""
    q, k, v = attn.qkv(x, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped K/V, as SDPA's enable_gqa
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        mask = mask[..., : k.shape[2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return torch.softmax(scores, dim=-1), v


class AttentionProbe(_LayerHooks):
    """``with AttentionProbe(model, on_layer): <whole-sequence model calls>``: ``on_layer`` receives every layer's
    attention probabilities and values (calls with a KV cache are ignored: their keys are not in the inputs)."""

    def __init__(self, model: Showo2, on_layer: AttentionFn) -> None:
        super().__init__(model)
        self.on_layer = on_layer

    def _register(self, index: int, layer: torch.nn.Module) -> Any:
        return layer.self_attn.register_forward_pre_hook(self._hook(index))

    def _hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            # Qwen2Attention.forward(x, cos, sin, mask, kv_cache=None, input_pos=None, prefix_kv=None)
            x, cos, sin, mask = args[:4]
            if any(a is not None for a in args[4:]):
                return
            with torch.no_grad():
                probs, v = attention_probabilities(module, x, cos, sin, mask)
            self.on_layer(index, probs, v)

        return hook


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Rank correlation (ties broken by order: the values are continuous)."""
    rank = lambda t: torch.argsort(torch.argsort(t)).double()
    return pearson(rank(x), rank(y))
