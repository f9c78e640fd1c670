"""und_trans: our SigLIP encoder layer against transformers' SiglipEncoderLayer with the same weights
(fp32, gelu_pytorch_tanh, LayerNorm eps 1e-6, no mask; docs/SHOWO2.md §1.3)."""

from __future__ import annotations

import inspect

import pytest
import torch
from random_weights import randomize_

from flashu_fx.config import get_config
from flashu_fx.layers import FP32LayerNorm
from flashu_fx.siglip import SiglipEncoder, SiglipEncoderLayer

hf_siglip = pytest.importorskip("transformers.models.siglip.modeling_siglip")
from transformers import SiglipVisionConfig  # noqa: E402

# (hidden, heads, intermediate): the tiny preset's stack, and so400m's real widths (16 heads x 72 dims).
SIZES = {"tiny": (48, 4, 96), "so400m": (1152, 16, 4304)}


def hf_layer(hidden: int, heads: int, intermediate: int, attn_implementation: str):
    cfg = SiglipVisionConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        attention_dropout=0.0,
    )
    cfg._attn_implementation = attn_implementation
    return hf_siglip.SiglipEncoderLayer(cfg)


def hf_forward(layer, x):
    kwargs = {"attention_mask": None} if "attention_mask" in inspect.signature(layer.forward).parameters else {}
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# Input scale 0.003 makes the variance comparable to eps, so a wrong LayerNorm eps (1e-5) fails too.
@pytest.mark.parametrize("scale", [2.0, 0.003])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("size", sorted(SIZES))
def test_encoder_layer_matches_transformers(size, attn_implementation, scale, device):
    hidden, heads, intermediate = SIZES[size]
    ours = randomize_(SiglipEncoderLayer(hidden, heads, intermediate), seed=0).to(device).eval()
    theirs = hf_layer(hidden, heads, intermediate, attn_implementation).to(device).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = (scale * torch.randn(2, 29, hidden, generator=torch.Generator().manual_seed(1))).to(device)
    with torch.no_grad():
        out, ref = ours(x), hf_forward(theirs, x)
    assert out.shape == ref.shape == x.shape
    err = ((out - ref).norm() / (ref - x).norm()).item()  # relative to the layer's own contribution
    assert err < 1e-5, f"relative error {err:.2e}"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_layer_hyperparameters():
    layer = SiglipEncoderLayer(1152, 16, 4304)
    assert isinstance(layer.layer_norm1, FP32LayerNorm) and isinstance(layer.layer_norm2, FP32LayerNorm)
    assert layer.layer_norm1.eps == layer.layer_norm2.eps == 1e-6
    assert (layer.self_attn.num_heads, layer.self_attn.head_dim) == (16, 72)
    assert layer.mlp.fc1.out_features == 4304


def test_layer_norm_runs_in_fp32_for_bf16_inputs():
    norm = randomize_(FP32LayerNorm(48, eps=1e-6), seed=2).to(torch.bfloat16)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ref = torch.nn.functional.layer_norm(x.float(), (48,), norm.weight.float(), norm.bias.float(), 1e-6)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))


def test_encoder_stack_is_the_layers_in_order():
    cfg = get_config("tiny")
    stack = randomize_(SiglipEncoder(cfg), seed=4).eval()
    assert len(stack.layers) == cfg.und_num_layers
    x = torch.randn(1, cfg.und_num_positions, cfg.und_hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = x
        for layer in stack.layers:
            ref = layer(ref)
        torch.testing.assert_close(stack(x), ref, rtol=0, atol=0)
    with torch.device("meta"):
        assert len(SiglipEncoder(get_config("showo2-1.5b")).layers) == 26  # so400m's 27 minus the last
