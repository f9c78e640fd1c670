"""Generation through the captured graph: FlashU's per-call decisions as passes over Dynamo's Show-o2 forward.

The caller's loop is the backend's step protocol (``begin_image``, then ``with backend.step(k): gen(...)``); the
plan of call k comes from ``schedule.gen_schedule`` (the eager twin's, ``FlashUGenVelocity``). Each call runs a
variant of the captured forward, built on first use:

    layers "skip"       passes.layer_skipping.skip_layers(skip set)
    layers "measure"    passes.layer_skipping.measure_layer_importance over the image slots (+ importance output)
    head "store"        passes.head_cache.expose_head_output (+ the head blocks' output)
    head "reuse"        passes.head_cache.reuse_head_output: the stored output is an input, the dead trunk is gone
    CFG pair            passes.cfg_shared_features: the image features on half the batch (equal halves promised)
    once                passes.part_layout.contiguous_part_outputs: a value one part hands the next is contiguous
    every call          passes.prefix_hoisting.attend_slots_only: the image slot's positions alone, reading the
                        prompt prefix's keys and values, computed once per image and layer variant by the prefix
                        graph (passes.prefix_hoisting.hoist_prefix_kv)
    then                passes.partition.partition_showo2_graph, and with the pruned FFN phase
                        passes.ffn_slicing.slice_ffn_inputs (each layer's "gen" range as weight views)

Compiled parts are shared by every variant (one artifact per part structure and input layout); on CUDA each
variant is replayed as a CUDA graph (``compiled.cuda_graphs``), the call's latents and t copied in. The caller's
classifier-free guidance, and the guidance scale of each call, are the plan's (``begin_image`` returns it).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, fx

from flashu_fx.compiled.cuda_graphs import CudaGraphs, contiguous_per_call, run_maybe_graphed, tensor_addresses
from flashu_fx.compiled.repeat_calls import full_guards
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import choose_skip_set
from flashu_fx.schedule import StepPlan
from passes.cfg_shared_features import share_cfg_features
from passes.ffn_slicing import slice_ffn_inputs
from passes.graph_utils import placeholders, split_extra_outputs
from passes.head_cache import HEAD_CACHE_INPUT, expose_head_output, reuse_head_output
from passes.layer_skipping import measure_layer_importance, skip_layers
from passes.part_layout import contiguous_part_outputs
from passes.partition import PartitionedGraph, compile_parts, mark_provenance, partition_showo2_graph
from passes.prefix_hoisting import (
    MASK,
    OFFSETS,
    PREFIX_K,
    PREFIX_V,
    TOKENS,
    attend_slots_only,
    hoist_prefix_kv,
    prefix_is_causal,
)

MAX_GRAPHS = 64  # captured variants kept, least recently used dropped


@dataclass
class CallRecord:
    """What one call did (for equivalence tests against the eager twin, ``flashu_gen.GenCallRecord``)."""

    call: int
    skip_set: tuple[int, ...]
    head: str
    trunk_ran: bool
    importance: list[float] | None = None


@dataclass
class GenImageState:
    """The image in progress: the skip set of the last measurement, the stored head output, one record per call."""

    skip_set: tuple[int, ...] = ()
    head_cache: Tensor | None = None
    records: list[CallRecord] = field(default_factory=list)
    weight_addresses: tuple[int, ...] | None = None  # taken at the image's first call (CUDA-graph keys)
    # (skip set, FFN pruned) -> the prefix's keys and values, (k, v) per attention in the executor's ``attentions``
    # order (None for a skipped layer's), and their addresses (CUDA-graph keys)
    prefix: dict[tuple, tuple[tuple[Tensor | None, ...], tuple[int, ...]]] = field(default_factory=dict)


class GenGraphExecutor:
    """Runs one captured generation forward under FlashU's plans (``config=None``: every call the whole forward)."""

    def __init__(self, gm: fx.GraphModule, config: FlashUConfig | None, ffn_ranges: list[tuple[int, int]] | None,
                 compile_part: Callable[[fx.GraphModule, list], Callable], slot_len: int, num_layers: int,
                 cuda_graphs: bool = False) -> None:
        self.gm, self.config, self.ffn_ranges, self.compile_part = gm, config, ffn_ranges, compile_part
        self.cuda_graphs = CudaGraphs(MAX_GRAPHS) if cuda_graphs else None
        self.slot_len = slot_len
        self.num_skipped = 0 if config is None else config.num_skipped_layers(num_layers)
        self.captured = mark_provenance(gm)
        # once, on the capture every variant copies: parts hand each other rows, not eager's transposed SigLIP stream
        self.layout_rewrites = contiguous_part_outputs(gm)
        self.names = [n.name for n in placeholders(gm)]
        weights = [name.startswith("l_self_") for name in self.names]  # read in place by a CUDA graph
        self.weight_positions = [i for i, is_weight in enumerate(weights) if is_weight]
        self.per_call = [i for i, is_weight in enumerate(weights) if not is_weight]  # tokens, latents, t, ...
        self.state = GenImageState()
        self.graph: PartitionedGraph | None = None  # the variant that ran last
        self.prefix_graph: PartitionedGraph | None = None  # the prefix graph that ran last
        self._variants: dict[tuple, tuple[PartitionedGraph, tuple[str, ...], list[str]]] = {}
        self._prefix_variants: dict[tuple, tuple[PartitionedGraph, list[str]]] = {}
        # The slot graph every variant starts from, rewritten once here, while the capture's length is still the
        # symbol it was traced with (a later fake-tensor pass over a part may tie it to the value it ran with).
        self.slot_gm, self.attentions = self._slot_graph()
        self.hoisting = self.slot_gm is not None
        # where a variant's input comes from: the call's args, then the stored head output, then the prefix's k, v
        self._input_index = {name: i for i, name in enumerate(self.names)}
        self._input_index[HEAD_CACHE_INPUT] = len(self.names)
        for i, name in enumerate(self.attentions):
            self._input_index[PREFIX_K + name] = len(self.names) + 1 + 2 * i
            self._input_index[PREFIX_V + name] = len(self.names) + 2 + 2 * i
        self._artifacts: dict[tuple, tuple] = {}  # compile_parts: the compiled parts, shared by every variant
        self._cfg_shared_bases: dict[bool, fx.GraphModule] = {}  # by hoisting: ``_base_graph``'s rewritten copies
        self.variant_builds = 0  # slot and prefix variants built (the passes run), for warm-up checks

    def begin(self) -> None:
        """Forget the skip set, the stored head output and the records (a new image)."""
        self.state = GenImageState()

    def continue_image(self, state: GenImageState) -> None:
        """Go on with the image another executor began (the same forward captured again mid-image): its skip set,
        stored head output and records. The prompt prefix's keys and values are computed again for this capture's
        inputs, and the weights' addresses taken again."""
        self.state = GenImageState(state.skip_set, state.head_cache, state.records)

    def __call__(self, plan: StepPlan, args: tuple, cfg_shared: bool = False) -> tuple:
        """Call ``plan.call`` of the image on the captured forward's inputs ``args`` (the caller's tokens (M, L),
        latents (M, C, h, w), t (M,), offsets (M,), mask (M, 1, L, L), and the lifted weights) -> its outputs
        (the velocity (M, C, h, w)). ``cfg_shared``: the caller promises the latents' two halves are equal (a CFG
        pair), so the image features are computed once for both."""
        args = contiguous_per_call(args, self.per_call)
        st = self.state
        skipped = st.skip_set if plan.layers == "skip" else ()
        measure = plan.layers == "measure"
        if plan.head == "reuse" and st.head_cache is None:
            raise RuntimeError(f"call {plan.call} reuses the head output but none is stored")
        if st.weight_addresses is None:  # once per image: the weights do not move within one
            st.weight_addresses = tensor_addresses(args, self.weight_positions)
        trunk = plan.head != "reuse" or measure
        prefix, prefix_addresses = (None,) * (2 * len(self.attentions)), ()
        if trunk and self.hoisting:
            with full_guards():  # its parts may compile now
                prefix, prefix_addresses = self._prefix(skipped, plan.ffn_pruned, args)
        # (a head-reuse call computes image features only when it measures the trunk: otherwise nothing to share)
        key = (skipped, measure, plan.head, plan.ffn_pruned, cfg_shared and trunk)
        graph, extras, positions, per_call = self._variant(key, args, prefix)
        self.graph = graph
        # A variant's inputs are the captured forward's, in order, then its own (``_variant``): only those are looked up
        # (the captured ones are ~900 weights, and a head-reuse call's whole work is a sub-millisecond replay).
        n = len(args)
        extra = (st.head_cache, *prefix)
        inputs = (*args, *(extra[i - n] for i in positions[n:]))
        with full_guards():  # the parts are torch.compile'd: a first use on a repeated loop call must compile
            out, found = split_extra_outputs(run_maybe_graphed(
                self.cuda_graphs, (key, st.weight_addresses, prefix_addresses), graph.root, inputs, per_call,
                f"{plan.head}{'-measure' if measure else ''}"), extras)
        importance = None
        if "importance" in found:
            importance = found["importance"].tolist()  # the one host read of a measuring call
            st.skip_set = choose_skip_set(importance, self.num_skipped)
        if plan.head == "store":
            st.head_cache = found["head_out"].clone()  # kept past later calls (see ``CudaGraphs``: outputs)
        elif plan.head == "compute":
            st.head_cache = None  # as the eager twin: after the first store, only the full phase computes
        st.records.append(CallRecord(plan.call, skipped, plan.head, plan.needs_trunk, importance))
        return out

    def _variant(self, key: tuple, args: tuple, prefix: tuple[Tensor | None, ...],
                 ) -> tuple[PartitionedGraph, tuple[str, ...], list[int], list[int]]:
        """The variant for ``key`` = (skip set, measure, head action, FFN pruned, features shared), built once: its
        partitioned graph, its extra outputs, where each of its inputs is (an index into the call's args, then the
        stored head output, then the prefix's keys and values in ``self.attentions`` order), and which of its inputs
        change from call to call. A variant serves every prompt length: its graph keeps the capture's symbolic
        length and its parts are compiled for varying lengths (``make_part_compiler(dynamic_lengths=True)``), so a
        new length runs the passes no more (only a CUDA graph is captured for it: ``CudaGraphs.call`` keys each
        graph by the call's sizes)."""
        if key in self._variants:
            return self._variants[key]
        skipped, measure, head, ffn_pruned, cfg_shared = key
        work, extras = copy.deepcopy(self._base_graph(cfg_shared)), []
        if skipped:
            skip_layers(work, skipped)
        if measure and measure_layer_importance(work, None if self.hoisting else (OFFSETS, self.slot_len),
                                                every_position=self.hoisting):
            extras.append("importance")
        if head == "store" and expose_head_output(work):
            extras.append("head_out")
        if head == "reuse" and not reuse_head_output(work):
            raise RuntimeError("flashu_backend: the head cache cannot be used on this graph (no head boundary)")
        for node in placeholders(work):
            if node.name.startswith((PREFIX_K, PREFIX_V)) and not node.users:  # a skipped layer's keys and values
                work.graph.erase_node(node)
        work.recompile()
        where = self._input_index
        names = [n.name for n in placeholders(work)]
        positions = [where[name] for name in names]
        if positions[: len(self.names)] != list(range(len(self.names))):  # passes add inputs, never drop or reorder
            raise RuntimeError(f"flashu_backend: the variant {key[:5]} reorders the captured forward's inputs")
        per_call = [i for i, name in enumerate(names) if name == HEAD_CACHE_INPUT or where[name] in self.per_call]
        available = (*args, self.state.head_cache, *prefix)
        examples = [available[i] for i in positions]
        graph = partition_showo2_graph(work, self.captured, expect_layers=head != "reuse" or measure)
        if ffn_pruned and self.ffn_ranges is not None:
            slice_ffn_inputs(graph.root, self.ffn_ranges)
        compile_parts(graph, self.compile_part, examples, self._artifacts)
        self._variants[key] = graph, tuple(extras), positions, per_call
        self.variant_builds += 1
        return self._variants[key]

    def _base_graph(self, cfg_shared: bool) -> fx.GraphModule:
        """The graph every variant copies before its own passes: the slot graph (or, without hoisting, the captured
        forward), with ``cfg_shared`` its image features once per CFG pair. That rewrite is the same for every
        variant and checks itself by propagating fake tensors through the whole graph, so it runs once here."""
        base = self.slot_gm if self.hoisting else self.gm
        if not cfg_shared:
            return base
        key = self.hoisting
        if key not in self._cfg_shared_bases:
            shared = copy.deepcopy(base)
            share_cfg_features(shared)
            self._cfg_shared_bases[key] = shared
        return self._cfg_shared_bases[key]

    def _slot_graph(self) -> tuple[fx.GraphModule | None, list[str]]:
        """The captured forward on the image slot alone (``passes.prefix_hoisting``) and its masked attentions, or
        (None, []) where it does not split into a prefix and a slot graph."""
        slot = copy.deepcopy(self.gm)
        names = attend_slots_only(slot, self.slot_len)
        # names: the slot's write and the masked attentions were found, all the prefix graph (hoist_prefix_kv) needs
        return (slot, names) if names else (None, [])

    def _prefix(self, skipped: tuple[int, ...], ffn_pruned: bool, args: tuple,
                ) -> tuple[tuple[Tensor | None, ...], tuple[int, ...]]:
        """The prompt prefix's keys and values under (skip set, FFN pruned), (k, v) per attention in ``attentions``
        order (None for a skipped layer's), computed on the image's first call that needs them (its inputs
        ``args``), and their addresses."""
        st = self.state
        if (skipped, ffn_pruned) in st.prefix:
            return st.prefix[skipped, ffn_pruned]
        position = self._input_index
        tokens, mask = args[position[TOKENS]], args[position[MASK]]
        if not st.prefix and not prefix_is_causal(mask, args[position[OFFSETS]]):
            warnings.warn("flashu_backend: the batch's mask lets the prompt attend to the image slot, so the prompt's "
                          "keys and values change with the latents; every call now runs the whole batch", stacklevel=3)
            self.hoisting = False
            self._variants.clear()
            return (None,) * (2 * len(self.attentions)), ()
        length = tokens.shape[1]
        cut = length - self.slot_len  # the prefix buffer: every row's prompt (and a shorter row's slot, masked)
        prefix_args = list(args)
        prefix_args[position[TOKENS]] = tokens[:, :cut].contiguous()
        prefix_args[position[MASK]] = mask[:, :, :cut, :cut].contiguous()
        for i in self.per_call:
            if isinstance(args[i], int) and args[i] == length:
                prefix_args[i] = cut
        graph, names = self._prefix_variant((skipped, ffn_pruned), prefix_args)
        self.prefix_graph = graph
        # The slot graphs read these in place on every later call of the image, between other graphs' replays: on
        # CUDA they are kept outside the graphs' shared pool, at the same addresses from the first image on.
        out = run_maybe_graphed(self.cuda_graphs, ("prefix", skipped, ffn_pruned, st.weight_addresses),
                                graph.root, prefix_args, self.per_call, "prefix", keep_outputs=True)
        found = {name: (out[2 * i], out[2 * i + 1]) for i, name in enumerate(names)}
        flat = tuple(t for name in self.attentions for t in found.get(name, (None, None)))
        st.prefix[skipped, ffn_pruned] = flat, tensor_addresses(out, range(len(out)))
        return st.prefix[skipped, ffn_pruned]

    def _prefix_variant(self, key: tuple, args: list) -> tuple[PartitionedGraph, list[str]]:
        """The prefix graph for ``key`` = (skip set, FFN pruned), built once (for every prompt length, as
        ``_variant``)."""
        if key in self._prefix_variants:
            return self._prefix_variants[key]
        skipped, ffn_pruned = key
        work = copy.deepcopy(self.gm)
        if skipped:
            skip_layers(work, skipped)
        names = hoist_prefix_kv(work)
        graph = partition_showo2_graph(work, self.captured)
        if ffn_pruned and self.ffn_ranges is not None:
            slice_ffn_inputs(graph.root, self.ffn_ranges)
        compile_parts(graph, self.compile_part, args, self._artifacts)
        self._prefix_variants[key] = graph, names
        self.variant_builds += 1
        return self._prefix_variants[key]
