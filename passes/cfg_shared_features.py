"""Pass: the image features once per classifier-free-guidance pair.

Eager twin: ``Showo2.image_embeds`` on the whole CFG batch (the pass computes it on the conditional half and
repeats it). A CFG batch stacks the conditional and the null rows of the same latents, so the
SigLIP stack and the fusion see two equal halves and compute the same features twice.

    latents (M, C, h, w) ─ image embedders, und_trans, fusion ─ features (M, S, H) ─ rest of the forward
 -> latents[:M/2] ─ the same nodes at batch M/2 ─ features (M/2, S, H) ─ cat([f, f]) ─ rest of the forward

The region is every node computed from the latents and the weights alone (no tokens, t, offsets or mask). Halving
it is exact only if no value of one batch row depends on another row, which shapes alone cannot show (a softmax
over the whole batch keeps every shape). So every region op must be on an allow-list of ops that act within a row
when the batch is their leading dim (linear, convolution, layer norm, attention, elementwise ops; reductions,
softmax, concatenation and transposes over other dims only), and every region value must have the batch as its
leading dim. Dynamo bakes the batch into ``view``/``reshape``/``expand`` arguments; their leading size is halved,
and the rewritten region is checked by propagating fake tensors: every node keeps its shape with the batch
halved. A region that fails a check, a graph without latents or with an odd batch stays exact, with a warning.

Valid only when the two halves of the latents are equal: the caller promises it per call
(``backend.step(k, cfg_shared_latents=True)``) and the generation executor applies the pass on those calls only.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx

from passes.graph_utils import mark_glue, placeholder, propagate_fake

LATENTS = "l_latents_"
WEIGHT_PREFIX = "l_self_"
_SIZED_METHODS = ("view", "reshape", "expand")
PASS_NAME = "cfg_shared_features"


def latent_region(gm: fx.GraphModule) -> tuple[fx.Node | None, list[fx.Node]]:
    """The latents placeholder and the nodes computed from it and the weights alone, in graph order."""
    latents = placeholder(gm, LATENTS)
    if latents is None:
        return None, []
    from_latents: set[fx.Node] = {latents}
    per_call: set[fx.Node] = set()
    region = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node is not latents and not node.name.startswith(WEIGHT_PREFIX):
                per_call.add(node)
            continue
        if node.op == "output":
            continue
        inputs = node.all_input_nodes
        if any(i in per_call for i in inputs):
            per_call.add(node)
        elif any(i in from_latents for i in inputs):
            from_latents.add(node)
            region.append(node)
    return latents, region


def share_cfg_features(gm: fx.GraphModule) -> int:
    """Compute the latents' region on the first half of the batch and repeat its outputs. Returns the number of
    region nodes now run at half batch (0: the graph is unchanged)."""
    latents, region = latent_region(gm)
    batch = None if latents is None else latents.meta.get("example_value")
    if batch is None or not region:
        return _refuse("no latents input, or nothing computed from it alone")
    m = batch.shape[0]
    if not isinstance(m, int) or m < 2 or m % 2:
        return _refuse(f"the latents' batch {m} is not an even number (a classifier-free-guidance pair)")
    why = _mixes_rows(region, m)
    if why:
        return _refuse(why)
    work = copy.deepcopy(gm)
    names = {n.name for n in region}
    work_region = [n for n in work.graph.nodes if n.name in names]
    work_latents = next(n for n in work.graph.nodes if n.name == LATENTS)
    expected = {n.name: _halved(n.meta.get("example_value")) for n in work_region}
    _rewrite(work, work_latents, work_region, m)
    why = _shapes_differ(work, expected)
    if why:
        return _refuse(why)
    gm.graph = work.graph
    gm.recompile()
    return len(region)


# Ops that compute each leading-dim row from that row alone, whatever their other arguments.
_ROW_WISE = {
    "linear", "conv1d", "conv2d", "conv3d", "scaled_dot_product_attention", "add", "sub", "mul", "truediv",
    "iadd", "imul", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "relu", "gelu", "silu", "to", "float",
    "half", "bfloat16", "type_as", "contiguous", "clone",
}
# Ops whose dim argument (position 1, or ``dim``) must not be the batch's.
_ALONG_DIM = {"softmax", "log_softmax", "mean", "sum", "amax", "amin", "cat", "unsqueeze", "flatten"}


def _op_name(node: fx.Node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _mixes_rows(region: list[fx.Node], m: int) -> str | None:
    """Why the region may mix batch rows (see the module docstring), or None."""
    for node in region:
        value = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != m:
            return f"node {node.name} does not keep the batch ({m}) as its leading dim"
        name, ndim = _op_name(node), value.dim()
        if name in _ROW_WISE:
            if name == "layer_norm" and len(node.args[1]) >= ndim:
                return f"node {node.name} normalizes over the batch"
            continue
        if name == "layer_norm" and len(node.args[1]) < ndim:
            continue
        if name in _ALONG_DIM:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else (0 if name == "flatten" else None))
            source = node.args[0][0] if name == "cat" else node.args[0]
            rank = source.meta["example_value"].dim() if isinstance(source, fx.Node) else ndim
            if name == "cat" and dim is None:
                dim = 0
            if not isinstance(dim, int) or dim % rank == 0:
                return f"node {node.name} ({name}) acts along the batch dim"
            continue
        if name == "transpose" and all(d % ndim != 0 for d in node.args[1:3]):
            continue
        if name in _SIZED_METHODS and _leading_size(node.args) == m:
            continue
        return f"node {node.name} ({name}) is not known to act within a batch row"
    return None


def _leading_size(args: tuple) -> object:
    sizes = args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return sizes[0] if sizes else None


def _rewrite(gm: fx.GraphModule, latents: fx.Node, region: list[fx.Node], m: int) -> None:
    graph, inside = gm.graph, set(region)
    with graph.inserting_after(latents):
        half = graph.call_function(operator.getitem, (latents, slice(0, m // 2)))
    mark_glue(half, PASS_NAME, next(u for u in region if latents in u.all_input_nodes))
    for node in region:
        node.replace_input_with(latents, half)
        if node.op == "call_method" and node.target in _SIZED_METHODS:
            node.args = _halve_leading_size(node.args, m)
    for node in region:
        outside = [u for u in node.users if u not in inside and u is not half]
        if not outside:
            continue
        with graph.inserting_after(node):
            both = graph.call_function(torch.cat, ([node, node], 0))
        mark_glue(both, PASS_NAME, node)
        for user in outside:
            user.replace_input_with(node, both)
    graph.lint()
    gm.recompile()


def _halve_leading_size(args: tuple, m: int) -> tuple:
    """``x.view(M, ...)`` or ``x.view((M, ...))`` -> the same with M / 2 (other sizes untouched)."""
    if len(args) >= 2 and args[1] == m:
        return (args[0], m // 2, *args[2:])
    if len(args) == 2 and isinstance(args[1], (tuple, list)) and args[1] and args[1][0] == m:
        return (args[0], (m // 2, *args[1][1:]))
    return args


def _halved(value: object) -> tuple[int, ...] | None:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    return (value.shape[0] // 2, *value.shape[1:])


def _shapes_differ(gm: fx.GraphModule, expected: dict[str, tuple[int, ...] | None]) -> str | None:
    """Propagate the captured inputs' fake tensors through the rewritten graph; a message when a region node's
    shape is not its old shape at half batch (or the graph no longer runs), else None."""
    try:
        propagate_fake(gm)
    except LookupError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - any failure means the halved region is not batch-independent
        return f"the region does not run at half batch ({type(error).__name__}: {error})"
    for node in gm.graph.nodes:
        if node.name not in expected:
            continue
        value, want = node.meta.get("val"), expected[node.name]
        got = tuple(value.shape) if isinstance(value, torch.Tensor) and value.dim() else None
        if got != want:
            return f"node {node.name} has shape {got} at half batch, expected {want}"
        node.meta["example_value"] = value
    return None


def _refuse(why: str) -> int:
    warnings.warn(f"cfg_shared_features: {why}; the graph stays exact", stacklevel=3)
    return 0
