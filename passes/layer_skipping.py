"""Passes: dynamic layer skipping and its measurement, over a captured forward's decoder layers.

Eager twins: ``FlashUUndDecoder.step`` (a skipped layer is the identity and writes no K/V; a measuring step runs
every layer and records importance_l = 1 - cos(input_l, output_l) at the last row, ``layer_importance``) and
``FlashUGenVelocity``'s skip and measure calls (the importance averaged over the image slots).

    skip_layers(gm, {2}):        ... h1 = layer1(h0) ; h2 = layer2(h1) ; h3 = layer3(h2) ...
                             ->  ... h1 = layer1(h0) ;                    h3 = layer3(h1) ...
    measure_layer_importance(gm): the graph returns one more output, last: importance (num_layers,) fp32

A layer's boundary is found in the graph, not assumed: its nodes are those created inside
``showo.model.layers.i`` (``nn_module_stack``); its output is the one node of them read outside; its input is the one
value from outside it with the output's shape (the residual stream). Removing a layer removes its cache writes with
it (a layer appending to its own ``LayerCache`` simply does not append). A layer without such a boundary is left in
place, with a warning. Each skip set is its own graph (a guarded variant the executor picks per call).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch._subclasses.fake_tensor import FakeTensor

from passes.graph_utils import DERIVED_BY, append_output, inherit_provenance, output_node, placeholder
from passes.partition import anchor, importance_stack


@dataclass(frozen=True)
class LayerBoundary:
    """Decoder layer ``index`` of a captured graph: its nodes (graph order), the residual stream in and out."""

    index: int
    nodes: tuple[fx.Node, ...]
    input: fx.Node
    output: fx.Node


def layer_boundaries(gm: fx.GraphModule, kind: str = "layer") -> tuple[dict[int, LayerBoundary], dict[int, str]]:
    """Every decoder layer's (``kind="head_block"``: diffusion-head block's) boundary, and for each one without one
    the reason."""
    members: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module", "get_attr"):
            found = anchor(node)
            if found is not None and found[0] == kind:
                members.setdefault(found[1], []).append(node)
    boundaries, reasons = {}, {}
    for index, nodes in sorted(members.items()):
        inside = set(nodes)
        outputs = [n for n in nodes if any(user not in inside for user in n.users)]
        if len(outputs) != 1:
            reasons[index] = f"{len(outputs)} of its values are read outside it (need one: the residual stream)"
            continue
        shape = _shape(outputs[0])
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside and _shape(a) == shape}
        if len(inputs) != 1:
            reasons[index] = f"{len(inputs)} values of its output's shape {shape} enter it (need one)"
            continue
        boundaries[index] = LayerBoundary(index, tuple(nodes), inputs.pop(), outputs[0])
    return boundaries, reasons


def _shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("example_value")
    return tuple(str(s) for s in value.shape) if isinstance(value, Tensor) else None


def skip_layers(gm: fx.GraphModule, layers: tuple[int, ...]) -> int:
    """Remove decoder ``layers`` from ``gm``: each one's output is replaced by its input. Returns how many were
    removed; a layer without a boundary (or absent) stays, with a warning."""
    boundaries, reasons = layer_boundaries(gm)
    removed, bypass = 0, {}  # a removed layer's output -> the value that now stands for it
    for index in sorted(layers):
        boundary = boundaries.get(index)
        if boundary is None:
            why = reasons.get(index, "the graph has no such layer")
            warnings.warn(f"skip_layers: layer {index} stays ({why}); its output is exact", stacklevel=2)
            continue
        source = bypass.get(boundary.input, boundary.input)  # consecutive skipped layers chain to the first input
        boundary.output.replace_all_uses_with(source)
        bypass[boundary.output] = source
        for node in reversed(boundary.nodes):  # in-place cache writes have no users: erase them explicitly
            gm.graph.erase_node(node)
        removed += 1
    gm.graph.lint()
    gm.recompile()
    return removed


def layer_importance_of(inputs: Tensor, outputs: Tensor) -> Tensor:
    """1 - cos(input, output) of the last row in fp32, as ``flashu_fx.flashu_gen.layer_importance`` over it."""
    return 1.0 - F.cosine_similarity(inputs[:, -1].float(), outputs[:, -1].float(), dim=-1).mean()


def image_block_importance_of(inputs: Tensor, outputs: Tensor, offsets: Tensor, slot_len: int) -> Tensor:
    """1 - cos(input, output) over every row's image slot in fp32: generation's measurement (``FlashUGenVelocity``'s
    ``layer_importance`` of ``image_block``s). inputs, outputs (M, L, H); offsets (M,) slot starts."""
    # The cosine of every position first, then the slot's gathered: gathering the (M, L, H) rows inside the
    # reduction made inductor emit one poorly parallel kernel (measured: 148 us per layer at 1.5B on an H200, 4 ms
    # per measuring call); one reduction per position plus a gather of (M, slot_len) scalars is the same values.
    cosine = F.cosine_similarity(inputs.float(), outputs.float(), dim=-1)  # (M, L)
    index = offsets[:, None] + torch.arange(slot_len, device=offsets.device)[None]
    return 1.0 - cosine.gather(1, index).mean()


def every_position_importance_of(inputs: Tensor, outputs: Tensor) -> Tensor:
    """1 - cos(input, output) over every row and position in fp32: ``image_block_importance_of`` on a graph whose
    rows hold the image slot alone (``passes.prefix_hoisting``). inputs, outputs (M, S, H)."""
    return 1.0 - F.cosine_similarity(inputs.float(), outputs.float(), dim=-1).mean()


def measure_layer_importance(gm: fx.GraphModule, image_slot: tuple[str, int] | None = None,
                             every_position: bool = False) -> int:
    """Make ``gm`` also return every layer's importance (num_layers,) fp32 as its last output: at the last row
    (understanding), or with ``image_slot`` = (name of the slot-offsets input, slot length) over every row's image
    slot (generation), or with ``every_position`` over every row and position (generation on the slot alone).
    Returns the number of layers measured (0: unchanged, with a warning, when any layer lacks a
    boundary or the offsets input is missing: a partial vector would misplace the skip set)."""
    boundaries, reasons = layer_boundaries(gm)
    offsets = None
    if image_slot is not None:
        offsets = placeholder(gm, image_slot[0])
        if offsets is None:
            reasons = {**reasons, -1: f"no input named {image_slot[0]!r}"}
    if reasons or not boundaries:
        warnings.warn(f"measure_layer_importance: layers without a boundary {reasons or 'none found'}; nothing "
                      "measured", stacklevel=2)
        return 0
    graph = gm.graph
    measured = []
    for index in sorted(boundaries):
        b = boundaries[index]
        # Right after the layer, as a part of its own (``partition.importance_stack``): the layer's part keeps its
        # plain form, so measuring compiles no layer form of its own (one small artifact serves every layer's
        # measurement), and the layer's input is freed early, instead of one final part that holds every layer's
        # input and output and fuses all the measurements (a long compile).
        with graph.inserting_after(b.output):
            if every_position:
                measured.append(graph.call_function(every_position_importance_of, (b.input, b.output)))
            elif offsets is None:
                measured.append(graph.call_function(layer_importance_of, (b.input, b.output)))
            else:
                measured.append(graph.call_function(image_block_importance_of,
                                                    (b.input, b.output, offsets, image_slot[1])))
        measured[-1].meta["nn_module_stack"] = importance_stack(index)
        captured = b.output.meta.get("example_value")
        if isinstance(captured, FakeTensor):  # its example value, as Dynamo gives every node: an fp32 scalar
            with captured.fake_mode:
                measured[-1].meta["example_value"] = torch.empty((), dtype=torch.float32, device=captured.device)
        inherit_provenance([measured[-1]], [b.output], "measure_layer_importance")
    with graph.inserting_before(output_node(graph)):
        stacked = graph.call_function(torch.stack, (measured,))
        stacked.meta[DERIVED_BY] = "measure_layer_importance"
        stacked.meta["nn_module_stack"] = importance_stack(len(measured))  # a part of its own: "final" stays plain
    append_output(graph, stacked)
    graph.lint()
    gm.recompile()
    return len(measured)
