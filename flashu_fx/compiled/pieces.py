"""The compiled pieces of one generation call: functions over modules, compiled once per shape.

Each piece takes its module as an argument, so Dynamo lifts the weights to graph inputs and the 28 LLM
layers (or the 10 head blocks) share one compiled artifact. Shapes (M rows, S = 730 block positions,
P = longest prefix):
    x: (M, S, H) LLM block hidden; h: (M, S, D) head hidden; c: (M, D) time embeddings
    cos/sin: (M, S, d) RoPE of the block's true positions; mask: bool (M, 1, S, P + S)
    prefix_kv: (M, kv_heads, P, d) x 2, computed once per image and variant
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flashu_fx.diffusion_head import FinalLayer, ModulatedAttentionBlock
from flashu_fx.layers import attention
from flashu_fx.model import Showo2
from flashu_fx.qwen2 import Qwen2DecoderLayer


def block_embeddings(model: Showo2, latents: Tensor, c: Tensor) -> Tensor:
    """The image slot's LLM inputs (M, S, H): [time_embed_proj(c) | fused image embeddings]."""
    image = model.image_embeds(latents)
    return torch.cat([model.time_embed_proj(c)[:, None].to(image.dtype), image], dim=1)


def block_embeddings_cfg_shared(model: Showo2, latents: Tensor, c: Tensor) -> Tensor:
    """``block_embeddings`` when the latents' cond and null halves are equal: SigLIP and fusion on one half."""
    half = latents.shape[0] // 2
    image = model.image_embeds(latents[:half]).repeat(2, 1, 1)
    return torch.cat([model.time_embed_proj(c)[:, None].to(image.dtype), image], dim=1)


def llm_layer(layer: Qwen2DecoderLayer, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, pk: Tensor, pv: Tensor):
    """One decoder layer over the block, attending to the cached prefix. (The pruned variant is this graph
    after ``passes.ffn_slicing``.)"""
    return layer(x, cos, sin, mask, prefix_kv=(pk, pv))


def llm_layer_measured(layer: Qwen2DecoderLayer, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, pk: Tensor,
                       pv: Tensor):
    """``llm_layer`` plus the layer's input/output cosine summed over rows and block positions (fp32 scalar)."""
    out = layer(x, cos, sin, mask, prefix_kv=(pk, pv))
    return out, F.cosine_similarity(x.float(), out.float(), dim=-1).sum()


def head_input(model: Showo2, x: Tensor) -> Tensor:
    """Final LLM norm, then diff_proj: (M, S, H) -> (M, S, D)."""
    return model.diff_proj(model.showo.model.norm(x))


def head_block(block: ModulatedAttentionBlock, h: Tensor, c: Tensor, in_slot: Tensor, cos: Tensor, sin: Tensor,
               mask: Tensor, pk: Tensor, pv: Tensor) -> Tensor:
    return block(h, c, in_slot, cos, sin, mask, prefix_kv=(pk, pv))


def final_velocity(final: FinalLayer, h: Tensor, c: Tensor, in_slot: Tensor) -> Tensor:
    """FinalLayer with the current time: (M, S, D) -> velocity tokens of the image (M, S - 1, p*p*C)."""
    return final(h, c, in_slot)[:, 1:]


def llm_prefix_layer(layer: Qwen2DecoderLayer, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor):
    """One decoder layer over the text prefix (M, P, H), causal; also returns its K/V (M, kv_heads, P, d).
    ``Qwen2DecoderLayer.forward`` spelled out so that q/k/v are projected once (and merge into one matmul)."""
    attn = layer.self_attn
    q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)
    x = x + attn.o_proj(attention(q, k, v, mask))
    return x + layer.mlp(layer.post_attention_layernorm(x)), k, v


def head_prefix_block(block: ModulatedAttentionBlock, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor):
    """One head block over the prefix, which is outside the slot: no modulation (shift 0, scale 0, gate 1, so
    ``ModulatedAttentionBlock.forward`` is the plain pre-norm block spelled out here); also returns its K/V."""
    attn = block.self_attn
    q, k, v = attn.qkv(block.input_layernorm(h), cos, sin)
    h = h + attn.o_proj(attention(q, k, v, mask))
    return h + block.mlp(block.post_attention_layernorm(h)), k, v
