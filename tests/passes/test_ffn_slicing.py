"""passes.ffn_slicing against its eager twin (the masked FFN), on a Dynamo-captured decoder layer."""

from __future__ import annotations

import logging

import torch
from captured import capture
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.layers import rope_cos_sin, rope_inv_freq
from flashu_fx.masks import omni_mask
from flashu_fx.qwen2 import Qwen2DecoderLayer
from passes.ffn_slicing import find_ffn_linears, slice_ffn


@settings(deadline=None, max_examples=6)
@given(lo=st.integers(0, 200), width=st.integers(1, 56), seq=st.integers(1, 9))
def test_sliced_layer_equals_masked_ffn(tiny_model, lo: int, width: int, seq: int) -> None:
    layer: Qwen2DecoderLayer = tiny_model.showo.model.layers[1]
    cfg = tiny_model.config
    x = torch.randn(2, seq, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(seq), rope_inv_freq(cfg.head_dim, cfg.rope_theta), x.dtype)
    mask = omni_mask(torch.tensor([0, 0]), seq, 0)
    gm, inputs = capture(lambda mod, *a: mod(*a), layer, x, cos, sin, mask)
    assert slice_ffn(gm, lo, lo + width) == 1
    out = gm(*inputs)[0]
    ref = layer(x, cos, sin, mask, ffn_ranges=((lo, lo + width),))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # The eager twin: the full FFN with every other neuron's activation zeroed.
    h = layer.post_attention_layernorm(x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask))
    mlp = layer.mlp
    keep = torch.zeros(cfg.intermediate_size)
    keep[lo:lo + width] = 1
    masked = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h) * keep)
    torch.testing.assert_close(out, h.new_zeros(()) + (ref - masked) + masked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref - x - layer.self_attn(layer.input_layernorm(x), cos, sin, mask), masked,
                               rtol=1e-4, atol=1e-5)


def test_graph_without_mlp_is_left_unchanged(caplog) -> None:
    net = torch.nn.Linear(4, 4)
    gm, inputs = capture(lambda m, a: m(a), net, torch.randn(2, 4))
    before = gm.code
    with caplog.at_level(logging.WARNING):
        assert slice_ffn(gm, 0, 2) == 0
    assert gm.code == before
    assert find_ffn_linears(gm) == {}
