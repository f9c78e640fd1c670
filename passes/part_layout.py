"""Pass: values that leave one part for the next take the contiguous layout.

Eager twin: the captured forward itself (the same values, only their memory layout changes).

Eager keeps a computed value in the layout of its inputs, and so does inductor for a compiled part's outputs, to
match eager's strides. Show-o2's patch embedding is a transposed view (``conv(x).flatten(2).transpose(1, 2)``),
so the SigLIP residual stream is hidden-major in eager and stays so through every layer: each eager layer norm
copies it to rows first. Compiled as one graph, inductor picks its own layouts inside and never sees it; split
into one part per layer (``passes.partition``), every part is compiled to take and return the transposed layout,
and inductor lowers each of its layer norms over strided rows as three kernels (a split reduction), 3% of a 1.5B
image on an H200.

    add (B, S, H), strides (S H, 1, S) ─ next part          (the value a part hands over, computed, not a view)
 -> add ─ contiguous (B, S, H), strides (S H, H, 1) ─ next part

Inductor folds the ``contiguous`` into the kernel that computes the value, so it costs nothing: the kernel writes
rows. Only values computed in a part (not views: those stay free for the reading part to fold) with static,
non-contiguous strides are rewritten; users in the same part keep the original.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import fx

from passes.graph_utils import captured_value, inherit_provenance
from passes.partition import part_names

PASS_NAME = "part_layout"


def contiguous_part_outputs(gm: fx.GraphModule) -> int:
    """Give every computed, non-contiguous value that a later part reads a ``contiguous`` node in its own part,
    read by those parts instead. Returns how many values were rewritten (0: the graph is unchanged)."""
    names = part_names(gm)
    rewritten = 0
    for node, part in list(names.items()):
        readers = [user for user in node.users if names.get(user, part) != part]
        value = captured_value(node)
        if not readers or not _computed_and_strided(value):
            continue
        with gm.graph.inserting_after(node):
            rows = gm.graph.call_method("contiguous", (node,))
        rows.meta.update({key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta})
        with getattr(value, "fake_mode", None) or nullcontext():
            rows.meta["example_value"] = value.contiguous()
        inherit_provenance([rows], [node], PASS_NAME)
        for user in readers:
            user.replace_input_with(node, rows)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def _computed_and_strided(value: object) -> bool:
    """A tensor that is no view, with static sizes and strides, and not contiguous."""
    if not isinstance(value, torch.Tensor) or value._is_view():
        return False
    if not all(isinstance(n, int) for n in (*value.shape, *value.stride())):
        return False
    return not value.is_contiguous()
