"""The compiled pieces of one understanding request: functions over modules and tensors, compiled once per shape.

Each piece takes its module as an argument, so Dynamo lifts the weights to graph inputs and the decoder
layers share one artifact per piece. The FFN comes in as three weight tensors (views of the permuted
storage for a pruned FFN: w_gate / w_up rows [lo, hi), w_down columns [lo, hi)), never as a module weight
plus a range: the "und" range start differs per layer, and as data it is no guard (no recompile per layer).
Shapes (R = rows of this call, C = cache slots, V = vocabulary):

    x: (1, R, H) prefill hidden | (1, 1, H) decode hidden
    cos/sin: (R, d) RoPE rows at the rows' true positions; cos_table/sin_table: (C, d) positions 0..C-1
    mask: bool (1, 1, R, R) the prompt's omni mask over the rows; valid: bool (C,) slots this layer wrote
    k_cache/v_cache: (1, kv_heads, C, d), written in place; pos, slot: (1,) int64; token: (1, 1) int64
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashu_fx.flashu_gen import layer_importance
from flashu_fx.flashu_und import select_kept_positions
from flashu_fx.layers import RMSNorm, apply_rope, attention
from flashu_fx.model import Showo2
from flashu_fx.qwen2 import Qwen2DecoderLayer


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """``Qwen2MLP`` on (views of) its weights: down(silu(gate(x)) * up(x))."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def prompt_embeddings(model: Showo2, latents: Tensor, tokens: Tensor, offsets: Tensor) -> Tensor:
    """SigLIP + fusion of the clean image (t = 1) in the prompt's slot: tokens (1, R) -> (1, R, H)."""
    return model.embed_prompt(tokens, offsets, latents)


def prefill_layer(layer: Qwen2DecoderLayer, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, k_cache: Tensor,
                  v_cache: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """One decoder layer over the R prompt rows; their K/V go to cache slots [0, R).

    Attends over the R new keys only (the eager twin attends over the whole cache with the rest masked).
    """
    attn = layer.self_attn
    q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)
    rows = x.shape[1]
    k_cache[:, :, :rows] = k
    v_cache[:, :, :rows] = v
    x = x + attn.o_proj(attention(q, k, v, mask))
    return x + swiglu(layer.post_attention_layernorm(x), w_gate, w_up, w_down)


def prune_compact(layer: Qwen2DecoderLayer, h_in: Tensor, h_out: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                  image_start: int, num_image: int, keep: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """V-norm token pruning after layer p: choose the rows from p's INPUT h_in (``torch.ops.flashu.vnorm_topk``)
    and compact its output, RoPE rows and mask to them. -> h (1, K, H), cos, sin (K, d), mask, kept rows (K,)."""
    kept = select_kept_positions(layer, h_in, image_start, num_image, keep)
    return h_out[:, kept], cos[kept], sin[kept], mask[:, :, kept][:, :, :, kept], kept


def decode_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """One query token over the cache, grouped K/V, scores and weights in fp32 (as fused kernels keep them).

    q: (1, Hq, 1, d); k, v: (1, KV, C, d); valid: bool (C,) -> (1, 1, Hq * d). Written as products and sums
    so inductor reads the bf16 cache once per layer in two reductions (no fp32 copy of the cache).
    """
    b, hq, _, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, hq // kv, 1, d).float()  # head h reads KV head h // (hq / kv), as enable_gqa
    scores = (qg * k[:, :, None].float()).sum(-1) * d**-0.5  # (1, KV, G, C)
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    out = (weights[..., None] * v[:, :, None].float()).sum(-2)  # (1, KV, G, d)
    return out.to(v.dtype).reshape(b, 1, hq * d)


def decode_layer(layer: Qwen2DecoderLayer, x: Tensor, cos_table: Tensor, sin_table: Tensor, pos: Tensor,
                 slot: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor, w_gate: Tensor, w_up: Tensor,
                 w_down: Tensor) -> Tensor:
    """One decoder layer for one new token at RoPE position ``pos``: writes its K/V to ``slot``, marks the slot
    valid, attends to every valid slot (its own included)."""
    attn, h = layer.self_attn, layer.input_layernorm(x)
    cos, sin = cos_table[pos], sin_table[pos]  # (1, d): the same position in every layer
    # Module calls, so passes.merge_projections finds them: one product of the colocated q/k/v weights plus a
    # bias add; at one row with tune_decode the product is a Triton reduction (an addmm would stay cuBLAS).
    q = attn.q_proj(h).view(1, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # as attn.qkv
    k = attn.k_proj(h).view(1, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(1, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache[:, :, slot] = k
    v_cache[:, :, slot] = v
    valid[slot] = True
    x = x + attn.o_proj(decode_attention(q, k_cache, v_cache, valid))
    return x + swiglu(layer.post_attention_layernorm(x), w_gate, w_up, w_down)


def decode_layer_measured(layer: Qwen2DecoderLayer, x: Tensor, cos_table: Tensor, sin_table: Tensor, pos: Tensor,
                          slot: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor, w_gate: Tensor,
                          w_up: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor]:
    """``decode_layer`` plus importance_l = 1 - cos(input, output) of the token (fp32 scalar)."""
    out = decode_layer(layer, x, cos_table, sin_table, pos, slot, k_cache, v_cache, valid, w_gate, w_up, w_down)
    return out, layer_importance(x[:, -1], out[:, -1])


def next_token(norm: RMSNorm, lm_head: nn.Linear, x: Tensor, token: Tensor, logits_out: Tensor) -> None:
    """Logits of ONE position (x: (1, 1, H)) into ``logits_out`` (V,); the greedy id into ``token`` (1, 1)."""
    logits = lm_head(norm(x)[0, -1])
    logits_out.copy_(logits)
    token.copy_(logits.argmax().view(1, 1))


def decode_finish(norm: RMSNorm, lm_head: nn.Linear, x: Tensor, token: Tensor, logits_out: Tensor, pos: Tensor,
                  slot_a: Tensor, slot_b: Tensor) -> None:
    """``next_token``, then advance the next decode step's position and cache slots (both layer groups)."""
    next_token(norm, lm_head, x, token, logits_out)
    pos.add_(1)
    slot_a.add_(1)
    slot_b.add_(1)
