"""passes.token_major_queries against its eager twin, ``flashu_fx.layers.attention`` on RoPE'd queries: the same
values, the queries (and so the attention's output) token-major."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from captured import capture
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from flashu_fx.layers import apply_rope, attention
from passes.graph_utils import DERIVED_BY
from passes.token_major_queries import PASS_NAME, lay_out_queries_token_major


def attention_block(x, wq, wk, wv, wo, cos, sin, mask):
    """One decoder attention as ``Qwen2Attention`` computes it: x (B, L, D) -> (B, L, D)."""
    b, n, _ = x.shape
    d = cos.shape[-1]
    q = F.linear(x, wq).view(b, n, -1, d).transpose(1, 2)
    k = F.linear(x, wk).view(b, n, -1, d).transpose(1, 2)
    v = F.linear(x, wv).view(b, n, -1, d).transpose(1, 2)
    # the layout a compiler may choose for the RoPE result (head-major), written out so eager shows it too
    q = apply_rope(q, cos, sin).contiguous()
    return F.linear(attention(q, apply_rope(k, cos, sin), v, mask), wo)


def block_inputs(seed: int, batch: int, length: int, kv_heads: int, group: int, d: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    heads, hidden = kv_heads * group, 16
    x = torch.randn(batch, length, hidden, generator=gen)
    weights = [torch.randn(rows, hidden, generator=gen) / 4 for rows in (heads * d, kv_heads * d, kv_heads * d)]
    wo = torch.randn(hidden, heads * d, generator=gen) / 4
    angles = torch.randn(length, d, generator=gen)
    mask = torch.rand(batch, 1, length, length, generator=gen) < 0.8
    mask |= torch.eye(length, dtype=torch.bool)  # every query sees at least itself
    return [x, *weights, wo, angles.cos(), angles.sin(), mask]


class QueryStrides(fx.Interpreter):
    """Runs a graph and records the strides of the queries each attention receives."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.seen: list[torch.Tensor] = []

    def call_function(self, target, args, kwargs):
        if target is torch._C._nn.scaled_dot_product_attention:
            self.seen.append(args[0])
        return super().call_function(target, args, kwargs)


@settings(deadline=None, max_examples=12)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 2), length=st.integers(1, 9),
       kv_heads=st.integers(1, 2), group=st.sampled_from([1, 3]), d=st.sampled_from([4, 8]))
def test_the_same_values_with_token_major_queries(seed, batch, length, kv_heads, group, d) -> None:
    args = block_inputs(seed, batch, length, kv_heads, group, d)
    gm, example = capture(attention_block, *args)
    want = gm(*example)
    changed = lay_out_queries_token_major(gm)
    moves = length > 1 and kv_heads * group > 1  # otherwise both layouts are the same memory
    assert changed == int(moves)
    assert sum(n.meta.get(DERIVED_BY) == PASS_NAME for n in gm.graph.nodes) == 3 * changed
    run = QueryStrides(gm)
    got = run.run(*example)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (query,) = run.seen
    assert query.transpose(1, 2).is_contiguous()  # token-major memory: (B, L, H, d)
    if moves:
        assert not query.is_contiguous()


def test_a_graph_without_attention_is_left_as_it_is() -> None:
    gm, _ = capture(lambda x, w: F.linear(x, w).relu(), torch.randn(2, 3), torch.randn(4, 3))
    before = gm.code
    assert lay_out_queries_token_major(gm) == 0
    assert gm.code == before


def test_the_backend_option_runs_the_pass_in_every_attention_part(tiny_model, caplog) -> None:
    """``flashu_backend(token_major_queries=True)``: the generation parts with attention get token-major queries,
    and the image is the default backend's."""
    from flashu_fx.compiled import flashu_backend, generate_images_compiled

    images = []
    for option in (False, True):
        torch._dynamo.reset()
        backend = flashu_backend("gen", token_major_queries=option)
        gen = torch.compile(tiny_model, backend=backend)
        with caplog.at_level(logging.DEBUG, logger="flashu_fx.compiled.part_compiler"):
            images.append(generate_images_compiled(gen, backend, [[3, 4, 5]], baseline_steps=3, guidance=3.0))
    moved = [r.getMessage() for r in caplog.records if "token_major_queries ->" in r.getMessage()]
    assert moved and any(not message.endswith("-> 0") for message in moved)
    torch.testing.assert_close(images[1], images[0], rtol=1e-6, atol=1e-6)
