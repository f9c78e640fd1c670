"""Pass: physically sliced FFN. Rewrites a decoder layer's SwiGLU to dense matmuls on weight slices.

Eager twin: ``Qwen2MLP.forward(x, ranges=((lo, hi),))``, the FFN whose other neurons are masked to zero
(``flashu_fx.ffn_layout`` permutes the kept neurons into one contiguous range first).

    before:  linear(h, W_gate)            linear(h, W_up)            linear(a, W_down)
    after:   linear(h, W_gate[lo:hi])     linear(h, W_up[lo:hi])     linear(a, W_down[:, lo:hi])

The slices are views: no weight is copied. Nodes are found through ``meta["nn_module_stack"]``
(``...mlp.gate_proj`` / ``.up_proj`` / ``.down_proj``); a graph without exactly one of each per MLP is
left unchanged, with a logged reason.
"""

from __future__ import annotations

import logging
import operator

from torch import fx

from passes.graph_utils import DERIVED_BY, linear_calls

log = logging.getLogger(__name__)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def find_ffn_linears(gm: fx.GraphModule) -> dict[str, dict[str, fx.Node]]:
    """MLP module path -> {"gate_proj": node, "up_proj": node, "down_proj": node} of its F.linear calls."""
    found: dict[str, dict[str, fx.Node]] = {}
    for parent, leaf, node in linear_calls(gm):
        if leaf in PROJECTIONS:
            if leaf in found.setdefault(parent, {}):
                found[parent][leaf] = None  # called twice: ambiguous, refuse below
            else:
                found[parent][leaf] = node
    return found


def slice_ffn(gm: fx.GraphModule, lo: int, hi: int) -> int:
    """Rewrite every matched MLP to neurons [lo, hi). Returns the number of MLPs rewritten."""
    rewritten = 0
    for parent, nodes in find_ffn_linears(gm).items():
        if set(nodes) != set(PROJECTIONS) or any(n is None for n in nodes.values()):
            log.warning("slice_ffn: %s lacks a single gate/up/down linear each; left exact", parent)
            continue
        for leaf, node in nodes.items():
            weight = node.args[1]
            index = slice(lo, hi) if leaf != "down_proj" else (slice(None), slice(lo, hi))
            with gm.graph.inserting_before(node):
                sliced = gm.graph.call_function(operator.getitem, (weight, index))
            sliced.meta = {k: v for k, v in weight.meta.items() if k != "example_value"}
            sliced.meta[DERIVED_BY] = "slice_ffn"  # its provenance (SOURCE) is the weight's
            node.replace_input_with(weight, sliced)
        rewritten += 1
    gm.graph.lint()
    gm.recompile()
    return rewritten


