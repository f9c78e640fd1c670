"""Split a Dynamo-captured Show-o2 forward at module boundaries, and compile each distinct part once.

Eager twin: ``Showo2.forward`` itself, whose call structure the parts follow:

    embed          the image patches' embedding, the time embedding, ...   (what runs before the first SigLIP layer)
    siglip.k       und_trans.layers[k]                                     (a SigLIP encoder layer)
    fuse           SigLIP's final norm, the fusion, token embeddings, RoPE tables, masks
    layer.i        showo.model.layers[i]                                   (hidden -> hidden)
    importance.i   layer i's importance, where a pass measures it (passes.layer_skipping); importance.L, after
                   the last part, stacks the L measurements (L = the number of layers)
    head_in        the trunk's final norm, the slot mask, diff_proj
    head_block.j   diffusion_head_a[j]                                     (modulated attention block)
    final          diffusion_head_b and the velocity's unpatchify

An understanding call (``Showo2.understand``: a prefill or a decode step through the cache) has no head: its parts
are embed, siglip.k and fuse (the prefill only: a decode step has no image), layer.i (each appending to its layer's
cache) and final (the trunk's final norm and lm_head).

A node belongs to the part of its innermost module (``node.meta["nn_module_stack"]``) when that module lies
inside a SigLIP layer, a decoder layer or a head block; any other node belongs to the region it sits in (before
the first layer: embed; between SigLIP and the trunk: fuse; between the trunk and the head: head_in; after the last
head block: final). Dynamo lifts every weight to a graph input, so the parts take their weights as inputs, and
structurally identical parts (every SigLIP layer, every decoder layer, every head block) have the same
``structural_signature``: ``compile_parts`` compiles one of them and calls the
result with each part's own inputs, as vLLM's piecewise compilation does. Each node of a part keeps the name of
the captured node it was copied from in ``node.meta["source"]`` (its provenance; a pass that rewrites a part passes
it on with ``passes.graph_utils.inherit_provenance``).

A graph without decoder layers (not a Show-o2 forward) is left whole, as one part named "graph", with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.split_module import split_module

from passes.graph_utils import SOURCE, captured_value, module_path, placeholders, propagate_fake

# The module path a pass gives the nodes of a measurement it adds (``passes.layer_skipping``): no module of the model
# has it, so the measurement is a part of its own and the layer it measures keeps its plain form and artifact.
IMPORTANCE_PATH = "layer_importance.{}"
# Parts a module path anchors: (kind, pattern of the module path prefix with the index as group 1).
ANCHORS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("siglip", re.compile(r"^und_trans\.layers\.(\d+)(\.|$)")),
    ("layer", re.compile(r"^showo\.model\.layers\.(\d+)(\.|$)")),
    ("importance", re.compile("^" + re.escape(IMPORTANCE_PATH).replace(r"\{\}", r"(\d+)") + "$")),
    ("head_block", re.compile(r"^diffusion_head_a\.(\d+)(\.|$)")),
)
# The unanchored regions in the order the forward runs them: before the first layer, between the layers and
# the head blocks, after the last head block; and between the SigLIP layers and the decoder layers.
REGIONS = ("embed", "head_in", "final")
FUSE = "fuse"

log = logging.getLogger(__name__)

Compiler = Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]


def anchor(node: fx.Node) -> tuple[str, int] | None:
    """(kind, index) of the decoder layer or head block that created ``node``, or None."""
    path = module_path(node)
    if path is None:
        return None
    for kind, pattern in ANCHORS:
        match = pattern.match(path)
        if match:
            return kind, int(match.group(1))
    return None


def importance_stack(index: int) -> dict[str, tuple[str, str]]:
    """The ``nn_module_stack`` that puts a measurement node in part "importance.{index}" (see IMPORTANCE_PATH)."""
    path = IMPORTANCE_PATH.format(index)
    return {path: (path, "LayerImportance")}


def part_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Every compute node -> the name of its part ("embed", "layer.3", "head_in", "head_block.0", "final")."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    anchors = [anchor(n) for n in nodes]
    last = {kind: max((i for i, a in enumerate(anchors) if a and a[0] == kind), default=-1) for kind, _ in ANCHORS}
    names: dict[fx.Node, str] = {}
    current = REGIONS[0]
    for i, (node, found) in enumerate(zip(nodes, anchors, strict=True)):
        if found is not None:
            current = f"{found[0]}.{found[1]}"
        elif current.startswith("siglip.") and i > last["siglip"]:
            current = FUSE  # past the last SigLIP layer: its final norm, the fusion, the text side, RoPE, masks
        elif current.startswith(("layer.", "importance.")) and i > last["layer"]:
            # past the last decoder layer: the head's input, or the end of a forward without head blocks (the
            # understanding calls: final norm and lm_head)
            current = REGIONS[1] if last["head_block"] >= 0 else REGIONS[2]
        elif current.startswith("head_block.") and i > last["head_block"]:
            current = REGIONS[2]  # past the last head block
        # otherwise: a node no layer or block claims stays in the part before it (graph order = run order)
        names[node] = current
    return names


def structural_signature(gm: fx.GraphModule) -> str:
    """A hash of the graph's structure with values renamed by position: two parts with the same signature
    compute the same function of their inputs (same ops, same wiring, same constants, same input shapes)."""
    index: dict[fx.Node, int] = {}
    lines = []

    def arg(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        if isinstance(a, dict):
            return {k: arg(v) for k, v in a.items()}
        return a

    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "placeholder":
            value = node.meta.get("example_value", node.meta.get("val"))
            shape = (tuple(value.shape), str(value.dtype)) if isinstance(value, torch.Tensor) else None
            lines.append(f"placeholder {shape}")
        else:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", node.target)
            module = getattr(node.target, "__module__", "")
            lines.append(f"{node.op} {module}.{target} {arg(node.args)!r} {arg(node.kwargs)!r}")
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]


@dataclass
class Part:
    """One subgraph of the captured forward."""

    name: str  # "embed", "layer.3", ...
    attribute: str  # the root's submodule that runs it ("submod_3")
    module: fx.GraphModule
    signature: str  # structural_signature(module)

    @property
    def sources(self) -> set[str]:
        """The captured nodes this part computes (their names in the graph Dynamo handed over), through the passes
        that rewrote it (a merged projection computes each projection it replaced). Raises naming a node that has
        no provenance (a pass that inserted it without ``inherit_provenance``)."""
        found: set[str] = set()
        for node in self.module.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            source = node.meta.get(SOURCE)
            if source is None:
                raise ValueError(f"part {self.name}: node {node.name} has no provenance")
            found.update([source] if isinstance(source, str) else source)
        return found


@dataclass
class PartitionedGraph:
    """``root`` runs the parts in order (its submodules are the parts' modules): the captured forward."""

    root: fx.GraphModule
    parts: list[Part]
    captured_nodes: list[str]  # the compute nodes of the graph Dynamo handed over

    def groups(self) -> dict[str, list[str]]:
        """signature -> the names of the parts that share it, in graph order."""
        groups: dict[str, list[str]] = {}
        for part in self.parts:
            groups.setdefault(part.signature, []).append(part.name)
        return groups


def mark_provenance(gm: fx.GraphModule) -> list[str]:
    """Give each node of a captured graph its own name as provenance (``meta["source"]``), where a pass has not
    set one already; returns the names of the compute nodes (what Dynamo handed over, before any pass)."""
    for node in gm.graph.nodes:
        node.meta.setdefault(SOURCE, node.name)
    return [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def partition_showo2_graph(gm: fx.GraphModule, captured: list[str] | None = None,
                           expect_layers: bool = True) -> PartitionedGraph:
    """Split ``gm`` (a Dynamo-captured ``Showo2.forward``) into its parts. ``gm``'s graph stays as it was; its
    nodes keep (or gain) their provenance (``mark_provenance``), which the parts' copies carry. ``captured``: the
    compute nodes of the graph as Dynamo handed it over, when passes ran on it before (``mark_provenance``'s
    result, taken before them). ``expect_layers=False``: a graph a pass left without decoder layers (a head-cache
    reuse) is one part, "graph", without a warning."""
    captured_now = mark_provenance(gm)
    names = part_names(gm)
    if not any(name.startswith("layer.") for name in names.values()):
        if expect_layers:
            warnings.warn("partition_showo2_graph: the graph has no Show-o2 decoder layer (no node from "
                          "showo.model.layers.N); it stays whole, as one part", stacklevel=2)
        names = dict.fromkeys(names, "graph")
    order = list(dict.fromkeys(names.values()))
    number = {name: i for i, name in enumerate(order)}
    root = split_module(gm, None, lambda node: number[names[node]], keep_original_order=True)
    parts = []
    for i, name in enumerate(order):
        module = getattr(root, f"submod_{i}")
        parts.append(Part(name, f"submod_{i}", module, structural_signature(module)))
    return PartitionedGraph(root, parts, captured_now if captured is None else captured)


def compile_parts(graph: PartitionedGraph, compiler: Compiler, example_inputs: Sequence[Any],
                  compiled: dict[tuple, tuple[Callable[..., Any], str, fx.GraphModule]] | None = None,
                  overrides: Mapping[str, tuple[str, Compiler]] | None = None) -> dict[str, int]:
    """Replace each part of ``graph.root`` with a compiled callable, compiling once per structural signature and
    input layout (the first part of a group; the others call its result with their own inputs). ``example_inputs``
    are the root's inputs, run once through the uncompiled parts to give each compiler its parts' example inputs
    (a pass over the root may have changed their shapes, e.g. sliced weights). ``compiled``: artifacts to reuse
    and extend, shared by several partitions of variants of one graph (key -> (callable, part name, module)).
    A part that reuses an artifact another variant compiled for its own name (a new prompt length, for a compiler
    with ``dynamic_lengths``) takes that variant's module as its own: the module its artifact was compiled from,
    with the same captured nodes. ``overrides``: part name -> (label, compiler) for parts that compile otherwise
    (e.g. with eager rounding); the label is part of the artifact's key, so such a part never shares an artifact with
    a structurally identical part compiled the default way.

    Returns signature -> how many parts share its one compiled artifact.
    """
    examples = _part_inputs(graph, example_inputs)
    compiled = {} if compiled is None else compiled
    overrides = overrides or {}
    dynamic = [getattr(c, "dynamic_lengths", False) for c in (compiler, *(c for _, c in overrides.values()))]
    symbolic = symbolic_part_inputs(graph) if any(dynamic) else {}
    for part in graph.parts:
        label, part_compiler = overrides.get(part.name, ("", compiler))
        part_symbolic = symbolic.get(part.name) if getattr(part_compiler, "dynamic_lengths", False) else None
        key = (part.signature, _layout(examples[part.name], part_symbolic), label)
        if key not in compiled:
            part.module.meta["part"] = part.name  # for the compiler's logs and counters
            if part_symbolic is not None:  # which inputs carry the length: compiled symbolic in it from the start
                part.module.meta["symbolic_inputs"] = part_symbolic
            # Passes over the part read its inputs' example values (shapes, storage sharing); a pass over the root
            # may have changed them (weight views), so they become the inputs the part is compiled for.
            inputs = placeholders(part.module)
            for node, value in zip(inputs, examples[part.name], strict=True):
                if isinstance(value, torch.Tensor):
                    node.meta["example_value"] = value
            compiled[key] = part_compiler(part.module, examples[part.name]), part.name, part.module
        artifact, compiled_for, module = compiled[key]
        if compiled_for == part.name and module is not part.module:
            part.module = module
        setattr(graph.root, part.attribute, _Compiled(artifact))
    graph.root.recompile()
    return dict(Counter(part.signature for part in graph.parts))


def _layout(inputs: Sequence[Any], symbolic: Sequence[tuple[bool, ...] | bool] | None = None) -> tuple:
    """What a compiled part is specialised to: each tensor input's shape, strides and dtype, each other value.
    ``symbolic`` (``symbolic_part_inputs``, for a compiler that handles varying lengths itself): sizes Dynamo captured
    as symbols are left out, and so are the strides of a tensor with one."""
    if symbolic is None:
        symbolic = [False] * len(inputs)
    layout = []
    for x, sym in zip(inputs, symbolic, strict=True):
        if isinstance(x, torch.Tensor):
            dims = sym if isinstance(sym, tuple) else (False,) * x.dim()
            shape = tuple(None if s else n for n, s in zip(x.shape, dims, strict=True))
            layout.append((shape, None if any(dims) else x.stride(), x.dtype))
        else:
            layout.append(None if sym is True else x)
    return tuple(layout)


def symbolic_part_inputs(graph: PartitionedGraph) -> dict[str, list[tuple[bool, ...] | bool]]:
    """Per part, per input: for a tensor, which of its sizes are symbols of the captured graph (a prompt length,
    or one a pass derived from it, such as the rows left after token pruning); for a size input, whether it is
    one. Read from the parts' captured example values, or where a pass inserted a value between parts, found by
    propagating the root's captured fake inputs through the root, passes included. ``{}`` where the
    root has no fake inputs or does not propagate (every size then counts as static: correct, only compiled
    once per length)."""
    captured = {part.name: [captured_value(n) for n in placeholders(part.module)] for part in graph.parts}
    if all(v is not None for values in captured.values() for v in values):
        # every part input keeps the value Dynamo captured (no pass inserted a value between parts): read them
        return {name: [_symbols_of(v) for v in values] for name, values in captured.items()}
    names = {part.attribute: part.name for part in graph.parts}
    found: dict[str, list[tuple[bool, ...] | bool]] = {}

    class Recorder(FakeTensorProp):
        def call_module(self, target, args, kwargs):
            if target in names:
                found.setdefault(names[target], [_symbols_of(a) for a in args])
            return super().call_module(target, args, kwargs)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            propagate_fake(graph.root, Recorder)
    except Exception as error:  # noqa: BLE001 - no symbolic layout: fall back to static keys, which are exact
        log.debug("symbolic_part_inputs: the root does not propagate fake inputs (%s)", error)
        return {}
    return found


def _symbols_of(value: Any) -> tuple[bool, ...] | bool:
    if isinstance(value, torch.Tensor):
        return tuple(_is_symbol(n) for n in value.shape)
    return _is_symbol(value)


def _is_symbol(value: Any) -> bool:
    return isinstance(value, torch.SymInt) and not value.node.is_constant()


class _Compiled(torch.nn.Module):
    """A compiled part as a submodule of the root (``split_module``'s root calls its submodules)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def _part_inputs(graph: PartitionedGraph, inputs: Sequence[Any]) -> dict[str, list[Any]]:
    """Each part's positional inputs on one run of the root (recorded by a forward pre-hook)."""
    seen: dict[str, list[Any]] = {}
    hooks = []
    for part in graph.parts:
        def record(_module, args, name=part.name):
            seen.setdefault(name, list(args))
        hooks.append(part.module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            graph.root(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen
