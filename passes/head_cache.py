"""Passes: the diffusion-head cache, and the dead trunk of a call that reuses it.

Eager twin: ``FlashUGenVelocity.__call__``'s head actions. "store" keeps the output of the last head block
(M, L, D) for later calls; "reuse" feeds that stored output to the final layer (with the call's own t) instead of
running the head, so SigLIP, the fusion, the LLM trunk and the head blocks become dead code (unless the call
also measures layer importance, which keeps the trunk alive through its output).

    expose_head_output(gm):  ... h = head_block[-1](...) ; v = final(h, c)      ->  returns (v, h)
    reuse_head_output(gm):   ... h = head_block[-1](...) ; v = final(h, c)      ->  v = final(head_cache, c)
                             (head_cache a new last input; everything only h needed is removed)

The head's output is found as the last head block's boundary (``passes.layer_skipping.layer_boundaries``); a graph
without one is left exact, with a warning.
"""

from __future__ import annotations

import warnings

from torch import fx

from passes.graph_utils import DERIVED_BY, append_output
from passes.layer_skipping import layer_boundaries

HEAD_CACHE_INPUT = "head_cache"


def head_output(gm: fx.GraphModule) -> fx.Node | None:
    """The last diffusion-head block's output node, or None (with a warning) when it has no boundary."""
    boundaries, reasons = layer_boundaries(gm, "head_block")
    if max([*boundaries, *reasons], default=-1) not in boundaries:
        warnings.warn(f"head_cache: no boundary for the last head block ({reasons or 'no head block'}); the graph "
                      "stays exact", stacklevel=3)
        return None
    return boundaries[max(boundaries)].output


def expose_head_output(gm: fx.GraphModule) -> int:
    """Make ``gm`` also return the head's output (M, L, D) as its last output. Returns 1, or 0 (unchanged)."""
    node = head_output(gm)
    if node is None:
        return 0
    append_output(gm.graph, node)
    gm.graph.lint()
    gm.recompile()
    return 1


def reuse_head_output(gm: fx.GraphModule) -> int:
    """Feed a stored head output to everything after the head, as a new last input named ``head_cache``, and remove
    what only the head needed. Returns the number of nodes removed (0: unchanged)."""
    node = head_output(gm)
    if node is None:
        return 0
    graph = gm.graph
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        cached = graph.placeholder(HEAD_CACHE_INPUT)
    cached.meta = {k: v for k, v in node.meta.items() if k in ("example_value", "val")}
    cached.meta[DERIVED_BY] = "reuse_head_output"
    before = len(graph.nodes)
    node.replace_all_uses_with(cached)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return before - len(graph.nodes)
