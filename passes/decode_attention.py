"""Pass: decode attention as plain reductions. A decode step's attention (one query row per head over the KV cache)
runs as a multiply-and-sum, a softmax and a weighted sum that inductor fuses and tunes with the step's other
reductions, instead of a library attention kernel.

Eager twin: ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=...)`` (``flashu_fx.layers``).

    before:  out = scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=written, enable_gqa=True)
    after:   out = decode_attention(q, k_cache, v_cache, attn_mask=written, enable_gqa=True)

Why: with one query row the product is tiny (a 7B layer reads 1.7 MB of cache, about 0.6 us at the H100's copy
bandwidth), and the library kernel is launch-bound: on an H100 cuDNN's attention took 8.8 us a layer in three
kernels (BENCHMARKS.md, issue 13's decode profile). The same math under inductor's coordinate-descent tuning is a
few small reductions. Not bit-identical to the library kernel (the sums run in another order, in fp32), so it is a
backend option decided by a GPU A/B (``flashu_backend(decode_attention="reductions")``), tested against the twin
within rounding.

Only calls with one query row, no dropout and no causal flag are rewritten; any other attention is left as it is,
with a warning when a decode graph has none to rewrite.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from passes.graph_utils import DERIVED_BY, captured_value

log = logging.getLogger(__name__)

PASS_NAME = "decode_attention"


def decode_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` for one query row, in fp32 reductions; the result in q's dtype.

    q (B, H, 1, d); k, v (B, KV, C, d) with H a multiple of KV (query head h reads KV head h // (H / KV), as
    ``enable_gqa``); ``attn_mask`` broadcastable to (B, H, 1, C), additive (float) or bool (True: attend).
    Returns (B, H, 1, d).
    """
    if dropout_p != 0.0 or is_causal:
        raise ValueError(f"decode_attention takes no dropout and no causal flag, got dropout_p={dropout_p}, "
                         f"is_causal={is_causal}")
    b, h, rows, d = q.shape
    kv, c = k.shape[1], k.shape[2]
    if rows != 1 or h % kv or (h != kv and not enable_gqa):
        raise ValueError(f"decode_attention needs one query row and H a multiple of KV (enable_gqa when they "
                         f"differ); got q {tuple(q.shape)}, k {tuple(k.shape)}, enable_gqa={enable_gqa}")
    group = h // kv
    qg = q.reshape(b, kv, group, 1, d).float()  # the query heads that share one KV head, side by side
    scores = (qg * k.float().unsqueeze(2)).sum(-1) * (d**-0.5 if scale is None else scale)  # (B, KV, G, C)
    if attn_mask is not None:
        mask = attn_mask.expand(b, h, 1, c).reshape(b, kv, group, c)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    weights = torch.softmax(scores, dim=-1)
    out = (weights.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # (B, KV, G, d)
    return out.reshape(b, h, 1, d).to(q.dtype)


def _rewritable(node: fx.Node) -> bool:
    """One query row, GQA-shaped, and only the arguments ``decode_attention`` takes with the values it allows."""
    q, k = (captured_value(a) for a in node.args[:2])
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.dim() != 4 or k.dim() != 4:
        return False
    kwargs = dict(node.kwargs)
    if len(node.args) > 3:  # attn_mask, dropout_p, is_causal, scale given by position
        kwargs.update(zip(("attn_mask", "dropout_p", "is_causal", "scale"), node.args[3:], strict=False))
    if kwargs.get("dropout_p", 0.0) != 0.0 or kwargs.get("is_causal", False):
        return False
    heads, kv_heads = q.shape[1], k.shape[1]
    return q.shape[2] == 1 and heads % kv_heads == 0 and (heads == kv_heads or bool(kwargs.get("enable_gqa")))


def decode_attention_as_reductions(gm: fx.GraphModule) -> int:
    """Rewrite every one-row ``scaled_dot_product_attention`` of ``gm`` (a decode step) to ``decode_attention``, in
    place; returns how many. The node keeps its arguments, provenance and example value."""
    attention = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    rewritten = 0
    for node in attention:
        if _rewritable(node):
            node.target = decode_attention
            node.meta[DERIVED_BY] = PASS_NAME
            rewritten += 1
    if rewritten < len(attention) or not attention:
        log.warning("decode_attention: rewrote %d of %d attention calls (others: not one query row, or dropout, "
                    "causal or non-GQA heads); those run the library kernel", rewritten, len(attention))
    if rewritten:
        gm.recompile()
    return rewritten
