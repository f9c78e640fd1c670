"""Pass: merged projections. Sibling linears on one input become one matmul over their shared buffer.

Eager twin: the separate ``q_proj`` / ``k_proj`` / ``v_proj`` (and ``gate_proj`` / ``up_proj``) linears.

    before:  q = linear(x, W_q, b_q)   k = linear(x, W_k, b_k)   v = linear(x, W_v, b_v)
    after:   qkv = linear(x, as_strided(W_q, (Nq + Nk + Nv, H))) + as_strided(b_q, (Nq + Nk + Nv,))
             q, k, v = split(qkv)

Exact (the same dot products), and no weight is copied: it needs the siblings' weights to follow each
other in one storage, which ``flashu_fx.projection_layout.colocate_projections`` arranges. Adjacency is
checked on the graph's example values; siblings that are not adjacent stay separate matmuls (a warning,
unless they are FFN slices). The caller must give every set of weights that runs through the compiled graph
the same layout (the backend colocates the whole model, and again when its weights are replaced).

FFN slices (``passes.ffn_slicing``: gate[lo:hi] and up[lo:hi], sliced in the graph or fed to a part as views
by its root) are two row blocks of the gate/up buffer, so no 2-D view spans them; with ``ffn_slices=True`` they run
as one batched matmul over the (2, hi - lo, H) view of both blocks instead (``gate_up_of_rows``), still without
copying a weight:

    before:  g = linear(h, W_gate[lo:hi])     u = linear(h, W_up[lo:hi])
    after:   g, u = bmm(h, as_strided(W_gate, (2, I, H), (I * H, H, 1))[:, lo:hi].mT)

The distance between the two blocks (I * H elements) is read off the example values and written into the graph:
an artifact compiled from one layer serves every layer with the same colocated layout, whatever its ``lo``.

Every ``as_strided`` here reads a graph input, never a view taken inside the graph: torch 2.11's inductor lowers
``as_strided`` of an in-graph view from the start of the view's base (it drops the view's offset), so
``as_strided(W_gate[lo:hi], ...)`` would read neurons 0 to hi - lo. The rows are sliced after the view instead.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.multiprocessing.reductions import StorageWeakRef

from passes.graph_utils import fake_value, inherit_provenance, linear_args, linear_calls

# Sibling projections that read the same input, in buffer order.
PROJECTION_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def adjacent(tensors: Sequence[Tensor]) -> bool:
    """True if the tensors are contiguous, of one dtype and device, and follow each other in one storage.
    Works on fake tensors too (a graph's example values keep their inputs' storage sharing and offsets)."""
    first = tensors[0]
    if any(t.dtype != first.dtype or t.device != first.device or not t.is_contiguous() for t in tensors):
        return False
    storage = StorageWeakRef(first.untyped_storage())
    offset = first.storage_offset()
    for t in tensors:
        if StorageWeakRef(t.untyped_storage()) != storage or t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


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


def gate_up_of_rows(x: Tensor, gate: Tensor, up_offset: int, lo: int = 0, hi: int | None = None
                    ) -> tuple[Tensor, Tensor]:
    """The gate and up products of FFN neurons ``lo:hi`` as one batched matmul.

    x: (..., H); gate: (I, H) contiguous, the gate weight (or a block of its rows), whose up rows lie ``up_offset``
    elements after it in one storage -> two (..., hi - lo).
    """
    neurons, hidden = gate.shape
    stop = neurons if hi is None else hi  # the view ends where the rows read end: the up rows' end, no further
    both = gate.as_strided((2, stop, hidden), (up_offset, hidden, 1))[:, lo:]  # both blocks' rows lo:hi
    activations = x.reshape(1, -1, hidden).expand(2, -1, -1)  # the same activations for both: batch stride 0
    out = torch.bmm(activations, both.transpose(1, 2))  # (2, M, k)
    shape = (*x.shape[:-1], both.shape[1])
    return out[0].view(shape), out[1].view(shape)


def _is_input(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder"


def input_rows(node: object) -> tuple[fx.Node, int, int | None] | None:
    """(graph input, lo, hi) when ``node`` is a graph input (all its rows) or ``input[lo:hi]`` of one; else None."""
    if _is_input(node):
        return node, 0, None
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        base, index = node.args
        if _is_input(base) and isinstance(index, slice) and index.step in (None, 1):
            lo, hi = index.start or 0, index.stop
            if isinstance(lo, int) and lo >= 0 and (hi is None or isinstance(hi, int) and hi >= lo):
                return base, lo, hi
    return None


def up_offset_of_rows(gate_rows: Tensor, up_rows: Tensor) -> int | None:
    """How many elements after ``gate_rows`` the ``up_rows`` start in their shared storage, when both are (k, H)
    contiguous row blocks of one dtype and device there and up comes after gate; else None (works on fake tensors).
    """
    if gate_rows.dim() != 2 or up_rows.shape != gate_rows.shape or not gate_rows.is_contiguous():
        return None
    if not up_rows.is_contiguous() or (up_rows.dtype, up_rows.device) != (gate_rows.dtype, gate_rows.device):
        return None
    if StorageWeakRef(gate_rows.untyped_storage()) != StorageWeakRef(up_rows.untyped_storage()):
        return None
    offset = up_rows.storage_offset() - gate_rows.storage_offset()
    return offset if offset > 0 else None


def _merge_gate_up_rows(gm: fx.GraphModule, gate: fx.Node, up: fx.Node) -> bool:
    """Rewrite the gate and up linears of one range of neurons into ``gate_up_of_rows``; False (graph unchanged)
    if their weights are not row blocks of one colocated gate/up buffer."""
    (x, w_gate, bias_gate), (x_up, w_up, bias_up) = linear_args(gate), linear_args(up)
    if x is not x_up or bias_gate is not None or bias_up is not None:
        return False
    fakes = fake_value(w_gate), fake_value(w_up)
    offset = None if any(f is None for f in fakes) else up_offset_of_rows(*fakes)
    rows = input_rows(w_gate)
    if offset is None or rows is None:
        return False
    source, lo, hi = rows
    whole = fake_value(source)
    if whole is None or whole.dim() != 2 or not whole.is_contiguous() or fakes[0].shape[0] != (
            whole.shape[0] if hi is None else hi) - lo:  # a slice past the weight's end is clipped: not rows lo:hi
        return False
    graph = gm.graph
    with graph.inserting_before(gate):
        both = graph.call_function(gate_up_of_rows, (x, source, offset, lo, hi))
        outs = [graph.call_function(operator.getitem, (both, i)) for i in range(2)]
    _replace_linears(graph, [gate, up], outs, [both])
    for weight in (w_gate, w_up):  # a slice taken in the graph: read through the gate buffer's view now
        if weight.op != "placeholder" and not weight.users:
            graph.erase_node(weight)
    return True


def _merge_adjacent(graph: fx.Graph, linears: list[fx.Node], x: fx.Node, weights: tuple, biases: tuple,
                    sizes: list[int], hidden: int) -> None:
    """Rewrite adjacent sibling linears into one product over the spanning view (plus bias) and a split."""
    with graph.inserting_before(linears[0]):
        weight = graph.call_function(torch.as_strided, (weights[0], (sum(sizes), hidden), (hidden, 1)))
        fused = product = graph.call_function(F.linear, (x, weight))
        helpers = [weight, product]
        if biases[0] is not None:
            # A separate add: inductor fuses it into the consumers (RoPE, the K/V copies), and at one row
            # under coordinate-descent tuning (decode) the product becomes a Triton reduction, which an
            # addmm would not (only mm is lowered that way).
            bias = graph.call_function(torch.as_strided, (biases[0], (sum(sizes),), (1,)))
            fused = graph.call_function(operator.add, (product, bias))
            helpers += [bias, fused]
        parts = graph.call_function(torch.split, (fused, sizes, -1))
        outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(linears))]
    _replace_linears(graph, linears, outs, [*helpers, parts])


def _replace_linears(graph: fx.Graph, linears: list[fx.Node], outs: list[fx.Node], helpers: list[fx.Node]) -> None:
    """Point every use of each linear at its replacement and erase it; the new nodes belong to the linears'
    parent module (they are not one projection any more)."""
    stack = dict(list(linears[0].meta.get("nn_module_stack", {}).items())[:-1])
    for new in (*helpers, *outs):
        new.meta["nn_module_stack"] = dict(stack)
    inherit_provenance(helpers, linears, "merge_projections")
    for old, out in zip(linears, outs, strict=True):
        inherit_provenance([out], [old], "merge_projections")
        old.replace_all_uses_with(out)
        graph.erase_node(old)


def merge_projections(gm: fx.GraphModule, ffn_slices: bool = False) -> int:
    """Merge every adjacent q/k/v and gate/up group of ``gm`` (and, with ``ffn_slices``, every gate/up pair of
    FFN slices). Returns the number of groups merged."""
    merged = 0
    for (parent, leaves), nodes in find_sibling_linears(gm).items():
        if any(n is None for n in nodes.values()):
            log.warning("merge_projections: %s calls a projection of %s twice; left separate", parent, "/".join(leaves))
            continue
        if set(nodes) != set(leaves):  # e.g. V-norm pruning reads v_proj alone: nothing to merge
            log.debug("merge_projections: %s uses only %s of %s", parent, sorted(nodes), "/".join(leaves))
            continue
        linears = [nodes[leaf] for leaf in leaves]
        inputs, weights, biases = zip(*(linear_args(n) for n in linears), strict=True)
        if any(x is not inputs[0] for x in inputs):
            log.warning("merge_projections: %s's %s read different inputs; left separate", parent, "/".join(leaves))
            continue
        fakes = [fake_value(w) for w in weights]
        # The spanning view is taken of the first weight itself: a graph input (see the module docstring)
        ok = _is_input(weights[0]) and all(f is not None and f.dim() == 2 for f in fakes) and adjacent(fakes)
        if any(b is not None for b in biases):
            bias_fakes = [fake_value(b) for b in biases]
            ok = ok and _is_input(biases[0]) and all(f is not None for f in bias_fakes)
            ok = ok and adjacent(bias_fakes)
        if not ok and ffn_slices and leaves == ("gate_proj", "up_proj") and _merge_gate_up_rows(gm, *linears):
            merged += 1
            continue
        if not ok:
            # FFN slices (sliced in the graph, or fed as views by the root) are never adjacent: expected, quiet
            sliced = leaves == ("gate_proj", "up_proj") or any(isinstance(w, fx.Node) and w.op != "placeholder"
                                                                for w in weights)
            (log.debug if sliced else log.warning)(
                "merge_projections: %s's %s weights are not adjacent in one buffer (colocate_projections lays them "
                "out); left separate", parent, "/".join(leaves))
            continue
        _merge_adjacent(gm.graph, linears, inputs[0], weights, biases, [f.shape[0] for f in fakes], fakes[0].shape[1])
        merged += 1
    gm.graph.lint()
    gm.recompile()
    return merged
