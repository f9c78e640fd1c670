"""Pass: each attention's queries laid out token-major, so that its output reaches the o product without a copy.

Eager twin: ``flashu_fx.layers.attention`` on the queries ``Qwen2Attention.qkv`` returns (after RoPE); values unchanged.

    before:  q = rope(q_proj(x).view(B, L, H, d).transpose(1, 2))     # (B, H, L, d), laid out as the compiler picks
             o = sdpa(q, k, v, mask)                                  # the attention library lays o out as q
             y = o_proj(o.transpose(1, 2).reshape(B, L, H * d))       # a copy when o is head-major, then the product
    after:   q = q.transpose(1, 2).contiguous().transpose(1, 2)        # (B, H, L, d) with (B, L, H, d) memory
             ...                                                       # o token-major too: the reshape is a view

Why: the attention libraries write their output in the query's layout (cuDNN's, and the meta function inductor
plans with: ``alloc_with_matching_layout``), and the o product needs (B * L, H * d) rows. Eager torch keeps the
projection's token-major layout through RoPE; a compiler free to choose may lay the RoPE result out head-major, and
then pays a transpose of the attention output before every o product (4 us a 1.5B trunk layer on an H100,
BENCHMARKS.md). With the layout fixed here, the RoPE kernel writes token-major rows (the copy fuses into it) and the
transpose goes. Only where it can matter: a 4-D query with more than one head and more than one position (a decode
step's single row is both layouts at once). Exact: only strides change.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, fx

from passes.graph_utils import captured_value, mark_glue

log = logging.getLogger(__name__)

PASS_NAME = "token_major_queries"
_SDPA = torch._C._nn.scaled_dot_product_attention


def _query(node: fx.Node) -> fx.Node | None:
    query = node.args[0] if node.args else node.kwargs.get("query")
    return query if isinstance(query, fx.Node) else None


def lay_out_queries_token_major(gm: fx.GraphModule) -> int:
    """Give every attention of ``gm`` whose queries (B, H, L, d) have H > 1 and L > 1 token-major queries (see the
    module docstring). Returns how many attentions changed; a query whose shape the capture does not record is
    left as it is."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        query = _query(node)
        value = captured_value(query)
        if not isinstance(value, Tensor) or value.dim() != 4 or value.shape[1] == 1 or value.shape[2] == 1:
            continue
        with gm.graph.inserting_before(node):
            tokens_first = gm.graph.call_method("transpose", (query, 1, 2))
            dense = gm.graph.call_method("contiguous", (tokens_first,))
            heads_first = gm.graph.call_method("transpose", (dense, 1, 2))
        for new in (tokens_first, dense, heads_first):
            mark_glue(new, PASS_NAME, node)
        node.replace_input_with(query, heads_first)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    log.debug("%s: %d attention(s)", PASS_NAME, changed)
    return changed
