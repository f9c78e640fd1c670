"""Qwen2 decoder: one layer against transformers' own Qwen2DecoderLayer with the same weights and the omni mask
(as the 4-D additive float mask upstream passes, docs/SHOWO2.md §1.2, §1.9); pruned-FFN neuron ranges; KV-cache decode.

The transformers call is written against the installed API (4.4x returned a tuple and took ``position_embeddings``
since 4.45; 5.x returns a tensor): it is checked here, not assumed.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from random_weights import randomize_

from flashu_fx.config import get_config
from flashu_fx.layers import rope_cos_sin, rope_inv_freq
from flashu_fx.masks import decode_mask, omni_mask, pad_mask_to
from flashu_fx.qwen2 import KVCache, Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2MLP

hf_qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
from transformers import Qwen2Config  # noqa: E402

CFG = get_config("tiny")  # hidden 64, 4 query heads, 2 KV heads (GQA), head_dim 16
# 1.5B's heads (12 q / 2 kv, head_dim 128) on a narrower hidden size: the real GQA group and head_dim.
CFG_WIDE_HEADS = dataclasses.replace(CFG, hidden_size=192, num_heads=12, num_kv_heads=2, head_dim=128)
BLOCKED = float(torch.iinfo(torch.int64).min)  # upstream's "blocked" value of the additive mask (-9.22e18)


def hf_config(cfg, attn_implementation: str) -> Qwen2Config:
    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=32768,
        hidden_act="silu",
        attention_dropout=0.0,
        use_sliding_window=False,
    )
    hf_cfg._attn_implementation = attn_implementation
    return hf_cfg


def hf_layer_forward(layer, x, additive_mask, cos, sin, position_ids):
    """Call transformers' layer with whatever keywords the installed version accepts; return a tensor."""
    params = inspect.signature(layer.forward).parameters
    kwargs = {"attention_mask": additive_mask, "position_ids": position_ids}
    if "position_embeddings" in params:
        kwargs["position_embeddings"] = (cos, sin)
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def random_offsets(gen: torch.Generator, batch: int, seq_len: int, slot_len: int) -> torch.Tensor:
    return torch.randint(0, seq_len - slot_len + 1, (batch,), generator=gen)


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err < rel, f"relative error {err:.2e} >= {rel:.0e}"


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("cfg", [CFG, CFG_WIDE_HEADS], ids=["tiny", "1.5b-heads"])
def test_decoder_layer_matches_transformers(cfg, attn_implementation, device):
    hf_cfg = hf_config(cfg, attn_implementation)
    ours = randomize_(Qwen2DecoderLayer(cfg), seed=1, std=0.05).to(device)
    theirs = hf_qwen2.Qwen2DecoderLayer(hf_cfg, layer_idx=0).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    ours.eval(), theirs.eval()

    gen = torch.Generator().manual_seed(2)
    batch, seq_len, slot_len = 3, 40, 13
    x = torch.randn(batch, seq_len, cfg.hidden_size, generator=gen).to(device)
    offsets = random_offsets(gen, batch, seq_len, slot_len).to(device)
    mask = omni_mask(offsets, seq_len, slot_len)  # bool (B, 1, L, L)
    additive = torch.zeros(mask.shape, device=device).masked_fill(~mask, BLOCKED)
    position_ids = torch.arange(seq_len, device=device).expand(batch, -1)

    rotary = hf_qwen2.Qwen2RotaryEmbedding(config=hf_cfg).to(device)
    hf_cos, hf_sin = rotary(x, position_ids)
    cos, sin = rope_cos_sin(torch.arange(seq_len, device=device), rope_inv_freq(cfg.head_dim, cfg.rope_theta), x.dtype)
    torch.testing.assert_close(cos.expand_as(hf_cos), hf_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin.expand_as(hf_sin), hf_sin, rtol=1e-6, atol=1e-6)

    with torch.no_grad():
        ref = hf_layer_forward(theirs, x, additive, hf_cos, hf_sin, position_ids)
        out = ours(x, cos, sin, mask)
        causal_only = ours(x, cos, sin, omni_mask(offsets, seq_len, 1))
    assert out.shape == ref.shape == x.shape
    assert_rel_close(out, ref, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # The image blocks matter: dropping them (a plain causal mask) changes the result well beyond the tolerance.
    assert ((causal_only - ref).norm() / ref.norm()).item() > 1e-3


def intermediate_mask(intermediate: int, ranges) -> torch.Tensor:
    keep = torch.zeros(intermediate)
    for lo, hi in ranges:
        keep[lo:hi] = 1.0
    return keep


@st.composite
def neuron_ranges(draw, intermediate: int):
    """Disjoint, sorted, non-empty [lo, hi) ranges of the intermediate axis."""
    cuts = sorted(draw(st.lists(st.integers(0, intermediate), min_size=2, max_size=10, unique=True)))
    pairs = tuple((cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2))
    return pairs


MLP = randomize_(Qwen2MLP(CFG.hidden_size, CFG.intermediate_size), seed=3, std=0.05)
MLP_X = torch.randn(2, 7, CFG.hidden_size, generator=torch.Generator().manual_seed(4))


@settings(deadline=None, max_examples=40)
@given(ranges=neuron_ranges(CFG.intermediate_size))
def test_mlp_ranges_equal_masked_intermediate(ranges):
    with torch.no_grad():
        a = F.silu(F.linear(MLP_X, MLP.gate_proj.weight)) * F.linear(MLP_X, MLP.up_proj.weight)
        ref = F.linear(a * intermediate_mask(CFG.intermediate_size, ranges), MLP.down_proj.weight)
        out = MLP(MLP_X, ranges)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_mlp_full_range_is_the_dense_mlp():
    with torch.no_grad():
        dense = MLP(MLP_X)
        torch.testing.assert_close(MLP(MLP_X, ((0, CFG.intermediate_size),)), dense, rtol=1e-6, atol=1e-7)
        split = MLP(MLP_X, ((0, 100), (100, 101), (101, CFG.intermediate_size)))
        torch.testing.assert_close(split, dense, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(MLP(MLP_X, ((0, 100),)), dense, atol=1e-4)  # dropping neurons is visible


def test_kv_cache_decode_equals_full_forward(device):
    cfg = CFG
    llm = randomize_(Qwen2ForCausalLM(cfg), seed=5, std=0.05).to(device).eval()
    gen = torch.Generator().manual_seed(6)
    prompt_len, new, slot_len, offset = 30, 4, cfg.image_slot_len, 5
    total = prompt_len + new
    max_len = total + 3  # a cache longer than what is used: the unused tail must stay invisible
    x = torch.randn(1, total, cfg.hidden_size, generator=gen).to(device)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    cos, sin = rope_cos_sin(torch.arange(max_len, device=device), inv_freq, x.dtype)
    offsets = torch.tensor([offset], device=device)

    with torch.no_grad():
        full = llm(x, cos[:total], sin[:total], omni_mask(offsets, total, slot_len))
        caches = [KVCache(1, cfg.num_kv_heads, max_len, cfg.head_dim, x.dtype, device) for _ in range(cfg.num_layers)]
        pos = torch.arange(prompt_len, device=device)
        mask = pad_mask_to(omni_mask(offsets, prompt_len, slot_len), max_len)
        prefill = llm(x[:, :prompt_len], cos[pos], sin[pos], mask, caches, pos)
        torch.testing.assert_close(prefill, full[:, :prompt_len], rtol=1e-5, atol=1e-5)
        for i in range(prompt_len, total):  # one token per call
            pos = torch.tensor([i], device=device)
            step = llm(x[:, i : i + 1], cos[pos], sin[pos], decode_mask(pos, max_len), caches, pos)
            torch.testing.assert_close(step[:, 0], full[:, i], rtol=1e-5, atol=1e-5)
    assert caches[0].k_cache[:, :, total:].abs().sum() == 0  # nothing written past the last position


def test_lm_head_tie_follows_config():
    tied = Qwen2ForCausalLM(dataclasses.replace(CFG, tie_word_embeddings=True))
    untied = Qwen2ForCausalLM(CFG)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
