"""Pass: merged projections. Sibling linears on one input become one matmul over their shared buffer.

Eager twin: the separate ``q_proj`` / ``k_proj`` / ``v_proj`` (and ``gate_proj`` / ``up_proj``) linears.

    before:  q = linear(x, W_q, b_q)   k = linear(x, W_k, b_k)   v = linear(x, W_v, b_v)
    after:   qkv = linear(x, as_strided(W_q, (Nq + Nk + Nv, H))) + as_strided(b_q, (Nq + Nk + Nv,))
             q, k, v = split(qkv)

Exact (the same dot products), and no weight is copied: it needs the siblings' weights to follow each
other in one storage, which ``flashu_fx.projection_layout.colocate_projections`` arranges. Adjacency is
checked on the graph's example values; siblings that are not adjacent stay separate matmuls (a warning,
unless they are FFN slices, which the layout cannot keep adjacent). The caller must give every set of
weights that runs through the compiled graph the same layout (the runtimes colocate the whole model).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx

from flashu_fx.projection_layout import PROJECTION_GROUPS, adjacent
from passes.graph_utils import fake_value, linear_calls

log = logging.getLogger(__name__)


def find_sibling_linears(gm: fx.GraphModule) -> dict[tuple[str, tuple[str, ...]], dict[str, fx.Node | None]]:
    """(module path, group) -> {projection name: its F.linear node} (None where a projection is called twice)."""
    group_of = {leaf: group for group in PROJECTION_GROUPS for leaf in group}
    found: dict[tuple[str, tuple[str, ...]], dict[str, fx.Node | None]] = {}
    for parent, leaf, node in linear_calls(gm):
        if leaf in group_of:
            members = found.setdefault((parent, group_of[leaf]), {})
            members[leaf] = None if leaf in members else node
    return found


def _linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    args = list(node.args) + [None] * (3 - len(node.args))
    return args[0], args[1], node.kwargs.get("bias", args[2])


def merge_projections(gm: fx.GraphModule) -> int:
    """Merge every adjacent q/k/v and gate/up group of ``gm``. Returns the number of groups merged."""
    merged = 0
    for (parent, leaves), nodes in find_sibling_linears(gm).items():
        if any(n is None for n in nodes.values()):
            log.warning("merge_projections: %s calls a projection of %s twice; left separate", parent, "/".join(leaves))
            continue
        if set(nodes) != set(leaves):  # e.g. V-norm pruning reads v_proj alone: nothing to merge
            log.debug("merge_projections: %s uses only %s of %s", parent, sorted(nodes), "/".join(leaves))
            continue
        linears = [nodes[leaf] for leaf in leaves]
        inputs, weights, biases = zip(*(_linear_args(n) for n in linears), strict=True)
        if any(x is not inputs[0] for x in inputs):
            log.warning("merge_projections: %s's %s read different inputs; left separate", parent, "/".join(leaves))
            continue
        fakes = [fake_value(w) for w in weights]
        ok = all(f is not None and f.dim() == 2 for f in fakes) and adjacent(fakes)
        if any(b is not None for b in biases):
            bias_fakes = [fake_value(b) for b in biases]
            ok = ok and all(f is not None for f in bias_fakes) and adjacent(bias_fakes)
        if not ok:
            sliced = any(isinstance(w, fx.Node) and w.op != "placeholder" for w in weights)
            (log.debug if sliced else log.warning)(
                "merge_projections: %s's %s weights are not adjacent in one buffer (colocate_projections lays them "
                "out); left separate", parent, "/".join(leaves))
            continue
        sizes = [f.shape[0] for f in fakes]
        hidden = fakes[0].shape[1]
        first = linears[0]
        graph = gm.graph
        with graph.inserting_before(first):
            weight = graph.call_function(torch.as_strided, (weights[0], (sum(sizes), hidden), (hidden, 1)))
            fused = product = graph.call_function(F.linear, (inputs[0], weight))
            bias = None
            if biases[0] is not None:
                # A separate add: inductor fuses it into the consumers (RoPE, the K/V copies) instead of an
                # addmm epilogue that writes the biased product out first.
                bias = graph.call_function(torch.as_strided, (biases[0], (sum(sizes),), (1,)))
                fused = graph.call_function(operator.add, (product, bias))
            parts = graph.call_function(torch.split, (fused, sizes, -1))
            outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(linears))]
        stack = list(first.meta.get("nn_module_stack", {}).items())[:-1]  # the parent: not a projection any more
        for new in (weight, product, bias, fused, parts, *outs):
            if new is not None:
                new.meta["nn_module_stack"] = dict(stack)
        for old, out in zip(linears, outs, strict=True):
            old.replace_all_uses_with(out)
            graph.erase_node(old)
        merged += 1
    gm.graph.lint()
    gm.recompile()
    return merged
