"""Passes: physically sliced FFN. Rewrite a decoder layer's SwiGLU to dense matmuls on weight slices.

Eager twin: ``Qwen2MLP.forward(x, ranges=((lo, hi),))``, the FFN whose other neurons are masked to zero
(``flashu_fx.ffn_layout`` permutes the kept neurons into one contiguous range first).

    before:  linear(h, W_gate)            linear(h, W_up)            linear(a, W_down)
    after:   linear(h, W_gate[lo:hi])     linear(h, W_up[lo:hi])     linear(a, W_down[:, lo:hi])

The slices are views: no weight is copied. Nodes are found through ``meta["nn_module_stack"]``
(``...mlp.gate_proj`` / ``.up_proj`` / ``.down_proj``); a graph without exactly one of each per MLP is
left unchanged, with a logged reason.

``slice_ffn_inputs`` does the same over a partitioned captured graph (``passes.partition``), one range per layer:
the slices are taken in the root, so each layer's part receives views of its weights as inputs and the parts keep
one structure (one compiled artifact for every layer, whatever each layer's range start).
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Sequence

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




# A decoder layer's FFN weight as Dynamo names its graph input.
_FFN_WEIGHT = re.compile(r"layers_modules_(\d+)_modules_mlp_modules_(gate_proj|up_proj|down_proj)_parameters_weight_$")


def slice_ffn_inputs(root: fx.GraphModule, ranges: Sequence[tuple[int, int] | None]) -> int:
    """In a partitioned graph's root, feed layer i's parts the FFN weight slices of neurons ``ranges[i]`` (None:
    the whole FFN). Returns the number of layers whose three weights were sliced; a layer with fewer than three
    matching inputs is left whole, with a warning."""
    found: dict[int, list[fx.Node]] = {}
    for node in root.graph.nodes:
        match = _FFN_WEIGHT.search(node.name) if node.op == "placeholder" else None
        if match and int(match.group(1)) < len(ranges) and ranges[int(match.group(1))] is not None:
            found.setdefault(int(match.group(1)), []).append(node)
    sliced = 0
    for layer, weights in sorted(found.items()):
        if len(weights) != 3:
            log.warning("slice_ffn_inputs: layer %d has %d FFN weight inputs (need 3); left whole", layer, len(weights))
            continue
        lo, hi = ranges[layer]
        for weight in weights:
            index = (slice(None), slice(lo, hi)) if "down_proj" in weight.name else slice(lo, hi)
            with root.graph.inserting_after(weight):
                view = root.graph.call_function(operator.getitem, (weight, index))
            weight.replace_all_uses_with(view, delete_user_cb=lambda user, view=view: user is not view)
            view.meta[DERIVED_BY] = "slice_ffn_inputs"
        sliced += 1
    root.graph.lint()
    root.recompile()
    return sliced
