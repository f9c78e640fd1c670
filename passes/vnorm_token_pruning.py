"""Pass: V-norm visual-token pruning inside the captured understanding prefill.

Eager twin: the pruning step of ``FlashUUndDecoder.prefill`` (``flashu_fx.flashu_und.select_kept_positions``): at
decoder layer p, rank the image tokens by the L2 norm of their value vectors v_proj(input_layernorm(h)) (the V
layer p itself computes), keep the ``keep`` smallest, and let every later layer see only the kept rows, at their
original RoPE positions, under the omni mask restricted to them.

    before:  layer p: v = v_proj(...) ... h_p          layer p+1 (h_p, cos, sin, mask) ...
    after:   layer p: v = v_proj(...) ... h_p
             kept = flashu.vnorm_topk(v, offsets + 1, n, keep)          (one Triton kernel on CUDA)
             rows = the prompt rows without the dropped image tokens, ascending
             layer p+1 (h_p[:, rows], cos[rows], sin[rows], mask[rows][:, rows]) ...

"Every value a later layer reads" is found, not assumed: each value computed before layer p+1 and read after it
is gathered along its prompt-row axes (those whose size is the prompt length: the hidden state (1, L, H), RoPE
tables (L, d), the mask (1, 1, L, L)). Later layers append only the kept rows to their own caches
(``flashu_fx.und_cache.LayerCache``), so the decode graph needs no change. A graph without layer p's single
v_proj, the ``offsets`` input, or with a row-indexed value of another layout is left exact, with a warning.
The row selection uses no prompt length, so a graph with a symbolic prompt length is rewritten the same way.
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch import Tensor, fx

import triton_kernels  # noqa: F401  (registers torch.ops.flashu.vnorm_topk)
from passes.graph_utils import append_output, inherit_provenance, linear_calls
from passes.partition import anchor

PASS_NAME = "vnorm_token_pruning"


def kept_rows(v: Tensor, offsets: Tensor, num_image: int, keep: int) -> Tensor:
    """The prompt rows that stay: every row outside the image slot plus the ``keep`` image tokens of smallest V
    norm (ties -> lower position), ascending. v: (1, L, KV * d); offsets: (1,) the time token, so the image
    tokens are [offsets + 1, offsets + 1 + num_image). -> int64 (L - num_image + keep,)."""
    start = offsets + 1
    kept = torch.ops.flashu.vnorm_topk(v, start, 0, num_image, keep)[0]
    position = torch.ones_like(v[0, :, 0], dtype=torch.int64).cumsum(0) - 1  # arange(L) with no size in it
    dropped = (position >= start) & (position < start + num_image)
    dropped = dropped.index_fill(0, kept, False)
    order = torch.sort(position + dropped.to(torch.int64) * (1 << 40)).indices  # dropped rows sort last
    return order[: order.shape[0] - (num_image - keep)]


def _row_axes(value: Tensor, rows: set[str]) -> tuple[int, ...] | None:
    """The axes of ``value`` that index prompt rows, for the layouts a decoder layer reads; None otherwise."""
    axes = tuple(i for i, size in enumerate(value.shape) if str(size) in rows)
    if not axes:
        return ()
    layouts = {3: {(1,)}, 2: {(0,)}, 4: {(2, 3)}, 1: {(0,)}}  # hidden, RoPE table, mask, positions
    return axes if axes in layouts.get(value.dim(), set()) else None


def _is_weight_or_cache(node: fx.Node) -> bool:
    """A lifted parameter or buffer of the model or of the cache (not indexed by prompt row)."""
    return node.name.startswith(("l_self_", "l_cache_"))


def prune_tokens_after_layer(gm: fx.GraphModule, layer: int, num_image: int, keep: int) -> int:
    """Rewrite ``gm`` (a captured ``Showo2.understand`` prefill) to prune image tokens after decoder ``layer``.

    The prompt length must be symbolic (``mark_length_dynamic``): later layers then read their row count from
    a symbol, which the pass replaces by the kept count. Returns the number of values gathered to the kept rows
    (0: the graph is unchanged, with a warning). A rewritten graph returns one more output, last: the kept prompt
    rows (``kept_rows``), for the executor to record and drop before the caller sees the outputs.
    """
    def refuse(why: str) -> int:
        warnings.warn(f"{PASS_NAME}: {why}; the prefill stays exact (no token pruning)", stacklevel=3)
        return 0

    v_nodes = [node for parent, leaf, node in linear_calls(gm)
               if leaf == "v_proj" and parent == f"showo.model.layers.{layer}.self_attn"]
    inputs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    if len(v_nodes) != 1 or "l_offsets_" not in inputs or "l_mask_" not in inputs:
        return refuse(f"found {len(v_nodes)} v_proj calls of layer {layer} (need one) and the inputs "
                      f"{sorted(set(inputs) & {'l_offsets_', 'l_mask_'})} (need offsets and mask)")
    v_node = v_nodes[0]
    length = v_node.meta["example_value"].shape[1]
    if isinstance(length, int):
        return refuse(f"the prompt length is static ({length}): capture the prefill with a symbolic one "
                      "(flashu_fx.layout.mark_length_dynamic)")
    rows = {str(length), *(str(size) for size in inputs["l_mask_"].meta["example_value"].shape[2:])}
    nodes = list(gm.graph.nodes)
    later = [i for i, n in enumerate(nodes)
             if n.op != "placeholder" and (a := anchor(n)) is not None and a[0] == "layer" and a[1] > layer]
    if not later:
        return refuse(f"no decoder layer after layer {layer}")
    before, after = set(nodes[: later[0]]), nodes[later[0] :]
    crossing: dict[fx.Node, tuple[int, ...]] = {}
    symbols: list[fx.Node] = []
    for node in nodes[: later[0]]:
        if not any(user not in before for user in node.users) or (node.op == "placeholder" and
                                                                   _is_weight_or_cache(node)):
            continue
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) and str(value) in rows:
            symbols.append(node)  # the row count later layers size their views with
        if not isinstance(value, Tensor):
            continue
        axes = _row_axes(value, rows)
        if axes is None:
            return refuse(f"{node.name} {tuple(value.shape)} is read after layer {layer} with prompt rows on an axis "
                          "this pass does not know")
        if axes:
            crossing[node] = axes
    if not crossing:
        return refuse(f"no value indexed by prompt row crosses layer {layer}")

    graph = gm.graph
    with graph.inserting_before(nodes[later[0]]):
        selected = graph.call_function(kept_rows, (v_node, inputs["l_offsets_"], num_image, keep))
        replacement: dict[fx.Node, fx.Node] = {}
        for node, axes in crossing.items():
            gathered = node
            for axis in axes:
                gathered = graph.call_function(torch.index_select, (gathered, axis, selected))
                inherit_provenance([gathered], [node], PASS_NAME)
            replacement[node] = gathered
        for symbol in symbols:
            replacement[symbol] = graph.call_function(operator.sub, (symbol, num_image - keep))
            inherit_provenance([replacement[symbol]], [symbol], PASS_NAME)
    inherit_provenance([selected], [v_node], PASS_NAME)
    for user in after:
        for old, new in replacement.items():
            user.replace_input_with(old, new)
    append_output(graph, selected)
    graph.lint()
    gm.recompile()
    return len(crossing)


def kept_image_positions(rows: Tensor, offset: int, keep: int) -> tuple[int, ...]:
    """The prompt positions of the kept image tokens (host read), from ``kept_rows``'s result and the time token's
    position ``offset``: the rows before the image come first, then the kept image tokens."""
    start = offset + 1
    return tuple(rows[start : start + keep].tolist())
