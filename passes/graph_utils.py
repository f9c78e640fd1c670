"""Helpers shared by the passes: where a node comes from (its module path), what tensor it stands for, and how a
rewritten graph is checked on the captured fake inputs."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from contextlib import nullcontext

import torch.nn.functional as F
from torch import Tensor, fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

_SELF_PREFIX = re.compile(r"^L\['self'\]\.?|^L__self__\.?")
SOURCE = "source"  # node.meta key: the captured node(s) a node was copied or derived from (its provenance)
DERIVED_BY = "derived_by"  # node.meta key: the pass that created the node


def module_path(node: fx.Node) -> str | None:
    """The innermost module that created ``node``, as a dotted path below the compiled root ("a.b.0.c")."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = _SELF_PREFIX.sub("", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules", "")



_LIFTED_ATTRIBUTE = re.compile(r"^l_self_(?:modules_)?(.*)_$")


def lifted_names(gm: fx.GraphModule) -> list[str | None]:
    """Per placeholder of a captured graph, the state-dict key of the module parameter or buffer Dynamo lifted
    into it (named after its attribute path: ``l_self_modules_showo_modules_model_..._parameters_weight_`` ->
    ``showo.model....weight``), or None for the caller's own inputs."""
    names: list[str | None] = []
    for node in placeholders(gm):
        match = _LIFTED_ATTRIBUTE.match(node.name)
        names.append(re.sub(r"_(?:modules|parameters|buffers)_", ".", match.group(1)) if match else None)
    return names


def lifted_state_dict(gm: fx.GraphModule, inputs: list) -> dict[str, Tensor]:
    """The compiled module's parameters and buffers among a captured graph's ``inputs``, by state-dict key
    (``lifted_names``)."""
    return {key: value for key, value in zip(lifted_names(gm), inputs, strict=False)
            if key is not None and isinstance(value, Tensor)}


def linear_calls(gm: fx.GraphModule) -> Iterator[tuple[str, str, fx.Node]]:
    """(parent module path, module name, node) of every ``F.linear`` call made by a module, in graph order."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not F.linear:
            continue
        path = module_path(node)
        if path is not None:
            parent, _, leaf = path.rpartition(".")
            yield parent, leaf, node


def fake_value(node: object) -> Tensor | None:
    """The example (fake) tensor a node stands for: a placeholder's ``example_value``, or a getitem of one."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        value = node.meta.get("example_value")
        return value if isinstance(value, Tensor) else None
    if node.op == "call_function" and node.target is operator.getitem:
        base = fake_value(node.args[0])
        return None if base is None else base[node.args[1]]
    return None


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's inputs, in call order."""
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node | None:
    """The input named ``name`` (Dynamo names a forward argument ``x`` as ``l_x_``), or None."""
    return next((n for n in placeholders(gm) if n.name == name), None)


def captured_value(node: object) -> object:
    """What a node stood for when captured (Dynamo's ``example_value``; a propagation's ``val``), or None."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def propagate_fake(gm: fx.GraphModule, interpreter: type[FakeTensorProp] = FakeTensorProp) -> None:
    """Run ``gm`` on its inputs' captured fake values; each node's new value lands in ``meta["val"]``.

    It runs in the inputs' own fake mode (inside a backend call ``detect_fake_mode`` may return Dynamo's tracing
    mode instead), with the ShapeEnv's guards suppressed: checking a rewrite must not tie the capture's symbolic
    lengths to the example's values, which every later variant and part reads. Raises LookupError when the
    inputs carry no fake tensor; any error of the graph itself propagates.
    """
    inputs = [captured_value(n) for n in placeholders(gm)]
    mode = next((x.fake_mode for x in inputs if isinstance(x, FakeTensor)), None)
    if mode is None:
        raise LookupError("the captured inputs carry no fake tensors to check the rewritten shapes with")
    quiet = mode.shape_env.suppress_guards() if mode.shape_env is not None else nullcontext()
    with quiet:
        interpreter(gm, mode).propagate_dont_convert_inputs(*inputs)


def linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(input, weight, bias or None) of an ``F.linear`` call, whether the bias is given by position or keyword."""
    args = list(node.args) + [None] * (3 - len(node.args))
    return args[0], args[1], node.kwargs.get("bias", args[2])


def inherit_provenance(new_nodes: list[fx.Node], replaced: list[fx.Node], pass_name: str) -> None:
    """Mark the nodes a pass inserted as computing what ``replaced`` computed: their ``SOURCE`` becomes the
    replaced nodes' sources (where the graph has provenance at all) and ``DERIVED_BY`` the pass's name."""
    sources: list[str] = []
    for node in replaced:
        source = node.meta.get(SOURCE)
        sources.extend([source] if isinstance(source, str) else list(source or ()))
    for node in new_nodes:
        node.meta[DERIVED_BY] = pass_name
        if sources:
            node.meta[SOURCE] = tuple(sources)


def mark_glue(node: fx.Node, pass_name: str, neighbour: fx.Node | None = None) -> fx.Node:
    """A node a pass inserted that computes nothing of the captured graph itself (a slice, a repeat, an index): empty
    provenance, named after the pass, and in ``neighbour``'s module, so partitioning keeps it in that part."""
    node.meta[SOURCE], node.meta[DERIVED_BY] = (), pass_name
    if neighbour is not None and "nn_module_stack" in neighbour.meta:
        node.meta["nn_module_stack"] = dict(neighbour.meta["nn_module_stack"])
    return node


def output_node(graph: fx.Graph) -> fx.Node:
    """The graph's output node (the last node)."""
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def append_output(graph: fx.Graph, value: fx.Node) -> None:
    """Make the graph also return ``value``, after what it returns (an extra output ``split_extra_outputs`` takes
    off again)."""
    output = output_node(graph)
    results = output.args[0]
    output.args = ((*results, value) if isinstance(results, (tuple, list)) else (results, value),)


def split_extra_outputs(outputs: tuple, extras: tuple[str, ...]) -> tuple[tuple, dict[str, object]]:
    """A rewritten graph's outputs -> (the original outputs, {name: value} of the ``extras`` that passes appended
    after them, in order: e.g. a measurement the executor reads)."""
    cut = len(outputs) - len(extras)
    return tuple(outputs[:cut]), dict(zip(extras, outputs[cut:], strict=True))
