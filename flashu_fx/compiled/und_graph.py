"""Understanding through the captured graphs: FlashU as passes over Dynamo's prefill and decode-step graphs.

``answer_question(compiled, ...)`` (or ``answer_question_compiled``) calls the compiled model once for the prefill
and once per new token (``Showo2.understand``); Dynamo hands the backend one graph of each kind, and
``UndGraphExecutor.runner`` returns what runs in their place. Per call it follows the eager twin's rules
(``FlashUUndDecoder``; the step rule is ``schedule.und_step_layers``): step d = 0 is the prefill, d >= 1 the decode
steps; a measuring step runs every layer and returns each layer's importance, from which ``choose_skip_set`` picks
the layers the following steps skip. What runs for a call is a variant of its captured graph:

    prefill   measure_layer_importance (when measuring), then vnorm_token_pruning (rows after layer p)
    decode    skip_layers(skip set) | measure_layer_importance; decode_attention_as_reductions (an option)
    both      partition_showo2_graph, then slice_ffn_inputs (the "und" FFN of each layer as weight views)

Variants are built on first use and compiled part by part, sharing compiled parts across variants (a new skip
set reuses every layer's artifact). A new prompt length reuses its variant (no pass runs again, nothing compiles):
the variant keeps the capture's symbolic length, and the prefill's parts are compiled through Dynamo
(``make_part_compiler(dynamic_lengths=True)``), symbolic in the length from their first compilation. On CUDA a
prompt length's prefill is captured as a CUDA graph on its second use (``PREFILL_CAPTURE_ON_USE``); the decode
step's variants on their first.
The decode step's parts are specialised to their one row and the cache. A backend that wants the eager twin's
kept tokens (``prefill_eager_numerics``) hands a compiler of its own for the prefill's parts up to the pruning layer
(``decision_parts``: what the V-norms read), compiled apart from their structural twins.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from torch import Tensor, fx

from flashu_fx.compiled.cuda_graphs import CudaGraphs, contiguous_per_call, run_maybe_graphed, tensor_addresses
from flashu_fx.compiled.repeat_calls import full_guards
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import choose_skip_set
from flashu_fx.flashu_und import UndStepRecord
from flashu_fx.schedule import und_step_layers
from passes.decode_attention import decode_attention_as_reductions
from passes.ffn_slicing import slice_ffn_inputs
from passes.graph_utils import lifted_names, placeholders, split_extra_outputs
from passes.layer_skipping import measure_layer_importance, skip_layers
from passes.part_layout import contiguous_part_outputs
from passes.partition import PartitionedGraph, compile_parts, mark_provenance, partition_showo2_graph
from passes.vnorm_token_pruning import prune_tokens_after_layer

MAX_GRAPHS = 64  # captured variants kept, least recently used dropped (skip sets: C(L, L * r_LS))
# A prefill runs once per answer and its CUDA graph is keyed by the prompt's length, so most lengths are met once
# early on: capturing on a length's first use cost that answer 0.18-0.27 s against 0.025 s replayed (1.5B, H200).
# The first use runs the compiled parts as they are; the second captures.
PREFILL_CAPTURE_ON_USE = 2
DECODE_ATTENTION = ("sdpa", "reductions")  # how a decode step attends: the library kernel, or passes.decode_attention


def check_decode_attention(value: object) -> str:
    """``value`` if it names a decode attention (``DECODE_ATTENTION``); else a ValueError naming the choices."""
    if value not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention={value!r} is invalid: allowed {', '.join(map(repr, DECODE_ATTENTION))}")
    return value


@dataclass
class UndAnswerState:
    """What the executor knows of the answer in progress: the step, the skip set, the records."""

    step: int = -1
    prompt_len: int = 0
    skip_set: tuple[int, ...] = ()
    kept_rows: Tensor | None = None
    records: list[UndStepRecord] = field(default_factory=list)
    addresses: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per kind: weights and cache (CUDA graphs)


def decision_parts(graph: PartitionedGraph, prune_layer: int) -> list[str]:
    """The names of the parts of a pruned prefill that the kept-token choice reads: every part in graph order up to
    and including ``layer.{prune_layer}``, whose V-norms choose the tokens (the image embedding, SigLIP, the fusion,
    the layers before it)."""
    names = [part.name for part in graph.parts]
    last = f"layer.{prune_layer}"
    if last not in names:
        raise ValueError(f"token_prune_layer={prune_layer} names no part of the prefill: its parts are {names}")
    return names[: names.index(last) + 1]


class UndGraphExecutor:
    """The understanding executor of one backend: its config, the "und" FFN ranges, and the compiled variants."""

    def __init__(self, config: FlashUConfig | None, ffn_ranges: list[tuple[int, int] | None] | None,
                 compile_part: Callable[[fx.GraphModule, list], Callable], cuda_graphs: bool = True,
                 compile_one_row: Callable[[fx.GraphModule, list], Callable] | None = None,
                 prepare_weights: Callable[[dict[str, Tensor]], None] | None = None,
                 decode_attention: str = "sdpa",
                 compile_decision_part: Callable[[fx.GraphModule, list], Callable] | None = None) -> None:
        """``compile_part`` compiles the prefill's parts, ``compile_one_row`` (default: the same) the decode
        step's, which run on one row. ``prepare_weights``: called with the weights by state-dict key before each
        prefill (the backend lays out new weights for merged projections there). ``decode_attention``: "sdpa"
        (the library's attention kernel) or "reductions" (``passes.decode_attention``) for the decode step.
        ``compile_decision_part`` (default: as the others) compiles the prefill's parts that the kept-token choice
        reads, every part up to and including the pruning layer (``decision_parts``), e.g. with eager rounding so
        the V-norms, and so the kept tokens, are the eager twin's."""
        check_decode_attention(decode_attention)
        self.config = FlashUConfig.off("und") if config is None else config
        self.ffn_ranges, self.compile_part = ffn_ranges, compile_part
        self.compile_one_row = compile_part if compile_one_row is None else compile_one_row
        self.prepare_weights, self.decode_attention = prepare_weights, decode_attention
        self.compile_decision_part = compile_decision_part
        self.cuda_graphs = CudaGraphs(MAX_GRAPHS) if cuda_graphs else None
        self.state = UndAnswerState()
        self.graphs: dict[str, PartitionedGraph] = {}  # "prefill" / "decode": the variant that ran last
        self._artifacts: dict[tuple, tuple] = {}  # (part signature, input layout) -> compiled part, shared
        self.variant_builds = 0  # variants built (the passes run), for warm-up checks

    def runner(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        """The callable Dynamo runs in place of ``gm`` (a captured prefill or decode step)."""
        names = [n.name for n in placeholders(gm)]
        kind = "prefill" if "l_latents_" in names else "decode"
        captured = mark_provenance(gm)
        contiguous_part_outputs(gm)  # the prefill's parts hand each other rows (passes.part_layout)
        num_layers = sum(name.endswith("_buffers_length_") for name in names)  # one fill count per layer's cache
        num_skipped = self.config.num_skipped_layers(num_layers)
        table = next(n for n in gm.graph.nodes if n.name.endswith("position_embedding_parameters_weight_")) \
            if kind == "prefill" else None
        variants: dict[tuple, tuple[PartitionedGraph, tuple[str, ...]]] = {}
        in_place = [name.startswith(("l_self_", "l_cache_")) for name in names]  # weights and caches
        in_place_positions = [i for i, is_in_place in enumerate(in_place) if is_in_place]
        per_call = [i for i, is_in_place in enumerate(in_place) if not is_in_place]  # tokens, latents, mask, sizes
        weight_keys = {i: key for i, key in enumerate(lifted_names(gm)) if key is not None}

        def variant(skipped: tuple[int, ...], measure: bool, args: tuple) -> tuple[PartitionedGraph, tuple[str, ...]]:
            # one variant for every prompt length: the graph keeps the symbolic length, the parts compile for it
            key = (skipped, measure)
            if key not in variants:
                work, extras = copy.deepcopy(gm), []
                if skipped:
                    skip_layers(work, skipped)
                # measured before pruning rewires the layers (the eager twin measures the last row, which stays)
                if measure and measure_layer_importance(work):
                    extras.append("importance")
                if kind == "decode" and self.decode_attention == "reductions":
                    decode_attention_as_reductions(work)
                if kind == "prefill" and self.config.token_prune_ratio > 0:
                    num_image = table.meta["example_value"].shape[0]  # the configured grid, as the eager twin
                    if prune_tokens_after_layer(work, self.config.token_prune_layer, num_image,
                                                self.config.kept_tokens(num_image)):
                        extras.append("kept_rows")
                graph = partition_showo2_graph(work, captured)
                if self.ffn_ranges is not None:
                    slice_ffn_inputs(graph.root, self.ffn_ranges)
                # compile_parts runs the root once for its parts' inputs: on copies of the caches it appends to
                examples = [x.clone() if name.startswith("l_cache_") else x
                            for name, x in zip(names, args, strict=True)]
                compiler = self.compile_part if kind == "prefill" else self.compile_one_row
                overrides = {}
                if "kept_rows" in extras and self.compile_decision_part is not None:
                    decision = ("decision", self.compile_decision_part)
                    overrides = {name: decision for name in decision_parts(graph, self.config.token_prune_layer)}
                compile_parts(graph, compiler, examples, self._artifacts, overrides)
                variants[key] = graph, tuple(extras)
                self.variant_builds += 1
            return variants[key]

        def run(*args):
            args = contiguous_per_call(args, per_call)
            st = self.state
            if kind == "prefill":
                if self.prepare_weights is not None:  # once per answer: the weights do not move within one
                    self.prepare_weights({key: args[i] for i, key in weight_keys.items()})
                self.state = st = UndAnswerState(step=0, prompt_len=args[names.index("l_tokens_")].shape[1])
            elif not st.records:
                raise RuntimeError("flashu_backend: a decode step (cache=..., latents=None) came before any prefill; "
                                   "call the model with the prompt and its image first")
            else:
                st.step += 1
            layers = und_step_layers(self.config, st.step)
            skipped = st.skip_set if layers == "skip" else ()
            graph, extras = variant(skipped, layers == "measure", args)
            self.graphs[kind] = graph
            label = "prefill" if kind == "prefill" else "measure" if layers == "measure" else f"skip{list(skipped)}"
            if kind not in st.addresses:  # once per answer: its weights and cache do not move within it
                st.addresses[kind] = tensor_addresses(args, in_place_positions)
            # the prefill's parts are torch.compile'd (``dynamic_lengths``): a new length may compile, never skip guards
            with full_guards() if kind == "prefill" else nullcontext():
                out, found = split_extra_outputs(run_maybe_graphed(
                    self.cuda_graphs, (kind, skipped, layers == "measure", st.addresses[kind]), graph.root, args,
                    per_call, label, capture_on_use=PREFILL_CAPTURE_ON_USE if kind == "prefill" else 1), extras)
            importance = None
            if "importance" in found:
                importance = tuple(found["importance"].tolist())  # the one host read of a measuring step
                st.skip_set = choose_skip_set(importance, num_skipped)
            if kind == "prefill" and "kept_rows" in found:
                st.kept_rows = found["kept_rows"].clone()  # read after the decode steps (``CudaGraphs``: outputs)
            st.records.append(UndStepRecord(st.step, st.prompt_len - 1 + st.step, layers, skipped, importance,
                                            st.skip_set))
            return out

        return run
